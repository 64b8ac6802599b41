"""Serving benchmark: index build time, ANN recall@10 against exact search, and HTTP top-k latency and QPS.

Builds a ScaNN index over a synthetic clustered corpus (default 1M x 64), writes it as an export of a tiny
run (fresh towers of `+debug=smoke` with output_dim = the corpus dim; the towers only embed the query, the
corpus is synthetic), starts `python -m serve` on 127.0.0.1 in a subprocess, and drives it from another
process with concurrent keep-alive clients for a bounded number of requests and seconds. All traffic goes to
127.0.0.1.

  python scripts/bench_serve.py                          # 1M x 64, 8 clients, up to 5000 requests / 60 s
  python scripts/bench_serve.py --items 200000 --clients 16 --requests 3000
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
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
    from serve.index import BruteForce, ScaNNIndex
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


def drive(port: int, clients: int, requests: int, duration: float, num_users: int, k: int) -> dict:
    """Concurrent keep-alive clients on 127.0.0.1:port; returns latency percentiles and QPS."""
    latencies, errors, lock = [], [], threading.Lock()
    stop_at, counter = time.perf_counter() + duration, iter(range(requests))

    def client(seed: int):
        rng = np.random.default_rng(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.perf_counter() < stop_at:
            with lock:
                if next(counter, None) is None:
                    break
            body = json.dumps({"user_id": int(rng.integers(num_users)), "k": k}).encode()
            t0 = time.perf_counter()
            conn.request("POST", "/v1/topk", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            dt = time.perf_counter() - t0
            with lock:
                (latencies if resp.status == 200 else errors).append(dt if resp.status == 200 else resp.status)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = sorted(x * 1000 for x in latencies)
    pick = (lambda p: ms[min(len(ms) - 1, int(p * len(ms)))]) if ms else (lambda p: float("nan"))
    return {"requests": len(ms), "errors": len(errors), "seconds": round(wall, 2),
            "qps": round(len(ms) / wall, 1), "p50_ms": round(pick(0.5), 2), "p99_ms": round(pick(0.99), 2),
            "mean_ms": round(statistics.fmean(ms), 2) if ms else None}


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=5000, help="stop after this many requests")
    p.add_argument("--duration", type=float, default=60.0, help="stop after this many seconds")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--recall-queries", type=int, default=500)
    p.add_argument("--drive", type=int, default=None, help=argparse.SUPPRESS)   # internal: client process
    p.add_argument("--num-users", type=int, default=200, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.drive is not None:
        print(json.dumps(drive(a.drive, a.clients, a.requests, a.duration, a.num_users, a.k)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = pathlib.Path(tmp) / "run"
        run_dir.mkdir()
        version, num_users = make_run(run_dir, a.dim)
        index = build_index(a.items, a.dim, run_dir / "export" / version, version, a.recall_queries)
        print(json.dumps({"index": index}), flush=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        server = subprocess.Popen([sys.executable, "-m", "serve", f"run_dir={run_dir}", "host=127.0.0.1",
                                   f"port={port}", "log_level=warning"], cwd=REPO, env=env)
        try:
            t0 = time.perf_counter()
            wait_healthy(port, server)
            startup = time.perf_counter() - t0
            client = subprocess.run([sys.executable, __file__, "--drive", str(port), "--clients", str(a.clients),
                                     "--requests", str(a.requests), "--duration", str(a.duration),
                                     "--num-users", str(num_users), "--k", str(a.k)],
                                    capture_output=True, text=True, timeout=a.duration + 120)
            load = json.loads(client.stdout.strip().splitlines()[-1])
        finally:
            server.terminate()
            server.wait(30)
    print(json.dumps({"items": a.items, "dim": a.dim, "clients": a.clients, "k": a.k,
                      "server_startup_s": round(startup, 1), "index": index, "load": load}, indent=2))


if __name__ == "__main__":
    main()
