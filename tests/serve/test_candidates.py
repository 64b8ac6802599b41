"""Batch candidates: recall from the Parquet output equals `python -m eval`'s, a killed job resumes to the same
bytes, users with long histories still get k unseen items, ties are ordered, and bad jobs fail clearly."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

import serve.candidates as candidates
from serve.candidates import CandidatesError, Corpus, shard_path, topk_unseen
from serve.candidates.config import ConfigError, validate
from serve.candidates.search import seen_csr
from serve.index import BruteForce
from serve.scann_index import ScaNNIndex
from tests.helpers import REPO, smoke_cfg
from tests.serve.test_index import clustered


def make_run(root):
    """A run directory written by the training code (fresh towers checkpointed at step 3) and its export
    (an exact index: 100 items). Returns (run_dir, dataset)."""
    from serve.export import export, validate as export_validate
    from train.loop import write_untrained_run

    run_dir = root / "run"
    ds, _, _ = write_untrained_run(smoke_cfg(), run_dir, step=3)
    export(export_validate({"run_dir": str(run_dir), "num_queries": 20}))
    return run_dir, ds


def generate(run_dir, out, **overrides) -> dict:
    return candidates.run({"run_dir": str(run_dir), "out": str(out), "progress": False, **overrides})


def read_rows(out) -> list[dict]:
    """Every row of every shard, shards in name order."""
    return [row for path in sorted(out.glob("part-*.parquet")) for row in pq.read_table(path).to_pylist()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cand")
    run_dir, ds = make_run(root)
    # The command line, with its progress bar, runs while the in-process tests below do.
    cli = subprocess.Popen([sys.executable, "-m", "serve.candidates", f"run_dir={run_dir}", f"out={root}/cli", "k=7",
                            "num_shards=2"], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield SimpleNamespace(run=run_dir, ds=ds, root=root, cli=cli)
    cli.kill()


def _csr_rows(indptr, items, row):
    return items[indptr[row]:indptr[row + 1]]


def test_recall_from_parquet_equals_the_eval_report(tiny, tmp_path):
    from eval.config import EvaluateConfig
    from eval.run import run as evaluate

    c = EvaluateConfig(run_dir=str(tiny.run), ks=[20], out_dir=str(tmp_path / "eval"), plots=False)
    c.ann.enabled, c.baselines.most_popular, c.baselines.ease = False, False, False
    evaluate(c)
    reported = json.loads((tmp_path / "eval" / "metrics.json").read_text())["methods"]["model"]["recall@20"]
    ds, raw_items = tiny.ds, tiny.ds.item_vocab.raw_ids
    (train_ptr, train_items), (test_ptr, test_items) = ds.train_csr(), ds.test_csr()
    for search in ("exact", "index"):
        summary = generate(tiny.run, tmp_path / search, k=25, num_shards=3, search=search)
        assert summary["written"] == 3 and summary["users"] == ds.num_users
        rows = read_rows(tmp_path / search)
        assert [r["user_id"] for r in rows] == [str(u) for u in ds.user_vocab.raw_ids]   # every user, once
        recalls = []
        for user, row in enumerate(rows):
            seen = set(raw_items[_csr_rows(train_ptr, train_items, user)].tolist())
            assert len(row["item_ids"]) == min(25, ds.num_items - len(seen)) == len(set(row["item_ids"]))
            assert not seen & set(row["item_ids"]) and row["scores"] == sorted(row["scores"], reverse=True)
            truth = set(raw_items[_csr_rows(test_ptr, test_items, user)].tolist())
            if truth:
                recalls.append(len(truth & set(row["item_ids"][:20])) / len(truth))
        assert np.mean(recalls) == pytest.approx(reported, abs=1e-12), search
    meta = pq.read_schema(sorted((tmp_path / "exact").glob("*.parquet"))[0]).metadata
    manifest = json.loads(next((tiny.run / "export").glob("*/manifest.json")).read_text())
    assert meta[b"twotower.model_version"] == manifest["model_version"].encode()
    assert meta[b"twotower.k"] == b"25" and len(meta[b"twotower.index_version"]) == 16


def test_a_killed_job_resumes_to_the_bytes_of_an_uninterrupted_one(tiny, tmp_path, monkeypatch):
    args = {"k": 10, "num_shards": 4, "chunk_users": 16}
    full, part = tmp_path / "full", tmp_path / "part"
    generate(tiny.run, full, **args)
    for shard in (0, 2):                              # a fan-out that ran two shards of four
        generate(tiny.run, part, shard_index=shard, **args)
    killed = shard_path(part, 1, 4)                   # shard 1 was SIGKILLed half-way through its file
    (part / f".{killed.name}.tmp-0badf00d").write_bytes(shard_path(full, 1, 4).read_bytes()[:3000])
    real_chunk_table, calls = candidates.chunk_table, []

    def crash_on_second_chunk(*a, **kw):              # shard 3 dies after writing one row group
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_chunk_table(*a, **kw)

    monkeypatch.setattr(candidates, "chunk_table", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        generate(tiny.run, part, shard_index=3, **args)
    monkeypatch.undo()
    summary = generate(tiny.run, part, **args)
    assert (summary["skipped"], summary["written"]) == (2, 2)
    names = sorted(p.name for p in part.iterdir())
    assert names == sorted(p.name for p in full.iterdir()) and len(names) == 4   # no temporary file is left
    for name in names:
        assert (part / name).read_bytes() == (full / name).read_bytes(), name
    users = [r["user_id"] for r in read_rows(part)]
    assert len(users) == len(set(users)) == tiny.ds.num_users
    with pytest.raises(CandidatesError, match="written by another job .*twotower.k: '10' there, '11' now"):
        generate(tiny.run, part, **{**args, "k": 11})
    with pytest.raises(CandidatesError, match="a shard of a 4-shard job, but num_shards=3"):
        generate(tiny.run, part, **{**args, "num_shards": 3})


def test_validation_items_count_as_seen_like_in_the_test_evaluation(tmp_path):
    from serve.export import export, validate as export_validate
    from train.loop import write_untrained_run

    run_dir = tmp_path / "run"
    ds, _, _ = write_untrained_run(smoke_cfg("data.valid_fraction=0.3"), run_dir, step=3)
    export(export_validate({"run_dir": str(run_dir), "num_queries": 20}))
    assert ds.valid is not None and len(ds.valid) > 0
    generate(run_dir, tmp_path / "out", k=ds.num_items)        # k = the corpus: every unseen item is returned
    raw_items = ds.item_vocab.raw_ids
    for user, row in enumerate(read_rows(tmp_path / "out")):
        seen = {split: set(raw_items[_csr_rows(*ds.split_csr(split), user)].tolist()) for split in ("train", "valid")}
        assert not (seen["train"] | seen["valid"]) & set(row["item_ids"]), user
        assert len(row["item_ids"]) == ds.num_items - len(seen["train"] | seen["valid"])
    generate(run_dir, tmp_path / "train_only", k=ds.num_items, exclude_splits=["train"])
    assert any(len(r["item_ids"]) > len(d["item_ids"])
               for r, d in zip(read_rows(tmp_path / "train_only"), read_rows(tmp_path / "out")))


def test_users_file_unknown_ids_fail_by_default_and_are_skipped_on_request(tiny, tmp_path):
    raw = tiny.ds.user_vocab.raw_ids
    users = tmp_path / "users.txt"
    users.write_text(f"{raw[5]}\n\n{raw[3]}\nghost-1\n{raw[5]}\n-42\nghost-2\n")
    with pytest.raises(CandidatesError, match=r"3 of 6 ids are not users .*\['ghost-1', 'ghost-2', '-42'\]"):
        generate(tiny.run, tmp_path / "a", users=str(users), k=5)
    assert not (tmp_path / "a").exists()
    generate(tiny.run, tmp_path / "b", users=str(users), k=5, skip_unknown_users=True)
    assert [r["user_id"] for r in read_rows(tmp_path / "b")] == [str(raw[3]), str(raw[5])]


def test_a_missing_or_mismatched_index_is_refused(tiny, tmp_path):
    from serve.manifest import write_index

    with pytest.raises(CandidatesError, match="index_dir=.*nowhere.* is not a directory"):
        generate(tiny.run, tmp_path / "a", index_dir=str(tmp_path / "nowhere"))
    emb = np.eye(tiny.ds.num_items, 8, dtype=np.float32)
    other = write_index(BruteForce().index(emb, tiny.ds.item_vocab.raw_ids), tmp_path / "other",
                        model_version="step9-0123456789ab")
    with pytest.raises(CandidatesError, match="holds embeddings of model step9-0123456789ab, not step3-"):
        generate(tiny.run, tmp_path / "b", index_dir=str(other))
    with pytest.raises(CandidatesError, match="leaves_to_search=5.*this index is searched exactly"):
        generate(tiny.run, tmp_path / "c", leaves_to_search=5)


def test_config_errors_name_the_key(tiny):
    for raw, message in (({"k": 0}, "k=0: must be > 0"), ({"shard_index": 4, "num_shards": 4}, "shard_index=4"),
                         ({"search": "faiss"}, "search='faiss'"), ({"exclude_splits": ["seen"]}, "exclude_splits"),
                         ({"bogus": 1}, "bogus=1: unknown key"), ({"out": None}, "out=None: is required")):
        with pytest.raises(ConfigError, match=message):
            validate({"run_dir": str(tiny.run), "out": "x", **raw})
    result = subprocess.run([sys.executable, "-m", "serve.candidates", "bogus=1", f"run_dir={tiny.run}"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("config error: bogus=1: unknown key (known: ")
    assert len(result.stderr.splitlines()) == 1


def test_the_command_line_writes_the_same_rows_with_a_progress_bar(tiny):
    out, err = tiny.cli.communicate(timeout=300)
    assert tiny.cli.returncode == 0, err[-3000:]
    assert "users/s" in err
    generate(tiny.run, tiny.root / "lib", k=7, num_shards=2)
    assert read_rows(tiny.root / "cli") == read_rows(tiny.root / "lib")


# ------------------------------------------------------------------------------- the search, on its own
def _reference(queries, items, seen, k):
    """numpy float64 scores, seen items at -inf, ordered by score desc then slot asc; -1 past the eligible."""
    scores = queries.astype(np.float64) @ items.T.astype(np.float64)
    for r, s in enumerate(seen):
        scores[r, list(s)] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(len(items)), scores.shape), -scores), axis=1)[:, :k]
    return np.where(np.take_along_axis(scores, order, axis=1) > -np.inf, order, -1)


def _seen_lists(rng, num_users, num_items):
    counts = np.concatenate([[0, 3, num_items - 4, num_items], rng.integers(0, num_items, num_users - 4)])
    return [np.sort(rng.choice(num_items, c, replace=False)) for c in counts]


def test_users_with_more_seen_items_than_the_overfetch_get_exactly_k_unseen_items():
    rng = np.random.default_rng(0)
    items, queries = clustered(300, 8, rng, clusters=6), clustered(40, 8, rng, clusters=6)
    seen = _seen_lists(rng, 40, 300)
    # A real tree index (30 leaves) that scans every leaf and rescores everything: its ranking is exact, so the
    # result must equal the reference even though the first fetch (k + 2) is far shorter than most histories.
    index = ScaNNIndex(num_leaves=30, num_leaves_to_search=3, brute_force_below=10)
    corpus = Corpus(index.index(items, np.arange(300) * 10 + 7), "auto")
    assert not corpus.exact and not index.is_exact
    assert corpus.tune(leaves_to_search=99, reorder=3000) == {"leaves_to_search": 30, "reorder": 3000}
    indptr, slots = seen_csr([(np.cumsum([0] + [len(s) for s in seen]), np.concatenate(seen))],
                             np.arange(40), np.arange(300))
    scores, got, stats = topk_unseen(corpus, queries, 10, indptr, slots, overfetch=2, max_fetch=128)
    want = _reference(queries, items, seen, 10)
    np.testing.assert_array_equal(got, want)
    for r, s in enumerate(seen):
        n = min(10, 300 - len(s))
        assert (got[r, :n] >= 0).all() and (got[r, n:] == -1).all() and not set(got[r, :n]) & set(s)
        assert np.all(np.diff(scores[r, :n]) <= 0)
    assert stats.widened > 0 and stats.exact_fallback > 0 and stats.short == 2
    exact_scores, exact_got, _ = topk_unseen(Corpus(index, "exact"), queries, 10, indptr, slots)
    np.testing.assert_array_equal(exact_got, want)
    np.testing.assert_allclose(exact_scores[got >= 0], scores[got >= 0], rtol=1e-5)


@pytest.mark.parametrize("mode", ["exact", "index"])
def test_ties_are_broken_by_item_slot(mode):
    rng = np.random.default_rng(1)
    items = clustered(60, 4, rng)
    items[[7, 50, 3, 41]] = items[20]              # five items with one vector: equal scores
    query = items[20:21] * 2.0
    corpus = Corpus(BruteForce().index(items, np.arange(60)[::-1].copy()), mode)
    seen = [np.array([41])]
    indptr, slots = seen_csr([(np.array([0, 1]), np.array([41]))], np.array([0]), np.arange(60))
    scores, got, _ = topk_unseen(corpus, query, 6, indptr, slots, overfetch=0)
    assert got[0, :4].tolist() == [3, 7, 20, 50] and scores[0, 0] == scores[0, 3] > scores[0, 4]
    np.testing.assert_array_equal(got, _reference(query, items, seen, 6))
