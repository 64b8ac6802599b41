"""Serving benchmark: index build time, ANN recall@10 against exact search, and HTTP top-k latency and QPS.

Builds a ScaNN index over a synthetic clustered corpus (default 1M x 64), writes it as an export of a tiny
run (fresh towers of `+debug=smoke` with output_dim = the corpus dim; the towers only embed the query, the
corpus is synthetic), starts `python -m serve` on 127.0.0.1 in a subprocess, and drives it from other
processes with concurrent keep-alive clients for a bounded number of requests and seconds. All traffic goes
to 127.0.0.1.

The load generator (`--client sockets`, the default) is `--client-procs` processes, each running its share of
the `--clients` connections from one selector loop over plain sockets: every request is a full HTTP/1.1
POST with its own random user, every response is read to its Content-Length, checked for status 200 and
parsed as JSON holding k items. It costs the shared CPUs several times less per request than
`--client threads` (http.client in one thread per connection, one process), which is kept for comparison.
The report adds the CPU seconds per request of the server process and of the clients, so the server's cost
can be read apart from the load on the machine.

  python scripts/bench_serve.py                          # 1M x 64, 16 clients, up to 10000 requests / 60 s
  python scripts/bench_serve.py --items 200000 --clients 32 --requests 3000
  python scripts/bench_serve.py --clients 1 --requests 2000  # single-query latency
  python scripts/bench_serve.py --keep /tmp/bench1m --repeat 3   # reuse the built index across invocations

`--filtered` measures filtered search for conditional retrieval in process (`TopK.search(..., conditions=)`,
no HTTP): the same kind of corpus, each item given one of `--values` condition values with Zipf-like sizes
(exponent `--zipf`; a share `--correlation` of the items take their cluster's own value, so a value is dense
in some regions and absent from others), a ScaNN index holding the codes, and queries whose condition is drawn
as often as items hold it (half of them) or uniformly over the values (the other half). Head values (more than
`exact_below` items: the ANN, filtered) and tail values (searched exactly) are reported apart: recall@k against
exact filtered search, and p50 / p99 latency of single queries and of batches, for each `--exact-below` x
`--overfetch` setting.

  python scripts/bench_serve.py --filtered                     # 1M x 64, 100 values, k = 20
  python scripts/bench_serve.py --filtered --items 200000 --exact-below 5000,20000 --overfetch 1,2,4
"""
from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import pathlib
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_run(run_dir: pathlib.Path, dim: int) -> tuple[str, int]:
    """A run directory with fresh smoke towers of output dim `dim` (checkpoint at step 1).
    Returns (model_version, number of users)."""
    from tests.helpers import smoke_cfg
    from towers.restore import load_trained
    from train.loop import write_untrained_run

    ds, _, _ = write_untrained_run(smoke_cfg(f"model.output_dim={dim}"), run_dir, step=1)
    return load_trained(run_dir).model_version, ds.num_users


def build_index(items: int, dim: int, out: pathlib.Path, model_version: str, queries: int) -> dict:
    """Builds and writes the ScaNN index; measures its recall@10 against exact search on held-out queries."""
    from serve.export import ann_recall
    from serve.index import BruteForce
    from serve.scann_index import ScaNNIndex
    from serve.manifest import write_index
    from tests.serve.test_index import clustered

    rng = np.random.default_rng(0)
    both = clustered(items + queries, dim, rng, clusters=1000)
    corpus, q = both[:items], both[items:]
    ids = np.arange(items, dtype=np.int64) + 1_000_000
    t0 = time.perf_counter()
    index = ScaNNIndex().index(corpus, ids)
    build_s = time.perf_counter() - t0
    _, exact_ids = BruteForce().index(corpus, ids).search(q, 10)
    recall = ann_recall(index, exact_ids, q, 10)
    t0 = time.perf_counter()
    write_index(index, out, model_version=model_version, extra={"ann_recall@10": recall})
    return {"build_s": round(build_s, 2), "write_s": round(time.perf_counter() - t0, 2),
            "recall@10": round(recall, 4), "params": {k: v for k, v in index.params().items() if k != "config"}}


