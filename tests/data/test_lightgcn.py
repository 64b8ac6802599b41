"""LightGCN text splits: the Gowalla counts and read speed, and the fast parser against the careful one."""
import time

import numpy as np
import pytest

from data import DataError, load
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


def _lightgcn_dir(tmp_path, train: bytes, test: bytes):
    (tmp_path / "train.txt").write_bytes(train)
    (tmp_path / "test.txt").write_bytes(test)
    return {"source": "lightgcn", "path": str(tmp_path)}


@pytest.mark.parametrize("train", [b"\n", b"", b"\n\r\n \n"])
def test_a_train_file_without_interactions_is_a_clear_error(tmp_path, train):
    cfg = _lightgcn_dir(tmp_path, train, b"0 1\n")
    with pytest.raises(DataError, match=r"train\.txt: no interactions"):
        load(cfg)


def test_an_id_too_large_for_int64_names_file_and_line(tmp_path):
    cfg = _lightgcn_dir(tmp_path, b"0 1 2\n1 1234567890123456789012345 3\n", b"0 1\n")
    with pytest.raises(DataError, match=r"train\.txt line 2: id '1234567890123456789012345' is too large"):
        load(cfg)
    # The largest int64 itself still fits.
    big = str(np.iinfo(np.int64).max).encode()
    cfg = _lightgcn_dir(tmp_path, b"0 1 " + big + b"\n", b"0 1\n")
    assert load(cfg).item_vocab.raw_ids.max() == np.iinfo(np.int64).max


def test_users_without_items_and_users_only_in_test_are_counted(tmp_path):
    # User 1 has an empty train line but test items; user 4 is listed in train only, with no items; users 5
    # and 6 appear only in test; user 7 has an empty line in both files.
    train = b"0 1 2\n1\n2 3\n4\n7\n"
    test = b"0 3\n1 2\n5 4\n6 1\n7\n"
    for fast in (train, train.replace(b"\n", b"\r\n")):  # the fast parser and the careful one
        ds = load(_lightgcn_dir(tmp_path, fast, test))
        assert ds.num_users == 5  # 0, 1, 2, 5, 6
        s = ds.stats
        assert (s["given_train_lines_without_items"], s["given_test_lines_without_items"]) == (3, 1)
        assert s["given_users_without_items"] == 2  # 4 and 7 are listed but have no interaction at all
        assert s["users_without_train"] == 3  # 1, 5 and 6
