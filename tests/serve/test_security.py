"""Index directories are data, never code, and the server's write routes can be locked down.

A crafted ScaNN index directory holding a `scann/scann_docids.pkl` whose unpickling creates a directory (with a
manifest rewritten to match it, as anyone can) is refused by `load_index`, server start-up, `POST
/v1/index:reload`, `serve.candidates` and `serve.trending`, and the marker directory is never created: nothing
is unpickled. Reloads only reach directories under the reload root, with one answer for everything outside it;
an `auth_token` guards the write routes; an export killed mid-write leaves nothing behind for long.
"""
import fcntl
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from serve.__main__ import ConfigError, parse_args
from serve.manifest import IndexLoadError, load_index, manifest_json, sha256_file, write_index
from serve.scann_index import ScaNNIndex
from serve.server import create_app
from tests.helpers import REPO, smoke_cfg
from tests.serve.test_server import Client


class _Mkdir:
    """A pickle payload: loading it calls os.mkdir(path), a visible side effect of any unpickling."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _rewrite_manifest(index_dir, **changes) -> None:
    """Recomputes the manifest's file list and checksums (its own included) from what is on disk, as anyone
    able to write the directory can."""
    path = index_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    files = sorted(p for p in index_dir.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest["files"] = {p.relative_to(index_dir).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                         for p in files}
    manifest.update(changes)
    path.write_text(manifest_json(manifest))


def _craft(run, name: str, marker, **manifest_changes):
    """A copy of the run's ScaNN tree export, under the reload root, with a docids pickle that would create
    `marker` and a manifest that agrees with every file."""
    crafted = run["dir"] / "export" / name
    shutil.copytree(run["tree"], crafted)
    (crafted / "scann" / "scann_docids.pkl").write_bytes(pickle.dumps(_Mkdir(str(marker))))
    _rewrite_manifest(crafted, **manifest_changes)
    return crafted


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory (fresh towers checkpointed at step 3), its export (exact, 100 items), and the same
    embeddings as a ScaNN tree index (`scann/` files present) of the same model version."""
    from serve.export import export, validate
    from train.loop import write_untrained_run

    run_dir = tmp_path_factory.mktemp("run")
    ds, _, _ = write_untrained_run(smoke_cfg(), run_dir, step=3)
    out = export(validate({"run_dir": str(run_dir), "num_queries": 20, "batch_size": 16}))["out"]
    exact, manifest = load_index(out)
    tree = ScaNNIndex(brute_force_below=50).index(exact.embeddings(), exact.ids())
    tree_dir = write_index(tree, tmp_path_factory.mktemp("tree") / "idx", model_version=manifest["model_version"])
    assert (tree_dir / "scann" / "scann_assets.pbtxt").is_file()
    return {"dir": run_dir, "ds": ds, "out": out, "tree": tree_dir, "model_version": manifest["model_version"]}


@pytest.fixture(scope="module")
def client(run):
    c = Client(create_app(run["dir"], batch_sizes=(1, 8), warmup=False))
    yield c
    c.close()


def test_load_index_refuses_a_pickle_without_unpickling_it(run, tmp_path):
    marker = tmp_path / "pwned"
    crafted = _craft(run, "crafted-load", marker)
    with pytest.raises(IndexLoadError, match=r"scann/scann_docids.pkl"):
        load_index(crafted, model_version=run["model_version"])
    with pytest.raises(IndexLoadError, match=r"scann/scann_docids.pkl"):
        load_index(crafted)
    assert not marker.exists()


def test_the_scann_loader_itself_never_reads_the_docids_pickle(run, tmp_path):
    """`TopK.load` (no manifest checks) builds the searcher from ScaNN's assets; ids come from ids.npy."""
    from serve.index import TopK

    marker = tmp_path / "pwned"
    crafted = _craft(run, "crafted-topk", marker)
    index = TopK.load(crafted)
    assert not marker.exists()
    assert not index.is_exact and index.ids().tolist() == load_index(run["tree"])[0].ids().tolist()
    queries = index.embeddings()[:3]
    np.testing.assert_array_equal(index.search(queries, 5)[1], load_index(run["tree"])[0].search(queries, 5)[1])


def test_a_scann_assets_file_naming_paths_outside_its_directory_is_refused(run, tmp_path):
    """The assets list is read by ScaNN's C++ loader: only plain names of ScaNN's own files may appear in it."""
    crafted = run["dir"] / "export" / "crafted-assets"
    shutil.copytree(run["tree"], crafted)
    assets = crafted / "scann" / "scann_assets.pbtxt"
    assets.write_text(assets.read_text().replace('"dataset.npy"', f'"{crafted}/embeddings.npy"'))
    _rewrite_manifest(crafted)
    with pytest.raises(IndexLoadError, match="scann_assets.pbtxt names .*embeddings.npy"):
        load_index(crafted)


