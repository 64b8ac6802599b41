"""Export and the on-disk index format: a checkpoint written by the training code exports to an index that
loads and answers exactly; recall tuning; the CLI's failure exits; checksums refuse damaged directories."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from serve.export import ConfigError, export, tune_recall, validate
from serve.index import BruteForce
from serve.scann_index import ScaNNIndex
from serve.manifest import IndexLoadError, load_index, manifest_json, write_index
from tests.helpers import CONFIGS, REPO, smoke_cfg
from tests.serve.test_index import clustered, reference_topk
from towers.restore import load_trained


def export_cfg(*overrides: str):
    """The composed config of `python -m serve.export <overrides>`."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="export", overrides=list(overrides))


def _cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "serve.export", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory written by the training code (artifacts + an Orbax checkpoint of a fresh state at step
    3; training steps would only add time), the state, and a CLI export already running against it."""
    from train.loop import write_untrained_run

    run_dir = tmp_path_factory.mktemp("run")
    ds, model, state = write_untrained_run(smoke_cfg(), run_dir, step=3)
    # min_recall above 1 can never be met: the CLI must fail and write nothing. It runs while the tests below do.
    failing = _cli(f"run_dir={run_dir}", "min_recall=1.01", f"out={run_dir}/never", "num_queries=20")
    yield {"dir": run_dir, "ds": ds, "model": model, "state": state, "failing": failing}
    failing.kill()


def test_export_writes_a_loadable_index_that_equals_exact_search(run):
    from towers.embed import embed_items
    from towers.two_tower import feature_names

    summary = export(export_cfg(f"run_dir={run['dir']}", "batch_size=4", "num_queries=50"))
    version = load_trained(run["dir"]).model_version   # step + hash of config, parameters and vocabularies
    assert re.fullmatch(r"step3-[0-9a-f]{12}", version)
    assert summary["out"] == run["dir"] / "export" / version
    index, manifest = load_index(summary["out"], model_version=version)
    ds = run["ds"]
    assert manifest["num_items"] == len(index) == ds.num_items and manifest["embedding_dim"] == 8
    assert manifest["distance"] == "dot_product" and manifest["step"] == 3 and manifest["id_kind"] == "int"
    assert manifest["recall"]["value"] == manifest["ann_recall@10"] == 1.0 and index.is_exact
    assert set(manifest["files"]) == {"ids.npy", "embeddings.npy", "index.json"}
    np.testing.assert_array_equal(index.ids(), ds.item_vocab.raw_ids)
    # The stored vectors are the item tower's output for the checkpointed parameters (chunked with padding).
    graphdef, _ = __import__("flax").nnx.split(run["model"])
    state, names = run["state"], feature_names(run["model"])[1]
    direct = embed_items(graphdef, state["params"], state["tables"].get("item"), np.arange(ds.num_items),
                         {k: ds.item_features[k] for k in names})
    np.testing.assert_allclose(index.embeddings(), direct, rtol=1e-5, atol=1e-6)
    assert manifest["normalized"] == bool(np.allclose(np.linalg.norm(direct, axis=1), 1, atol=1e-3))
    queries = np.random.default_rng(0).normal(size=(7, 8)).astype(np.float32)
    exclude = [ds.item_vocab.raw_ids[:j].tolist() for j in range(7)]
    scores, got = index.search(queries, 10, exclude=exclude)
    want_scores, want = reference_topk(queries, index.embeddings(), index.ids(), 10, exclude)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


def test_cli_fails_loudly_below_min_recall(run):
    out, err = run["failing"].communicate(timeout=120)
    assert run["failing"].returncode == 1, err[-2000:]
    assert "export failed: ANN recall@10 = 1.0000 is below min_recall=1.01" in err
    assert not (run["dir"] / "never").exists()
    assert not [p for p in run["dir"].iterdir() if p.name.startswith(".never")]


def test_cli_unknown_key_exits_2_with_one_line():
    out, err = _cli("index.bogus=1", "run_dir=.").communicate(timeout=60)
    assert err.startswith("config error: index.bogus=1: unknown key (known: ") and len(err.splitlines()) == 1


def test_validate_names_the_bad_key(tmp_path):
    for raw, message in (({"index": {"bogus": 1}}, "index.bogus=1: unknown key"),
                         ({"min_recall": "high"}, "min_recall='high'"),
                         ({"run_dir": "/nonexistent/run"}, "run_dir='/nonexistent/run': no such directory"),
                         ({"run_dir": None}, "run_dir=None: is required"),
                         ({"index": {"reorder": 0}}, "index.reorder=0: must be > 0"),
                         ({"index": {"type": "faiss"}}, "index.type='faiss': must be scann or brute_force")):
        with pytest.raises(ConfigError, match=message):
            validate({"run_dir": str(tmp_path), **raw})
    assert validate(export_cfg(f"run_dir={tmp_path}", "index=brute_force")).index.type == "brute_force"


def test_tuning_raises_leaves_to_search_until_the_target_is_met():
    rng = np.random.default_rng(0)
    items, queries = clustered(5000, 16, rng), clustered(100, 16, rng)
    index = ScaNNIndex(brute_force_below=100, num_leaves_to_search=1).index(items, np.arange(5000))
    reference = BruteForce().index(items, np.arange(5000))
    untuned = tune_recall(index, reference, queries, 10, 0.97, tune=False)
    assert untuned["value"] < 0.97 and len(untuned["tried"]) == 1
    tuned = tune_recall(index, reference, queries, 10, 0.97, tune=True)
    assert tuned["value"] >= 0.97 and index.num_leaves_to_search > 1
    assert [t["num_leaves_to_search"] for t in tuned["tried"]][:3] == [1, 2, 4]
    _, exact = reference.search(queries, 10)
    _, got = index.search(queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), exact.tolist())]) == tuned["value"]


@pytest.fixture
def written(tmp_path):
    """A ScaNN tree index with string ids, written with its manifest."""
    rng = np.random.default_rng(1)
    index = ScaNNIndex(brute_force_below=100).index(clustered(600, 8, rng), [f"i{j}" for j in range(600)])
    out = write_index(index, tmp_path / "idx", model_version="step7-abc", extra={"recall": {"value": 0.99}})
    return index, out


def test_write_then_load_round_trip_and_atomic_replace(written, tmp_path):
    index, out = written
    loaded, manifest = load_index(out, model_version="step7-abc")
    assert not loaded.is_exact and manifest["index"]["mode"] == "tree_ah" and manifest["normalized"] is True
    assert any(name.startswith("scann/") for name in manifest["files"])
    queries = clustered(5, 8, np.random.default_rng(2))
    (loaded_scores, loaded_ids), (scores, ids) = loaded.search(queries, 10), index.search(queries, 10)
    np.testing.assert_array_equal(loaded_ids, ids)
    np.testing.assert_allclose(loaded_scores, scores, rtol=1e-6)
    index.delete(["i0"])
    write_index(index, out, model_version="step8-def")  # replaces the old index directory in one rename
    assert load_index(out)[1]["num_items"] == 599 and sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError, match="not an index directory"):
        write_index(index, tmp_path / "other", model_version="x")
    with pytest.raises(IndexLoadError, match="not step9"):
        load_index(out, model_version="step9")


def _flip_byte(path: pathlib.Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(out: pathlib.Path, seal: bool = True, **changes):
    """Changes manifest fields; `seal` recomputes its own checksum, so the checks behind it are reached."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(changes)
    (out / "manifest.json").write_text(manifest_json(manifest) if seal else json.dumps(manifest))


