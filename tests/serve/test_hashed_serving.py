"""Serving a run with hashed ID tables: a user id the vocabulary never saw, and an upserted item id it never
saw, are embedded through their hashed rows (the point of hashing), checked against the tower run on rows
gathered here from the checkpoint's table; without hashing the same unseen user is refused (422)."""
import types

import numpy as np
import pytest

from serve.model import ClientError, Model
from serve.schemas import TopKRequest
from tests.helpers import smoke_cfg
from towers.embed import embed_items, embed_users

UNSEEN = 10**9 + 7


@pytest.fixture(scope="module")
def hashed_model(tmp_path_factory):
    from train.loop import write_untrained_run

    run_dir = tmp_path_factory.mktemp("hashed")
    write_untrained_run(smoke_cfg("model.user.table.hash_buckets=64", "model.user.table.num_hashes=2",
                                  "model.item.table.hash_buckets=32"), run_dir, step=1)
    return Model(run_dir, step=None, batch_sizes=(1, 4))


def _hashed_rows(model: Model, table: str, raw_ids) -> np.ndarray:
    t = model.trained
    return np.asarray(t.id_tables[table])[t.hashing[table].rows(np.asarray(raw_ids))].sum(axis=1)


def test_unseen_user_id_is_embedded_through_its_hashed_rows(hashed_model):
    m, t = hashed_model, hashed_model.trained
    assert (t.user_vocab.lookup(np.asarray([UNSEEN]), missing="minus_one") == -1).all()
    q = m.make_query(TopKRequest(user_id=UNSEEN, k=3), "int")
    assert q.row == -1 and q.id_emb is not None
    got = m.embed_queries([q])[0]

    blank = m.features(m.user_names, None, -1, None)
    feats = {n: np.asarray(v)[None] for n, v in blank.items()}
    history = np.full((1, m.history_len), -1, np.int32)
    want = embed_users(t.graphdef, t.params, _hashed_rows(m, "user", [UNSEEN]), m.item_table,
                       np.zeros(1, np.int32), feats, history)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The ID row matters: the same user without it (features and history only) embeds differently.
    no_id = embed_users(t.graphdef, t.params, m.user_table, m.item_table, np.full(1, -1, np.int32), feats,
                        history)[0]
    assert np.abs(got - no_id).max() > 1e-3

    # Known users are unchanged by the extra input, and one batch mixes both kinds.
    known = t.user_vocab.raw_ids[3].item()
    both = m.embed_queries([m.make_query(TopKRequest(user_id=known, k=3), "int"), q])
    alone = m.embed_queries([m.make_query(TopKRequest(user_id=known, k=3), "int")])
    np.testing.assert_allclose(both[0], alone[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both[1], got, rtol=1e-5, atol=1e-6)


def test_upserted_unseen_item_id_reads_its_hashed_rows(hashed_model):
    m, t = hashed_model, hashed_model.trained
    item = types.SimpleNamespace(id=UNSEEN, features={}, embedding=None)
    ids, emb = m.item_embeddings([item], m.item_id_kind, m.output_dim)
    assert ids == [UNSEEN]
    stored = m.features(m.item_names, None, -1, {})
    feats = {n: np.asarray(v)[None] for n, v in stored.items()}
    want = embed_items(t.graphdef, t.params, _hashed_rows(m, "item", [UNSEEN]), np.zeros(1, np.int32), feats)
    np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-6)
    features_only = embed_items(t.graphdef, t.params, m.item_table, np.full(1, -1, np.int32), feats)
    assert np.abs(emb - features_only).max() > 1e-3


def test_unhashed_run_refuses_an_unseen_user_without_features(tmp_path):
    from train.loop import write_untrained_run

    write_untrained_run(smoke_cfg(), tmp_path, step=1)
    m = Model(tmp_path, step=None, batch_sizes=(1,))
    with pytest.raises(ClientError) as e:
        m.make_query(TopKRequest(user_id=UNSEEN, k=3), "int")
    assert e.value.status == 422 and "unknown user" in str(e.value.detail)
