"""LightGCN text splits: the Gowalla counts and read speed, and the fast parser against the careful one."""
import time

import numpy as np
import pytest

from data import load
from data.sources.lightgcn import _parse_careful, _parse_fast, read_lists


@pytest.mark.realdata
def test_gowalla_published_counts_and_speed(shared_data):
    start = time.perf_counter()
    train = read_lists(shared_data / "gowalla" / "train.txt")
    test = read_lists(shared_data / "gowalla" / "test.txt")
    assert time.perf_counter() - start < 2.0
    assert (train[0].size, test[0].size) == (810_128, 217_242)
    ds = load({"source": "lightgcn", "path": str(shared_data / "gowalla")})
    assert (ds.num_users, ds.num_items) == (29_858, 40_981)
    assert (len(ds.train), len(ds.test)) == (810_128, 217_242)
    assert ds.stats["split"] == "given" and ds.stats["users_without_test"] == 0
    # 0-based contiguous ids: rows equal raw ids.
    np.testing.assert_array_equal(ds.user_vocab.raw_ids, np.arange(29_858))
    # Each user's train items keep their file order.
    with open(shared_data / "gowalla" / "train.txt") as f:
        first = [int(x) for x in f.readline().split()]
    indptr, items = ds.train_csr()
    np.testing.assert_array_equal(items[indptr[first[0]]:indptr[first[0] + 1]], first[1:])


def test_fast_parser_matches_careful_parser(tmp_path):
    rng = np.random.default_rng(0)
    lines = [" ".join(str(x) for x in [u, *rng.integers(0, 10**12, rng.integers(0, 6))]) for u in range(300)]
    text = "\n".join(lines) + "\n"
    path = tmp_path / "train.txt"
    path.write_text(text)
    fast = _parse_fast(text.encode())
    careful = _parse_careful(path)
    assert fast is not None
    for a, b in zip(fast, careful):
        np.testing.assert_array_equal(a, b)
    assert _parse_fast(b"0 1\r\n") is None  # CRLF goes to the careful reader


def test_temporal_split_of_untimed_data_is_seeded(tmp_path):
    (tmp_path / "train.txt").write_text("0 1 2 3 4 5 6 7 8 9\n1 1 2\n")
    (tmp_path / "test.txt").write_text("0 10\n")
    cfg = {"source": "lightgcn", "path": str(tmp_path), "split": "temporal", "test_fraction": 0.3}
    a, b = load(cfg), load(cfg)
    np.testing.assert_array_equal(a.test.item, b.test.item)
    assert len(a.test) == 3 + 1  # user 0: floor(0.3 * 11); user 1: max(1, floor(0.9))
    seeds = {tuple(np.sort(load({**cfg, "split_seed": s}).test.item)) for s in range(6)}
    assert len(seeds) > 1