@pytest.mark.parametrize("damage,message", [
    (lambda d: _flip_byte(d / "embeddings.npy"), "embeddings.npy does not match its sha256"),
    (lambda d: _flip_byte(d / "scann" / "hashed_dataset.npy"), "hashed_dataset.npy does not match its sha256"),
    (lambda d: (d / "ids.npy").unlink(), r"missing \['ids.npy'\]"),
    (lambda d: (d / "ids.npy").write_bytes((d / "ids.npy").read_bytes()[:-8]), "ids.npy has .* bytes"),
    (lambda d: (d / "manifest.json").unlink(), "has no manifest.json"),
    (lambda d: (d / "manifest.json").write_text("{\"format_version\": 1,"), "not valid JSON"),
    (lambda d: _edit_manifest(d, num_items=601), "the manifest says .*'num_items': 601"),
    (lambda d: _edit_manifest(d, embedding_dim=16), "the manifest says .*'embedding_dim': 16"),
    (lambda d: _edit_manifest(d, files={}), "files its manifest does not list"),
    (lambda d: _edit_manifest(d, format_version=3), "format_version 3"),
    (lambda d: _edit_manifest(d, seal=False, created_utc="2020-01-01T00:00:00+00:00"),
     "does not match its own manifest_sha256"),
    (lambda d: (d / "stray.npy").write_bytes(b"x"), r"holds \['stray.npy'\], which a scann index never has"),
    (lambda d: (d / "scann" / "dp_norms.npy").write_bytes(b"x"), r"does not list: \['scann/dp_norms.npy'\]"),
    (lambda d: shutil.rmtree(d), "is not a directory"),
])
def test_damaged_directories_are_refused(written, damage, message):
    _, out = written
    damage(out)
    with pytest.raises(IndexLoadError, match=message):
        load_index(out)
