"""The tfds source: a clear offline error, and the same Dataset as the raw MovieLens reader."""
import numpy as np
import pytest

from data import DataError, load
from data.assemble import assemble
from data.config import resolve_config
from data.sources.movielens_meta import GENRES_100K
from data.sources.tfds import TFDS_GENRES, from_tfds_columns


def test_missing_tfds_data_says_to_use_the_raw_directory(tmp_path):
    with pytest.raises(DataError, match="source: movielens") as info:
        load({"source": "tfds", "name": "movielens/100k-ratings", "data_dir": str(tmp_path)})
    assert "movielens/100k-ratings" in str(info.value)
    with pytest.raises(DataError, match="maps MovieLens rating datasets"):
        load({"source": "tfds", "name": "mnist"})


def _tfds_style_columns(root):
    """ml-100k as TFDS's movielens/100k-ratings presents it (bytes strings, genre labels, bucketed ages)."""
    tfds_100k_genres = ["Unknown" if g == "unknown" else "Children" if g == "Children's" else g
                        for g in GENRES_100K]
    movies = {}
    for line in (root / "u.item").read_text(encoding="latin-1").splitlines():
        f = line.split("|")
        labels = [TFDS_GENRES.index(tfds_100k_genres[i]) for i, x in enumerate(f[5:]) if x == "1"]
        movies[f[0]] = (f[1].encode(), labels)
    users = {}
    for line in (root / "u.user").read_text().splitlines():
        uid, age, gender, occupation, _ = line.split("|")
        bucket = max([1] + [t for t in (18, 25, 35, 45, 50, 56) if int(age) >= t])
        users[uid] = (gender == "M", float(bucket), occupation.encode())
    cols = {k: [] for k in ("user_id", "movie_id", "timestamp", "user_rating", "movie_title", "movie_genres",
                            "user_gender", "bucketized_user_age", "user_occupation_text")}
    for line in (root / "u.data").read_text().splitlines():
        uid, mid, rating, ts = line.split("\t")
        for key, value in zip(cols, (uid.encode(), mid.encode(), int(ts), float(rating), *movies[mid],
                                     *users[uid])):
            cols[key].append(value)
    return cols


@pytest.mark.realdata
def test_tfds_columns_give_the_raw_directory_dataset(shared_data):
    cfg = {"source": "tfds", "name": "movielens/100k-ratings", "min_rating": 2}
    from_tfds = assemble(from_tfds_columns(_tfds_style_columns(shared_data / "ml-100k"), resolve_config(cfg),
                                           cfg["name"]), resolve_config(cfg))
    raw = load({"source": "movielens", "path": str(shared_data / "ml-100k"), "min_rating": 2})
    for split in ("train", "test"):
        for col in ("user", "item", "timestamp"):
            np.testing.assert_array_equal(getattr(getattr(from_tfds, split), col), getattr(getattr(raw, split), col))
    np.testing.assert_array_equal(from_tfds.user_vocab.raw_ids, raw.user_vocab.raw_ids)
    np.testing.assert_array_equal(from_tfds.item_vocab.raw_ids, raw.item_vocab.raw_ids)
    assert from_tfds.user_feature_specs == raw.user_feature_specs
    assert from_tfds.item_feature_specs == raw.item_feature_specs
    for side in ("user_features", "item_features"):
        for name, values in getattr(raw, side).items():
            np.testing.assert_array_equal(getattr(from_tfds, side)[name], values, err_msg=name)
    for name, vocab in raw.feature_vocabs.items():
        np.testing.assert_array_equal(from_tfds.feature_vocabs[name].raw_ids, vocab.raw_ids)
    assert from_tfds.stats["filtered"] == raw.stats["filtered"] == {"min_rating": 6_110}
