"""MovieLens raw directories: published counts on the real files, features, filters, and the 1M format."""
import numpy as np
import pytest

from data import load
from data.features import YEAR_EDGES
from data.sources.movielens_meta import GENRES
from data.split import tail_counts

def _genre_names(ds, movie_id):
    row = ds.item_vocab.lookup(np.array([movie_id]))[0]
    codes = ds.item_features["genres"][row]
    return sorted(ds.feature_vocabs["genres"].raw_ids[codes[codes >= 0]].tolist())


@pytest.mark.realdata
def test_ml100k_published_counts_and_features(shared_data):
    ds = load({"source": "movielens", "path": str(shared_data / "ml-100k")})
    assert (ds.num_users, ds.num_items) == (943, 1682)
    assert len(ds.train) + len(ds.test) == 100_000 == ds.stats["rows_read"]
    assert ds.stats["filtered"] == {} and ds.stats["duplicate_rows"] == 0
    per_user = np.bincount(np.concatenate([ds.train.user, ds.test.user]))
    assert len(ds.test) == tail_counts(per_user, 0.2).sum()
    assert {s.name for s in ds.user_feature_specs} == {"age", "gender", "occupation"}
    assert {s.name for s in ds.item_feature_specs} == {"genres", "year", "title"}
    assert _genre_names(ds, 1) == ["Animation", "Children", "Comedy"]  # Toy Story
    toy = ds.item_vocab.lookup(np.array([1]))[0]
    assert ds.item_features["year"][toy] == np.digitize(1995, YEAR_EDGES) + 1
    tokens = ds.item_features["title"][toy]
    assert ds.feature_vocabs["title"].raw_ids[tokens[tokens >= 0]].tolist() == ["toy", "story"]
    user1 = ds.user_vocab.lookup(np.array([1]))[0]  # 1|24|M|technician|85711
    assert ds.feature_vocabs["gender"].raw_ids[ds.user_features["gender"][user1]] == "M"
    assert ds.feature_vocabs["occupation"].raw_ids[ds.user_features["occupation"][user1]] == "technician"
    assert ds.user_features["age"][user1] == 2  # 18-24
    assert ds.stats["users_without_features"] == 0 and ds.stats["items_without_features"] == 0


@pytest.mark.realdata
def test_ml100k_min_rating_is_counted(shared_data):
    ds = load({"source": "movielens", "path": str(shared_data / "ml-100k"), "min_rating": 4})
    assert ds.stats["filtered"] == {"min_rating": 6_110 + 11_370 + 27_145}  # the 1-3 star histogram
    assert len(ds.train) + len(ds.test) == 34_174 + 21_201
    assert ds.num_items == 1682  # the catalogue keeps movies whose ratings were all filtered


@pytest.mark.realdata
def test_ml_latest_small_published_counts(shared_data):
    ds = load({"source": "movielens", "path": str(shared_data / "ml-latest-small")})
    assert ds.num_users == 610
    assert len(ds.train) + len(ds.test) == 100_836
    # Items are every movie of movies.csv (unrated ones exist with features); 9,724 are rated.
    assert ds.num_items == 9_742
    rated = np.union1d(ds.train.item, ds.test.item)
    assert rated.size == 9_724
    assert ds.user_feature_specs == []
    assert _genre_names(ds, 1) == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    no_genre = ds.item_features["genres"][ds.item_vocab.lookup(np.array([114335]))[0]]  # "(no genres listed)"
    assert (no_genre == -1).all()


def test_ml1m_format_with_users(tmp_path):
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n"
                                   "2::30::1::978300275\n2::20::2::978824291\n")
    (d / "movies.dat").write_bytes("10::Café Society (1995)::Drama|Children's\n20::Heat (1995)::Action\n"
                                   "30::Up (2009)::Animation\n40::Unrated (1990)::Western\n".encode("latin-1"))
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    ds = load({"source": "movielens", "path": str(d), "test_fraction": 0.5})
    assert (ds.num_users, ds.num_items) == (2, 4) and ds.stats["movielens_format"] == "dat"
    assert (len(ds.train), len(ds.test)) == (3, 2)
    assert _genre_names(ds, 10) == ["Children", "Drama"]
    assert ds.feature_vocabs["genres"].raw_ids.tolist()[: len(GENRES)] == list(GENRES)
    cafe = ds.item_features["title"][ds.item_vocab.lookup(np.array([10]))[0]]
    assert ds.feature_vocabs["title"].raw_ids[cafe[cafe >= 0]].tolist() == ["café", "society"]
    occ = ds.feature_vocabs["occupation"].raw_ids[ds.user_features["occupation"]].tolist()
    assert occ == ["K-12 student", "self-employed"]
    assert ds.user_features["age"].tolist() == [1, 7]  # under 18, 56+