def test_server_start_up_refuses_the_pickle_without_unpickling_it(run, tmp_path):
    marker = tmp_path / "pwned"
    crafted = _craft(run, "crafted-start", marker)
    with pytest.raises(IndexLoadError, match="scann_docids.pkl"):
        create_app(run["dir"], crafted, batch_sizes=(1,), warmup=False)
    assert not marker.exists()


def test_candidates_refuse_the_pickle_without_unpickling_it(run, tmp_path):
    import serve.candidates as candidates

    marker = tmp_path / "pwned"
    crafted = _craft(run, "crafted-cand", marker)
    with pytest.raises(candidates.CandidatesError, match="scann_docids.pkl"):
        candidates.run({"run_dir": str(run["dir"]), "out": str(tmp_path / "c"), "progress": False,
                        "index_dir": str(crafted)})
    assert not marker.exists() and not (tmp_path / "c").exists()


def test_trending_refuses_the_pickle_without_unpickling_it(run, tmp_path):
    from serve.trending import refresh

    marker = tmp_path / "pwned"
    crafted = _craft(run, "crafted-trend", marker)
    with pytest.raises(IndexLoadError, match="scann_docids.pkl"):
        refresh({"run_dir": str(run["dir"]), "index_dir": str(crafted), "out": str(tmp_path / "o"), "top_n": 5,
                 "window_days": 30})
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_reload_refuses_the_pickle_and_checks_the_model_version_first(run, client, tmp_path):
    marker = tmp_path / "pwned"
    before = client.call("GET", "/healthz")[1]
    status, body = client.call("POST", "/v1/index:reload", {"index_dir": str(_craft(run, "crafted-rl", marker))})
    assert status == 422 and "scann_docids.pkl" in body["detail"], body
    assert not marker.exists()
    # Another model's index is refused from its manifest alone, before any other file is read.
    foreign = _craft(run, "crafted-foreign", marker, model_version="step9-000000000000")
    status, body = client.call("POST", "/v1/index:reload", {"index_dir": str(foreign)})
    assert status == 409 and "step9-000000000000" in body["detail"], body
    assert not marker.exists()
    (foreign / "embeddings.npy").unlink()
    status, body = client.call("POST", "/v1/index:reload", {"index_dir": str(foreign)})
    assert status == 409 and "step9-000000000000" in body["detail"], body
    assert client.call("GET", "/healthz")[1] == before


def test_reload_reaches_only_directories_under_the_reload_root(run, client, tmp_path):
    outside = write_index(load_index(run["out"])[0], tmp_path / "valid", model_version=run["model_version"])
    (run["dir"] / "export" / "link-out").symlink_to(outside, target_is_directory=True)
    (tmp_path / "file").write_text("x")
    answers = [client.call("POST", "/v1/index:reload", {"index_dir": path}) for path in (
        str(outside),                                       # a valid index of the right model, outside
        str(tmp_path / "missing"),                          # does not exist
        str(tmp_path / "file"),                             # a file
        str(run["dir"] / "export" / "link-out"),            # a symlink inside pointing outside
        str(run["dir"] / "export" / ".." / "export" / ".." / "ckpt"),   # a path climbing out
        "/", "relative/../../..", "bad\u0000path")]
    assert {status for status, _ in answers} == {403}, answers
    assert len({body["detail"] for _, body in answers}) == 1, answers
    assert str(tmp_path) not in answers[0][1]["detail"] and "reload_root" in answers[0][1]["detail"]
    # Inside the root: absolute or relative to it, and errors may be specific.
    status, body = client.call("POST", "/v1/index:reload", {"index_dir": run["out"].name})
    assert status == 200 and body["index_dir"] == str(run["out"].resolve()), body
    status, body = client.call("POST", "/v1/index:reload", {"index_dir": str(run["dir"] / "export" / "nope")})
    assert status == 422 and "not a directory" in body["detail"]


def test_reload_root_is_configurable(run, tmp_path):
    elsewhere = write_index(load_index(run["out"])[0], tmp_path / "root" / "v1", model_version=run["model_version"])
    c = Client(create_app(run["dir"], batch_sizes=(1,), warmup=False, reload_root=tmp_path / "root"))
    try:
        assert c.call("POST", "/v1/index:reload", {"index_dir": str(elsewhere)})[0] == 200
        assert c.call("POST", "/v1/index:reload", {"index_dir": str(run["out"])})[0] == 403
    finally:
        c.close()