def conditioned_corpus(items: int, queries: int, dim: int, num_values: int, exponent: float, correlation: float,
                       rng, clusters: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(corpus float32[items, dim], codes int32[items], queries float32[queries, dim]): unit vectors around
    `clusters` centres (the recipe of `tests.serve.test_index.clustered`), value v drawn with probability
    proportional to 1 / (v + 1) ** exponent, except that a share `correlation` of the items take their cluster's
    own value (drawn from the same law)."""
    centres = rng.normal(size=(clusters, dim))
    label = rng.integers(0, clusters, items + queries)
    x = centres[label] + 0.6 * rng.normal(size=(items + queries, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    p = 1.0 / np.arange(1, num_values + 1) ** exponent
    p /= p.sum()
    home = rng.choice(num_values, clusters, p=p)
    codes = np.where(rng.random(items) < correlation, home[label[:items]], rng.choice(num_values, items, p=p))
    return x[:items], codes.astype(np.int32), x[items:]


def _percentiles(ms: list[float]) -> dict:
    ms = sorted(ms)
    pick = (lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 3)) if ms else (lambda q: None)
    return {"n": len(ms), "p50_ms": pick(0.5), "p99_ms": pick(0.99)}


def bench_filtered(a) -> dict:
    """Filtered search over a ScaNN index of `a.items` x `a.dim` holding condition codes: recall@k against
    exact filtered search and latency, head (ANN) and tail (exact) values apart, per setting."""
    from serve.index import BruteForce
    from serve.scann_index import ScaNNIndex

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    corpus, codes, queries = conditioned_corpus(a.items, a.filter_queries, a.dim, a.values, a.zipf,
                                                a.correlation, rng)
    sizes = np.bincount(codes, minlength=a.values)
    # Half the queries ask for a value as often as items hold it (the head), half for any value alike (the tail).
    conditions = np.where(rng.random(len(queries)) < 0.5, rng.choice(a.values, len(queries), p=sizes / a.items),
                          rng.integers(0, a.values, len(queries)))
    ids = np.arange(a.items, dtype=np.int64)
    gen_s, t0 = time.perf_counter() - t0, time.perf_counter()
    index = ScaNNIndex().index(corpus, ids).set_condition("interest", codes, a.values)
    build_s, t0 = time.perf_counter() - t0, time.perf_counter()
    exact = BruteForce().index(corpus, ids).set_condition("interest", codes, a.values)
    _, want = exact.search(queries, a.filter_k, conditions=conditions)
    reference_s = time.perf_counter() - t0
    _, unfiltered_want = exact.search(queries[:200], a.filter_k)
    _, unfiltered_got = index.search(queries[:200], a.filter_k)
    out = {"items": a.items, "dim": a.dim, "k": a.filter_k, "values": a.values, "zipf": a.zipf,
           "correlation": a.correlation, "queries": len(queries),
           "value_sizes": {"max": int(sizes.max()), "median": int(np.median(sizes)), "min": int(sizes.min()),
                           "values_under_1000": int((sizes < 1000).sum())},
           "index": {k: v for k, v in index.params().items() if k not in ("config", "condition")},
           "seconds": {"generate": round(gen_s, 1), "build": round(build_s, 1),
                       "exact_reference": round(reference_s, 1)},
           "unfiltered_recall": round(_recall(unfiltered_got, unfiltered_want), 4), "settings": []}
    print(json.dumps({k: v for k, v in out.items() if k != "settings"}), flush=True)
    lat = rng.choice(len(queries), min(a.latency_queries, len(queries)), replace=False)
    for exact_below in (int(v) for v in a.exact_below.split(",")):
        for overfetch in (float(v) for v in a.overfetch.split(",")):
            index.filter_settings.update(exact_below=exact_below, overfetch=overfetch)
            head = sizes[conditions] > exact_below
            index.filter_stats = type(index.filter_stats)()
            _, got = index.search(queries, a.filter_k, conditions=conditions)
            per_query = _recalls(got, want)
            per_value = {v: per_query[conditions == v].mean() for v in np.unique(conditions[head])}
            stats = dataclasses.asdict(index.filter_stats)
            single = {"head": [], "tail": []}
            for i in lat:
                t = time.perf_counter()
                index.search(queries[i:i + 1], a.filter_k, conditions=conditions[i:i + 1])
                single["head" if head[i] else "tail"].append((time.perf_counter() - t) * 1000)
            batch = []
            for b in range(0, len(lat) - a.filter_batch + 1, a.filter_batch):
                rows = lat[b:b + a.filter_batch]
                t = time.perf_counter()
                index.search(queries[rows], a.filter_k, conditions=conditions[rows])
                batch.append((time.perf_counter() - t) * 1000)
            row = {"exact_below": exact_below, "overfetch": overfetch,
                   "head_values": int((sizes > exact_below).sum()),
                   "recall_head": round(float(per_query[head].mean()), 4) if head.any() else None,
                   "recall_tail": round(float(per_query[~head].mean()), 4) if (~head).any() else None,
                   "worst_head_value": (min(((round(float(r), 4), int(sizes[v])) for v, r in per_value.items()),
                                            default=None)),
                   "stats": stats, "single_head": _percentiles(single["head"]),
                   "single_tail": _percentiles(single["tail"]),
                   f"batch_{a.filter_batch}": _percentiles(batch), "load_avg_1m": round(os.getloadavg()[0], 1)}
            out["settings"].append(row)
            print(json.dumps(row), flush=True)
    single = []
    for i in lat[:200]:
        t = time.perf_counter()
        index.search(queries[i:i + 1], a.filter_k)
        single.append((time.perf_counter() - t) * 1000)
    out["single_unfiltered"] = _percentiles(single)
    return out


def _recalls(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per query: the share of the exact list's items (its -1 padding left out) that the search returned."""
    return np.array([len(set(x) & set(y) - {-1}) / max(1, len(set(y) - {-1}))
                     for x, y in zip(got.tolist(), want.tolist())])


def _recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(_recalls(got, want).mean())


def _summary(parts: list[dict]) -> dict:
    """Latency percentiles and QPS over the merged results of the client processes."""
    ms = sorted(x for p in parts for x in p["ms"])
    errors = [e for p in parts for e in p["errors"]]
    wall = max((p["end"] for p in parts), default=0.0) - min((p["start"] for p in parts), default=0.0)
    pick = (lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]) if ms else (lambda q: float("nan"))
    return {"requests": len(ms), "errors": len(errors), "error_examples": errors[:3], "seconds": round(wall, 2),
            "qps": round(len(ms) / wall, 1) if wall > 0 else None, "p50_ms": round(pick(0.5), 2),
            "p99_ms": round(pick(0.99), 2), "mean_ms": round(statistics.fmean(ms), 2) if ms else None}


