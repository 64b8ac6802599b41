"""Parquet / CSV logs: ids, time types, feature columns, and clear errors for missing or null columns."""
import datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import DataError, load
from data.sources import tabular

LOG = {
    "user_id": ["a", "a", "b", "b", "c", "c", "c"],
    "item_id": [1, 2, 1, 3, 2, 3, 4],
    "ts": [datetime.datetime(2024, 1, d) for d in (1, 2, 1, 2, 5, 6, 7)],
    "country": ["us", "us", "fr", "fr", "de", "de", "fr"],
    "price": [1.0, 2.0, 1.0, 3.0, 2.0, 3.0, float("nan")],
    "tags": [["x"], ["y", "z"], ["x"], [], ["y"], [], ["q", "x", "y"]],
    "stars": [5, 2, 4, 4, 1, 3, 5],
}


def _cfg(path, **kw):
    return {"source": "parquet", "path": str(path), "timestamp_column": "ts", **kw}


def test_parquet_with_features(tmp_path):
    pq.write_table(pa.table(LOG), tmp_path / "log.parquet")
    ds = load(_cfg(tmp_path / "log.parquet", user_feature_columns=["country"],
                   item_feature_columns=["price", "tags"], multihot_max_len=2, test_fraction=0.4))
    assert ds.user_vocab.raw_ids.tolist() == ["a", "b", "c"] and ds.item_vocab.raw_ids.tolist() == [1, 2, 3, 4]
    assert (len(ds.train), len(ds.test)) == (4, 3)
    assert ds.train.timestamp[0] == int(datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc).timestamp())
    country = ds.feature_vocabs["country"].raw_ids[ds.user_features["country"]]
    assert country.tolist() == ["us", "fr", "fr"]  # c's latest row says fr
    assert ds.stats["user_feature_country_conflicts"] == 1
    np.testing.assert_array_equal(ds.item_features["price"][:, 0], [1, 2, 3, 0])  # NaN -> 0, counted
    assert ds.stats["feature_price_missing"] == 1
    tags = ds.item_features["tags"]
    names = ds.feature_vocabs["tags"].raw_ids
    assert [names[r[r >= 0]].tolist() for r in tags] == [["x"], ["y"], [], ["q", "x"]]
    assert ds.stats["feature_tags_values_cut"] == 1
    specs = {s.name: (s.kind, s.size) for s in ds.item_feature_specs + ds.user_feature_specs}
    assert specs == {"price": ("dense", 1), "tags": ("multihot", 3), "country": ("categorical", 4)}


def test_parquet_directory_and_csv_give_the_same_interactions(tmp_path):
    table = pa.table({k: LOG[k] for k in ("user_id", "item_id", "stars")})
    (tmp_path / "dir").mkdir()
    pq.write_table(table.slice(0, 3), tmp_path / "dir" / "part-0.parquet")
    pq.write_table(table.slice(3), tmp_path / "dir" / "part-1.parquet")
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,stars\n" + "".join(f"{u},{i},{s}\n" for u, i, s in
                                                        zip(LOG["user_id"], LOG["item_id"], LOG["stars"])))
    a = load({"source": "parquet", "path": str(tmp_path / "dir")})
    b = load({"source": "parquet", "path": str(csv)})
    assert a.stats["timestamps"].startswith("absent")
    for x, y in ((a.train, b.train), (a.test, b.test)):
        np.testing.assert_array_equal(x.user, y.user)
        np.testing.assert_array_equal(x.item, y.item)
    c = load({"source": "parquet", "path": str(csv), "rating_column": "stars", "min_rating": 3})
    assert c.stats["filtered"] == {"min_rating": 2} and len(c.train) + len(c.test) == 5