def test_the_auth_token_guards_the_write_routes_only(run):
    c = Client(create_app(run["dir"], batch_sizes=(1,), warmup=False, auth_token="s3cret-token"))
    good, bad = {"Authorization": "Bearer s3cret-token"}, {"Authorization": "Bearer s3cret-tokem"}
    item_id = int(run["ds"].item_vocab.raw_ids[0])
    dim = load_index(run["out"])[0].dim
    writes = [("POST", "/v1/items", {"items": [{"id": 10**9, "embedding": [0.1] * dim}]}),
              ("DELETE", "/v1/items", {"ids": [item_id]}),
              ("POST", "/v1/index:reload", {"index_dir": str(run["out"])})]
    try:
        for method, path, body in writes:
            for headers in (None, bad, {"Authorization": "s3cret-token"}, {"Authorization": "Basic s3cret-token"}):
                status, reply = c.call(method, path, body, headers=headers)
                assert status == 401 and reply == {"detail": "missing or wrong bearer token"}, (path, headers)
            # Refused before the body is read: a malformed body still gets 401, not 422.
            assert c.call(method, path, raw=b"{", headers=bad)[0] == 401
            assert c.call(method, path, body, headers=good)[0] == 200, path
        assert c.call("POST", "/v1/topk", {"user_id": 1, "k": 3})[0] == 200
        assert c.call("GET", "/healthz")[0] == 200 and c.call("GET", "/metrics")[0] == 200
        status, spec = c.call("GET", "/openapi.json")
        assert status == 200 and spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert spec["paths"]["/v1/items"]["post"]["security"] == [{"bearer": []}]
        assert "security" not in spec["paths"]["/v1/topk"]["post"]
    finally:
        c.close()


def test_cli_reads_the_token_from_the_environment_and_never_echoes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TWOTOWER_AUTH_TOKEN", "from-env")
    c = parse_args([f"run_dir={tmp_path}"])
    assert c["auth_token"] == "from-env" and c["reload_root"] is None and c["host"] == "127.0.0.1"
    assert parse_args([f"run_dir={tmp_path}", "auth_token=override"])["auth_token"] == "override"
    monkeypatch.delenv("TWOTOWER_AUTH_TOKEN")
    assert parse_args([f"run_dir={tmp_path}"])["auth_token"] is None
    monkeypatch.setenv("TWOTOWER_AUTH_TOKEN", "")
    with pytest.raises(ConfigError, match="^auth_token: must be a non-empty string or null") as e:
        parse_args([f"run_dir={tmp_path}"])
    assert "from-env" not in str(e.value)
    with pytest.raises(ConfigError, match="^reload_root=.*no such directory"):
        parse_args([f"run_dir={tmp_path}", f"reload_root={tmp_path}/missing", "auth_token=x"])


_SLOW_WRITER = """
import sys, time
import numpy as np
from serve.index import BruteForce
from serve.manifest import write_index

def slow_save(self, directory):
    print("saving", flush=True)
    time.sleep(600)

BruteForce._backend_save = slow_save
write_index(BruteForce().index(np.eye(4, dtype=np.float32), np.arange(4)), sys.argv[1], model_version="v")
"""


def test_an_export_killed_mid_write_leaves_no_temporary_directory_behind(tmp_path):
    from serve.index import BruteForce

    out = tmp_path / "idx"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(out)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "saving"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    stale = [p.name for p in tmp_path.iterdir()]
    assert len(stale) == 1 and stale[0].startswith(".idx.tmp-"), stale
    # A writer still at work holds a lock on its temporary directory: it is left alone.
    live = tmp_path / ".idx.tmp-live0000"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    (tmp_path / ".idx.old-deadbeef").mkdir()   # killed between the two renames of a replace
    try:
        write_index(BruteForce().index(np.eye(4, dtype=np.float32), np.arange(4)), out, model_version="v")
        assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.tmp-live0000", "idx"]
    finally:
        os.close(fd)
    assert len(load_index(out)[0]) == 4


def test_trending_posts_to_a_token_guarded_server_with_the_token_from_the_environment(run, monkeypatch):
    import urllib.error

    from serve.trending import refresh

    c = Client(create_app(run["dir"], batch_sizes=(1,), warmup=False, auth_token="tok"))
    cfg = {"run_dir": str(run["dir"]), "server": f"http://127.0.0.1:{c.port}", "top_n": 3, "window_days": 30}
    try:
        monkeypatch.delenv("TWOTOWER_AUTH_TOKEN", raising=False)
        with pytest.raises(urllib.error.HTTPError, match="401"):
            refresh(cfg)
        monkeypatch.setenv("TWOTOWER_AUTH_TOKEN", "tok")
        assert refresh(cfg)["server"]["upserted"] == 3
    finally:
        c.close()
