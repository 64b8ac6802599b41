"""Condition codes in the serving index: filtered searches against a numpy reference, and the codes kept right
through upserts, deletes, a failed change's undo, save / load and the manifest."""
import json

import numpy as np
import pytest

from serve.index import BruteForce, ConditionValueError, MutationError
from serve.manifest import load_index, write_index
from serve.scann_index import ScaNNIndex
from tests.serve.test_index import clustered

GENRES = np.array(["Action", "Comedy", "Drama", "Horror", "Noir", "Sci-Fi"])


def _codes(rng, n: int, multihot: bool) -> np.ndarray:
    """Zipf-like codes of 6 values: int32[N], or int32[N, 3] with -1 padding."""
    p = 1.0 / np.arange(1, 7) ** 1.3
    codes = rng.choice(6, size=(n, 3) if multihot else n, p=p / p.sum()).astype(np.int32)
    if multihot:
        codes[rng.random((n, 3)) < 0.4] = -1
    return codes


def _holds(codes, value) -> np.ndarray:
    return (np.asarray(codes).reshape(len(codes), -1) == value).any(axis=1)


def reference(index, queries, k, conditions, exclude=None):
    """numpy over the index's own ids, vectors and codes: other values and exclusions at -inf, stable argsort."""
    ids, emb, codes = index.ids(), index.embeddings(), index.conditions()
    scores = queries.astype(np.float64) @ emb.T.astype(np.float64)
    for r, v in enumerate(conditions):
        scores[r, ~_holds(codes, v)] = -np.inf
        if exclude:
            scores[r, np.isin(ids, exclude[r])] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    return top, np.where(top > -np.inf, ids[order], -1)


def _check(index, queries, k, conditions, exclude=None):
    got_s, got = index.search(queries, k, exclude=exclude, conditions=conditions)
    want_s, want = reference(index, queries, k, conditions, exclude)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_s, want_s.astype(np.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("multihot", [False, True])
def test_brute_force_filtered_search_equals_the_reference(multihot):
    rng = np.random.default_rng(0)
    emb, ids = clustered(400, 8, rng), np.arange(400) * 3 + 7
    index = BruteForce().index(emb, ids).set_condition("genres", _codes(rng, 400, multihot), 6, values=GENRES)
    queries, conditions = clustered(30, 8, rng), rng.integers(0, 6, 30)
    exclude = [rng.choice(ids, 20, replace=False).tolist() for _ in range(30)]
    _check(index, queries, 10, conditions)
    _check(index, queries, 10, conditions, exclude)
    _check(index, queries, 250, conditions, exclude)   # values with fewer items pad their tails
    # Unfiltered searches are what they were.
    np.testing.assert_array_equal(index.search(queries, 10)[1], BruteForce().index(emb, ids).search(queries, 10)[1])


def test_scann_filtered_search_finds_the_exact_answer_for_head_and_tail_values():
    rng = np.random.default_rng(1)
    emb, ids = clustered(3000, 16, rng), np.arange(3000)
    # 24 of 55 leaves: what export's tuning would choose for recall@10 >= 0.95 unfiltered on this corpus.
    index = ScaNNIndex(brute_force_below=1000, num_leaves_to_search=24).index(emb, ids)
    index.set_condition("genres", _codes(rng, 3000, False), 6)
    index.filter_settings["exact_below"] = 300       # the head values go through the tree
    assert not index.is_exact
    queries, conditions = clustered(60, 16, rng), np.repeat(np.arange(6), 10)
    got_s, got = index.search(queries, 10, conditions=conditions)
    _, want = reference(index, queries, 10, conditions)
    codes = index.conditions()
    assert (got >= 0).all() and all(_holds(codes[row], v).all() for row, v in zip(got, conditions))
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), want.tolist())])
    assert recall >= 0.95, recall
    assert (np.diff(got_s, axis=1) <= 0).all()
    head = int((index._condition_lists().counts[conditions] > 300).sum())
    assert index.filter_stats.queries == 60 and index.filter_stats.ann == head > 0, index.filter_stats


class _LeafSpy:
    """Stands in for a ScaNN searcher and records the leaves each search probes."""

    def __init__(self, real):
        self.searcher, self._real, self.leaves = self, real.searcher, []

    def search_batched(self, q, k, pre, leaves, *args):
        self.leaves.append(leaves)
        return self._real.search_batched(q, k, pre, leaves, *args)


