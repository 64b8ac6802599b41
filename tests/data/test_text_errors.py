"""Malformed rows in every text format raise DataError naming the file and the line."""
import re

import numpy as np
import pytest

from data import DataError, load

GOOD_U_DATA = "1\t10\t5\t881250949\n2\t20\t3\t891717742\n"
GOOD_U_ITEM = "10|Movie A (1995)|01-Jan-1995||url|" + "|".join("0" * 18 + "1") + "\n"


def _write(directory, files):
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / name).write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return directory


def _error(cfg) -> str:
    with pytest.raises(DataError) as info:
        load(cfg)
    return str(info.value)


@pytest.mark.parametrize("bad_line, problem", [
    ("1\t2\t3", "expected 4 tab-separated fields, got 3: '1\\t2\\t3'"),
    ("1\tx\t3\t4", "field 2 (item) 'x' is not an integer"),
    ("1\t\t3\t4", "field 2 (item) '' is not an integer"),
    ("1\t2\tfive\t4", "field 3 (rating) 'five' is not a number"),
    ("1\t2\t3\t4\t5", "expected 4 tab-separated fields, got 5"),
])
def test_ml100k_u_data(tmp_path, bad_line, problem):
    d = _write(tmp_path / "ml-100k", {"u.data": GOOD_U_DATA + bad_line + "\n" + GOOD_U_DATA})
    msg = _error({"source": "movielens", "path": str(d)})
    assert f"ml-100k/u.data line 3: {problem}" in msg


def test_ml100k_u_item_and_u_user(tmp_path):
    d = _write(tmp_path / "ml-100k", {"u.data": GOOD_U_DATA, "u.item": GOOD_U_ITEM + "20|Movie B|x\n"})
    assert "u.item line 2: expected 24 '|'-separated fields, got 3" in _error({"source": "movielens", "path": d})
    flags = GOOD_U_ITEM.replace("|1\n", "|7\n")
    _write(d, {"u.item": flags})
    assert "u.item line 1: genre flags" in _error({"source": "movielens", "path": d})
    _write(d, {"u.item": GOOD_U_ITEM + GOOD_U_ITEM.replace("10|", "20|"),
               "u.user": "1|24|M|writer|12345\n2|old|F|x|1\n"})
    assert "u.user line 2: age 'old' is not an integer" in _error({"source": "movielens", "path": d})


def test_ml1m_dat_files(tmp_path):
    ratings = "1::10::5::978300760\n1::20::3\n"
    d = _write(tmp_path / "ml-1m", {"ratings.dat": ratings})
    assert "ratings.dat line 2: expected 4 '::'-separated fields, got 3" in _error({"source": "movielens",
                                                                                     "path": d})
    _write(d, {"ratings.dat": "1::10::5::978300760\n", "movies.dat": "10::Movie (1999)::Drama::extra\n"})
    assert "movies.dat line 1: expected 3 '::'-separated fields, got 4" in _error({"source": "movielens",
                                                                                    "path": d})
    _write(d, {"movies.dat": "10::Movie (1999)::Drama\n", "users.dat": "1::F::1::10::48067\n\n1::M::56::99::1\n"})
    assert "users.dat line 3: occupation code 99" in _error({"source": "movielens", "path": d})


def test_latest_csv_files(tmp_path):
    head = "userId,movieId,rating,timestamp\r\n"
    d = _write(tmp_path / "ml-latest-small", {"ratings.csv": head + "1,1,4.0,964982703\r\n1,3\r\n"})
    assert "ratings.csv line 3: expected 4 comma-separated fields, got 2" in _error({"source": "movielens",
                                                                                      "path": d})
    _write(d, {"ratings.csv": "user,movie,rating,timestamp\r\n1,1,4.0,964982703\r\n"})
    assert "ratings.csv line 1: header lacks column(s) ['userId', 'movieId']" in _error(
        {"source": "movielens", "path": d})
    movies = 'movieId,title,genres\r\n1,"Toy Story, The (1995)",Comedy\r\n2,Jumanji (1995),Fantasy,extra\r\n'
    _write(d, {"ratings.csv": head + "1,1,4.0,964982703\r\n", "movies.csv": movies})
    assert "movies.csv line 3: expected 3 comma-separated fields, got 4" in _error({"source": "movielens",
                                                                                    "path": d})
    _write(d, {"movies.csv": 'movieId,title,genres\r\n1,"Toy Story (1995),Comedy\r\n'})
    assert re.search(r"movies.csv line \d+: malformed CSV", _error({"source": "movielens", "path": d}))


def test_lightgcn_bad_token(tmp_path):
    d = _write(tmp_path / "gowalla", {"train.txt": "0 1 2\n1 3 4\n", "test.txt": "0 5\n1 6 x7\n"})
    assert "gowalla/test.txt line 2: expected non-negative integer ids" in _error({"source": "lightgcn",
                                                                                   "path": d})


def test_lightgcn_tolerates_crlf_tabs_and_blank_lines(tmp_path):
    d = _write(tmp_path / "a", {"train.txt": "0 1 2\r\n\r\n1\t3  4\r\n", "test.txt": "0 5\n1 6"})
    ds = load({"source": "lightgcn", "path": d})
    assert (len(ds.train), len(ds.test)) == (4, 2)
    np.testing.assert_array_equal(ds.item_vocab.raw_ids[ds.train.item], [1, 2, 3, 4])


def test_csv_log_wrong_width(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\nu1,i1,1\nu1,i2\n")
    assert "log.csv line 3: expected 3 comma-separated fields, got 2" in _error({"source": "parquet",
                                                                                "path": path})