def drive_threads(port: int, clients: int, requests: int, duration: float, num_users: int, k: int,
                  seed: int) -> dict:
    """http.client keep-alive connections, one thread each. Returns {"ms", "errors", "start", "end", "cpu_s"}."""
    latencies, errors, lock = [], [], threading.Lock()
    _ready()
    start, cpu = time.time(), time.process_time()
    stop_at, counter = time.monotonic() + duration, iter(range(requests))

    def client(i: int):
        rng = np.random.default_rng([seed, i])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < stop_at:
            with lock:
                if next(counter, None) is None:
                    break
            body = json.dumps({"user_id": int(rng.integers(num_users)), "k": k}).encode()
            t0 = time.perf_counter()
            conn.request("POST", "/v1/topk", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            dt = (time.perf_counter() - t0) * 1000
            ok = resp.status == 200 and len(json.loads(data)["items"]) == k
            with lock:
                (latencies if ok else errors).append(dt if ok else resp.status)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"ms": latencies, "errors": errors, "start": start, "end": time.time(),
            "cpu_s": time.process_time() - cpu}


def _ready() -> None:
    """Tells the parent this client is set up and waits for its go, so all clients start together."""
    print("ready", flush=True)
    sys.stdin.readline()


class _Conn:
    """One keep-alive connection of the socket client: sends a request, parses its response."""
    HEAD = (b"POST /v1/topk HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n")

    def __init__(self, port: int):
        self.port, self.sock = port, socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf, self.t0, self.end, self.status, self.length = b"", 0.0, -1, 0, 0

    def send(self, user: int, k: int) -> None:
        body = b'{"user_id":%d,"k":%d}' % (user, k)
        self.buf, self.end, self.t0 = b"", -1, time.perf_counter()
        self.sock.sendall(self.HEAD % (self.port, len(body)) + body)

    def receive(self) -> bytes | None:
        """Reads what arrived; the body once the whole response is in, else None. Raises on a closed socket."""
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the server closed a keep-alive connection")
        self.buf += data
        if self.end < 0:
            split = self.buf.find(b"\r\n\r\n")
            if split < 0:
                return None
            lines = self.buf[:split].split(b"\r\n")
            self.status = int(lines[0].split()[1])
            sizes = [int(v) for n, _, v in (ln.partition(b":") for ln in lines[1:]) if n.lower() == b"content-length"]
            if len(sizes) != 1:
                raise ConnectionError(f"a response without one Content-Length: {lines[:4]}")
            self.length, self.end = sizes[0], split + 4 + sizes[0]
        return self.buf[self.end - self.length:self.end] if len(self.buf) >= self.end else None