def test_scann_probes_more_leaves_for_rarer_values():
    rng = np.random.default_rng(9)
    emb = clustered(3000, 16, rng)
    codes = np.repeat(np.arange(3), [2000, 750, 250]).astype(np.int32)
    index = ScaNNIndex(brute_force_below=1000, num_leaves_to_search=4).index(emb, np.arange(3000))
    index.set_condition("genres", codes, 3)
    index.filter_settings["exact_below"] = 100
    index._searcher = spy = _LeafSpy(index._searcher)
    q = clustered(3, 16, rng)
    index.search(q, 5)
    for v in range(3):
        index.search(q[v:v + 1], 5, conditions=[v])
    share = np.array([2000, 750, 250]) / 3000
    assert spy.leaves[0] == 4 and spy.leaves[1:4] == np.ceil(4 * share ** -0.5).astype(int).tolist()


@pytest.mark.parametrize("multihot", [False, True])
def test_upserts_and_deletes_keep_each_items_codes(multihot):
    rng = np.random.default_rng(2)
    emb, ids = clustered(300, 8, rng), np.arange(300)
    codes = _codes(rng, 300, multihot)
    index = BruteForce().index(emb, ids).set_condition("genres", codes, 6)
    truth = {i: np.asarray(c).reshape(-1) for i, c in zip(ids.tolist(), codes)}
    # New items with their codes, replaced items with new codes, then replaced items keeping theirs.
    new_ids, new_codes = np.arange(300, 340), _codes(rng, 40, multihot)
    index.upsert(clustered(40, 8, rng), new_ids, conditions=new_codes)
    replaced, replaced_codes = np.array([3, 5, 301]), _codes(rng, 3, multihot)
    index.upsert(clustered(3, 8, rng), replaced, conditions=replaced_codes)
    index.upsert(clustered(2, 8, rng), np.array([7, 8]))
    truth.update({i: np.asarray(c).reshape(-1) for i, c in zip(new_ids.tolist() + replaced.tolist(),
                                                                list(new_codes) + list(replaced_codes))})
    index.delete(np.array([0, 1, 150, 299, 339]))
    for i in (0, 1, 150, 299, 339):
        del truth[i]
    got = index.conditions()
    assert got.ndim == (2 if multihot else 1)
    for i, c in zip(index.ids().tolist(), got.reshape(len(got), -1)):
        np.testing.assert_array_equal(c, truth[i])
    _check(index, clustered(20, 8, rng), 8, rng.integers(0, 6, 20))


def test_a_longer_multihot_row_widens_the_codes():
    rng = np.random.default_rng(3)
    index = BruteForce().index(clustered(50, 4, rng), np.arange(50))
    index.set_condition("tags", np.full((50, 2), -1, np.int32) + np.eye(50, 2, dtype=np.int32) * 2, 6)
    index.upsert(clustered(1, 4, rng), [50], conditions=[[1, 3, 4, 5]])
    assert index.conditions().shape == (51, 4)
    assert index.conditions()[50].tolist() == [1, 3, 4, 5] and index.conditions()[0].tolist() == [1, -1, -1, -1]
    assert index.search(clustered(1, 4, rng), 3, conditions=[5])[1].tolist() == [[50, -1, -1]]


class _FailingBackend(BruteForce):
    """Fails in the backend after the host arrays were changed (a subclass: does not replace BruteForce)."""

    def _backend_upsert(self, *args):
        raise RuntimeError("backend down")

    def _backend_delete(self, slots):
        raise RuntimeError("backend down")


def test_a_failed_change_puts_the_codes_back():
    rng = np.random.default_rng(4)
    index = _FailingBackend().index(clustered(100, 6, rng), np.arange(100))
    index.set_condition("genres", _codes(rng, 100, True), 6)
    queries, conditions = clustered(10, 6, rng), rng.integers(0, 6, 10)
    before_codes, before = index.conditions(), index.search(queries, 5, conditions=conditions)
    with pytest.raises(MutationError):   # new items beyond the capacity, and replaced ones
        index.upsert(clustered(30, 6, rng), np.arange(90, 120), conditions=np.full((30, 5), 2))
    with pytest.raises(MutationError):
        index.delete(np.arange(0, 100, 3))
    np.testing.assert_array_equal(index.conditions(), before_codes)
    for a, b in zip(index.search(queries, 5, conditions=conditions), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["brute_force", "scann"])