def test_parquet_errors_name_the_problem(tmp_path):
    pq.write_table(pa.table({"user": [1, 2], "item_id": [3, 4]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"no column 'user_id' for user_column; columns are \['user', 'item_id'\]"):
        load({"source": "parquet", "path": str(tmp_path / "a.parquet")})
    pq.write_table(pa.table({"user_id": [1, None, 2], "item_id": [3, 4, 5]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match="1 null id.*row 2"):
        load({"source": "parquet", "path": str(tmp_path / "b.parquet")})
    pq.write_table(pa.table({"user_id": [1.5, 2.0], "item_id": [3, 4]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match="integers or strings"):
        load({"source": "parquet", "path": str(tmp_path / "c.parquet")})
    with pytest.raises(DataError, match="no column 'when' for timestamp_column"):
        load({"source": "parquet", "path": str(tmp_path / "a.parquet"), "user_column": "user",
              "timestamp_column": "when"})
    with pytest.raises(DataError, match="rating_column is not"):
        load({"source": "parquet", "path": str(tmp_path / "a.parquet"), "user_column": "user", "min_rating": 3})
    with pytest.raises(DataError, match="does not exist"):
        load({"source": "parquet", "path": str(tmp_path / "missing.parquet")})


def _csv_log(path, users, items=None):
    items = items if items is not None else [i % 7 for i in range(len(users))]
    path.write_text("user_id,item_id\n" + "".join(f"{u},{i}\n" for u, i in zip(users, items)))
    return {"source": "parquet", "path": str(path)}


def test_stray_non_integer_ids_in_an_integer_id_column_are_named(tmp_path):
    users = [str(i) for i in range(40)]
    users[4], users[9], users[30] = "NA", "unknown", "NA"
    with pytest.raises(DataError, match=r"log\.csv column 'user_id': 3 row\(s\) hold 2 non-integer id\(s\) in a "
                                        r"column of integer ids, e\.g\. line 6: 'NA', line 11: 'unknown', line 32"):
        load(_csv_log(tmp_path / "log.csv", users))
    items = list(range(40))
    items[17] = "x"
    with pytest.raises(DataError, match=r"column 'item_id': 1 row\(s\) hold 1 non-integer id\(s\).* line 19: 'x'"):
        load(_csv_log(tmp_path / "log.csv", list(range(40)), items))


def test_a_stray_id_after_the_first_block_is_named_too(tmp_path):
    # pyarrow infers column types from the first block (1 MB), so this stray surfaces only in a re-read.
    users = [str(i) for i in range(150_000)] + ["u_x"]
    with pytest.raises(DataError, match=r"1 row\(s\) hold 1 non-integer id\(s\).* line 150002: 'u_x'"):
        load(_csv_log(tmp_path / "log.csv", users))


def test_string_id_columns_stay_strings_and_integer_columns_integers(tmp_path):
    # ISBN-like ids: mostly digits, but many end in 'X'; they are strings, not integers with strays.
    users = [f"{i:09d}" + ("X" if i % 10 == 0 else str(i % 10)) for i in range(100)]
    ds = load(_csv_log(tmp_path / "a.csv", users))
    assert ds.user_vocab.raw_ids.dtype.kind == "U" and "0000000011" in ds.user_vocab.raw_ids
    assert ds.item_vocab.raw_ids.dtype.kind == "i"
    # String ids that start after the first block: the user ids are strings, the item ids stay integers.
    users = [str(i) for i in range(150_000)] + [f"u_{i}" for i in range(5_000)]
    ds = load(_csv_log(tmp_path / "b.csv", users))
    assert ds.num_users == 155_000 and ds.user_vocab.raw_ids.dtype.kind == "U"
    assert ds.user_vocab.lookup(np.array(["u_4999", "149999"])).min() >= 0
    assert ds.item_vocab.raw_ids.tolist() == list(range(7))


def test_integer_ids_stay_integers_when_pyarrow_rereads_id_columns_as_text(tmp_path, monkeypatch):
    # Some pyarrow versions infer types from the first block and fail on a later string id; the source then
    # re-reads the id columns as text. Simulate that failure: the integer column must still give int64 ids.
    real = tabular.pacsv.read_csv

    def first_read_fails(path, convert_options=None, **kw):
        if convert_options is None:
            raise pa.ArrowInvalid("CSV conversion error to int64: invalid value 'u_x'")
        return real(path, convert_options=convert_options, **kw)

    monkeypatch.setattr(tabular.pacsv, "read_csv", first_read_fails)
    ds = load(_csv_log(tmp_path / "log.csv", [f"u_{i % 5}" for i in range(20)], list(range(20))))
    assert ds.user_vocab.raw_ids.dtype.kind == "U" and ds.item_vocab.raw_ids.tolist() == list(range(20))