def drive_sockets(port: int, clients: int, requests: int, duration: float, num_users: int, k: int,
                  seed: int) -> dict:
    """`clients` keep-alive connections served by one selector loop (one request in flight on each).
    Returns {"ms", "errors", "start", "end", "cpu_s"}."""
    users = np.random.default_rng(seed).integers(num_users, size=max(requests, 1)).tolist()
    sel, ms, errors = selectors.DefaultSelector(), [], []
    conns = [_Conn(port) for _ in range(clients)]
    _ready()
    start, cpu = time.time(), time.process_time()
    stop_at, sent = time.monotonic() + duration, 0
    for c in conns[:requests]:
        sel.register(c.sock, selectors.EVENT_READ, c)
        c.send(users[sent], k)
        sent += 1
    while sel.get_map():
        for key, _ in sel.select(timeout=30) or [(None, None)]:
            if key is None:
                raise TimeoutError("no response within 30 s")
            c = key.data
            body = c.receive()
            if body is None:
                continue
            dt = (time.perf_counter() - c.t0) * 1000
            ok = c.status == 200 and len(json.loads(body)["items"]) == k
            (ms if ok else errors).append(dt if ok else c.status)
            if sent < requests and time.monotonic() < stop_at:
                c.send(users[sent], k)
                sent += 1
            else:
                sel.unregister(c.sock)
    end, cpu = time.time(), time.process_time() - cpu
    for c in conns:
        c.sock.close()
    return {"ms": ms, "errors": errors, "start": start, "end": end, "cpu_s": cpu}


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all threads) from /proc; None off Linux."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(port: int, server_pid: int, a, num_users: int) -> dict:
    """One load run: `a.client_procs` client processes sharing `a.clients` connections and `a.requests`."""
    procs = max(1, min(a.client_procs, a.clients))
    conns = [a.clients // procs + (i < a.clients % procs) for i in range(procs)]
    reqs = [a.requests // procs + (i < a.requests % procs) for i in range(procs)]
    children = [subprocess.Popen([sys.executable, __file__, "--drive", str(port), "--client", a.client,
                                  "--clients", str(c), "--requests", str(r), "--duration", str(a.duration),
                                  "--num-users", str(num_users), "--k", str(a.k), "--seed", str(i)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for i, (c, r) in enumerate(zip(conns, reqs))]
    for ch in children:   # all connected: start them together
        if ch.stdout.readline().strip() != "ready":
            raise RuntimeError("a client process failed to start")
    server0 = _cpu_seconds(server_pid)
    for ch in children:
        ch.stdin.write("go\n")
        ch.stdin.flush()
    parts = [json.loads(ch.communicate(timeout=a.duration + 120)[0].strip().splitlines()[-1]) for ch in children]
    server1 = _cpu_seconds(server_pid)
    out = _summary(parts)
    n = max(out["requests"] + out["errors"], 1)
    # The clients' own CPU over their load loops (not their interpreter start-up); the server's over the run.
    out["server_cpu_ms_per_request"] = None if server0 is None else round(1000 * (server1 - server0) / n, 3)
    out["client_cpu_ms_per_request"] = round(1000 * sum(p["cpu_s"] for p in parts) / n, 3)
    out["load_avg_1m"] = round(os.getloadavg()[0], 1)
    return out


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not become healthy within {timeout:.0f}s")


def prepare(a, tmp: pathlib.Path) -> tuple[pathlib.Path, int, dict]:
    """The run directory (with its export), its number of users and the index report: built in `a.keep`
    (or a temporary directory), or reused from `a.keep` when it holds one of the same size."""
    work = pathlib.Path(a.keep) if a.keep else tmp
    meta_path = work / "bench.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (meta["items"], meta["dim"]) == (a.items, a.dim):
            return work / "run", meta["num_users"], {**meta["index"], "reused": str(work)}
    run_dir = work / "run"
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists without {meta_path.name} (an interrupted build?); remove {work}")
    run_dir.mkdir(parents=True)
    version, num_users = make_run(run_dir, a.dim)
    index = build_index(a.items, a.dim, run_dir / "export" / version, version, a.recall_queries)
    meta_path.write_text(json.dumps({"items": a.items, "dim": a.dim, "num_users": num_users, "index": index}))
    return run_dir, num_users, index


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clients", type=int, default=16, help="concurrent keep-alive connections (closed loop: "
                   "each sends its next request when the last is answered)")
    p.add_argument("--client", choices=("sockets", "threads"), default="sockets", help="load generator")
    p.add_argument("--client-procs", type=int, default=1, help="client processes sharing the connections")
    p.add_argument("--requests", type=int, default=10000, help="stop after this many requests")
    p.add_argument("--duration", type=float, default=60.0, help="stop after this many seconds")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeat", type=int, default=1, help="load runs against the same server")
    p.add_argument("--recall-queries", type=int, default=500)
    p.add_argument("--keep", default=None, help="directory to build the run and index in, or reuse them from")
    p.add_argument("--server-repo", default=str(REPO), help="checkout whose `python -m serve` is measured")
    p.add_argument("--server-args", default="", help="extra key=value arguments of `python -m serve`")
    p.add_argument("--filtered", action="store_true", help="measure filtered search in process (no server)")
    p.add_argument("--values", type=int, default=100, help="--filtered: condition values")
    p.add_argument("--zipf", type=float, default=1.5, help="--filtered: exponent of the values' sizes")
    p.add_argument("--correlation", type=float, default=0.5, help="--filtered: share of items taking their "
                   "cluster's value")
    p.add_argument("--filter-k", type=int, default=20, help="--filtered: k")
    p.add_argument("--exact-below", default="50000", help="--filtered: comma-separated exact_below settings")
    p.add_argument("--overfetch", default="4", help="--filtered: comma-separated overfetch settings")
    p.add_argument("--filter-queries", type=int, default=2000, help="--filtered: queries for the recall")
    p.add_argument("--latency-queries", type=int, default=1000, help="--filtered: single queries timed")
    p.add_argument("--filter-batch", type=int, default=64, help="--filtered: queries per timed batch")
    p.add_argument("--drive", type=int, default=None, help=argparse.SUPPRESS)   # internal: client process
    p.add_argument("--num-users", type=int, default=200, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.drive is not None:
        drive = drive_sockets if a.client == "sockets" else drive_threads
        print(json.dumps(drive(a.drive, a.clients, a.requests, a.duration, a.num_users, a.k, a.seed)))
        return
    if a.filtered:
        print(json.dumps(bench_filtered(a), indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, num_users, index = prepare(a, pathlib.Path(tmp))
        print(json.dumps({"index": index}), flush=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        server = subprocess.Popen([sys.executable, "-m", "serve", f"run_dir={run_dir}", "host=127.0.0.1",
                                   f"port={port}", "log_level=warning", *a.server_args.split()],
                                  cwd=a.server_repo, env=env)
        try:
            t0 = time.perf_counter()
            wait_healthy(port, server)
            startup = time.perf_counter() - t0
            runs = []
            for _ in range(a.repeat):
                runs.append(run_load(port, server.pid, a, num_users))
                print(json.dumps(runs[-1]), flush=True)
        finally:
            server.terminate()
            server.wait(30)
    median = sorted(runs, key=lambda r: r["qps"] or 0)[len(runs) // 2]
    print(json.dumps({"items": a.items, "dim": a.dim, "clients": a.clients, "client": a.client,
                      "client_procs": a.client_procs, "k": a.k, "server_startup_s": round(startup, 1),
                      "index": index, "load": median, **({"runs": runs} if len(runs) > 1 else {})}, indent=2))


if __name__ == "__main__":
    main()