@pytest.mark.parametrize("multihot", [False, True])
def test_save_and_load_keep_the_codes_values_and_settings(backend, multihot, tmp_path):
    rng = np.random.default_rng(5)
    index = BruteForce() if backend == "brute_force" else ScaNNIndex(brute_force_below=100)
    index.index(clustered(400, 8, rng), np.array([f"m{i}" for i in range(400)]))
    index.set_condition("genres", _codes(rng, 400, multihot), 6, values=GENRES)
    index.filter_settings["exact_below"] = 50
    index.upsert(clustered(5, 8, rng), [f"new{i}" for i in range(5)], conditions=_codes(rng, 5, multihot))
    index.delete(["m0", "m7"])
    out = write_index(index, tmp_path / "idx", model_version="step1-abc")
    assert {"conditions.npy", "condition_values.npy"} <= set(json.loads((out / "manifest.json").read_text())["files"])
    loaded, manifest = load_index(out, model_version="step1-abc")
    assert manifest["index"]["condition"] == {"feature": "genres", "kind": "multihot" if multihot else "categorical",
                                              "size": 6, "values": True, "search": index.filter_settings}
    assert loaded.params() == index.params() and loaded.condition == index.condition
    np.testing.assert_array_equal(loaded.conditions(), index.conditions())
    np.testing.assert_array_equal(loaded.condition_values(), GENRES)
    queries, conditions = clustered(12, 8, rng), np.arange(12) % 6
    (got_s, got), (want_s, want) = (x.search(queries, 7, conditions=conditions) for x in (loaded, index))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-6, atol=1e-6)   # ScaNN rescores in its own order


def test_an_index_without_codes_saves_loads_and_refuses_conditions_as_before(tmp_path):
    rng = np.random.default_rng(6)
    index = BruteForce().index(clustered(50, 4, rng), np.arange(50))
    index.save(tmp_path / "old")
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["embeddings.npy", "ids.npy", "index.json"]
    assert "condition" not in json.loads((tmp_path / "old" / "index.json").read_text())
    loaded = BruteForce.load(tmp_path / "old")
    assert loaded.condition is None and loaded.conditions() is None
    with pytest.raises(ConditionValueError, match="no condition codes"):
        loaded.search(clustered(1, 4, rng), 3, conditions=[0])
    with pytest.raises(ConditionValueError, match="holds none"):
        loaded.upsert(clustered(1, 4, rng), [50], conditions=[1])
    loaded.upsert(clustered(1, 4, rng), [50])
    loaded.delete([3])
    assert len(loaded) == 50


def test_bad_conditions_and_lookups_are_clear_errors():
    rng = np.random.default_rng(7)
    index = BruteForce().index(clustered(60, 4, rng), np.arange(60))
    index.set_condition("genres", _codes(rng, 60, False), 6, values=GENRES)
    q = clustered(2, 4, rng)
    for bad in ([6, 0], [-1, 0], [0], [[0], [1]], ["Comedy", "Drama"]):
        with pytest.raises(ConditionValueError):
            index.search(q, 3, conditions=bad)
    assert issubclass(ConditionValueError, ValueError)
    assert index.condition == {"feature": "genres", "kind": "categorical", "size": 6}
    assert index.condition_codes(["Noir", "Action"]).tolist() == [4, 0]
    with pytest.raises(ConditionValueError, match="Western"):
        index.condition_codes(["Western"])
    with pytest.raises(ConditionValueError, match="needs conditions="):
        index.upsert(clustered(1, 4, rng), [60])
    with pytest.raises(ConditionValueError, match="categorical"):
        index.upsert(clustered(1, 4, rng), [60], conditions=[[1, 2]])
    with pytest.raises(ConditionValueError, match="must lie in"):
        index.upsert(clustered(1, 4, rng), [60], conditions=[9])
    assert len(index) == 60
    with pytest.raises(ValueError, match="hold 5 items"):
        index.set_condition("genres", np.zeros(5, np.int32), 6)


@pytest.mark.parametrize("feature", ["category", "tags"])
def test_export_of_a_conditional_run_stores_the_features_codes(feature, tmp_path):
    """A run with model.user.condition exports an index holding that feature's item codes (categorical or
    multihot), named in the manifest, that filtered searches use."""
    from serve.export import export, validate
    from tests.helpers import smoke_cfg
    from train.loop import write_untrained_run

    ds, _, _ = write_untrained_run(smoke_cfg(f"model.user.condition={feature}"), tmp_path / "run", step=1)
    summary = export(validate({"run_dir": str(tmp_path / "run"), "num_queries": 20, "batch_size": 8}))
    index, manifest = load_index(summary["out"])
    spec = next(s for s in ds.item_feature_specs if s.name == feature)
    assert manifest["condition"] == index.condition == {"feature": feature, "kind": spec.kind, "size": spec.size}
    assert manifest["index"]["condition"]["feature"] == feature
    np.testing.assert_array_equal(index.conditions(), ds.item_features[feature])
    np.testing.assert_array_equal(index.ids(), ds.item_vocab.raw_ids)
    rng = np.random.default_rng(8)
    _check(index, rng.normal(size=(10, index.dim)).astype(np.float32), 5, rng.integers(0, spec.size, 10))
