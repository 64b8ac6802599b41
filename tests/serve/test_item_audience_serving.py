"""An item tower that pools its audience (model.item.use_history): evaluation, export and the server's item
upserts all embed a known item with the mean user row of ALL its train users, a new item with none, and a caller
that forgets the audience gets an error instead of silently different embeddings."""
import types

import numpy as np
import pytest

from data.batching import item_audience_mean
from eval.holdout import model_embeddings
from serve.export import item_embeddings as export_item_embeddings
from serve.model import Model
from tests.helpers import smoke_cfg
from towers.embed import embed_items
from towers.inference.embed import Towers

UNSEEN = 10**9 + 7


@pytest.fixture(scope="module")
def audience_model(tmp_path_factory):
    from train.loop import write_untrained_run

    run_dir = tmp_path_factory.mktemp("audience")
    write_untrained_run(smoke_cfg("model.item.use_history=true", "model.item.combine=sum"), run_dir, step=1)
    return Model(run_dir, step=None, batch_sizes=(1, 4))


def _parts(m: Model) -> Towers:
    t = m.trained
    return Towers(t.graphdef, t.params, t.tables, t.model)


def test_eval_and_export_embed_every_item_with_its_whole_audience(audience_model):
    m, t, ds = audience_model, audience_model.trained, audience_model.ds
    _, evaluated = model_embeddings(_parts(m), ds, np.arange(3, dtype=np.int32), history_len=5)
    exported = export_item_embeddings(t, ds, batch_size=16)
    np.testing.assert_allclose(exported, evaluated, rtol=1e-5, atol=1e-6)

    names = m.item_names
    feats = {k: ds.item_features[k] for k in names}
    rows = np.arange(ds.num_items, dtype=np.int32)
    means, has = item_audience_mean(ds, t.tables["user"])
    assert has.all()  # every synthetic item has train users
    # By hand: the tower on (ID row + mean user row) gives the same embeddings...
    np.testing.assert_allclose(embed_items(t.graphdef, t.params, t.tables["item"], rows, feats,
                                           audience=(means, has)), evaluated, rtol=1e-5, atol=1e-6)
    # ...and the audience matters: without it (has=False) every item embeds differently.
    alone = embed_items(t.graphdef, t.params, t.tables["item"], rows, feats, audience=(means, ~has))
    assert np.abs(alone - evaluated).max(axis=1).min() > 1e-4
    with pytest.raises(ValueError, match="audience"):
        embed_items(t.graphdef, t.params, t.tables["item"], rows, feats)


def test_server_upserts_a_known_item_with_its_audience_and_a_new_one_without(audience_model):
    m, t, ds = audience_model, audience_model.trained, audience_model.ds
    row = 7
    known = types.SimpleNamespace(id=t.item_vocab.raw_ids[row].item(), features={}, embedding=None)
    new = types.SimpleNamespace(id=UNSEEN, features={}, embedding=None)
    _, emb = m.item_embeddings([known, new], m.item_id_kind, m.output_dim)

    _, evaluated = model_embeddings(_parts(m), ds, np.arange(1, dtype=np.int32), history_len=5)
    np.testing.assert_allclose(emb[0], evaluated[row], rtol=1e-5, atol=1e-6)
    stored = m.features(m.item_names, None, -1, {})
    feats = {n: np.asarray(v)[None] for n, v in stored.items()}
    no_audience = (np.zeros((1, t.tables["user"].shape[1]), np.float32), np.zeros(1, bool))
    want = embed_items(t.graphdef, t.params, t.tables["item"], np.full(1, -1, np.int32), feats,
                       audience=no_audience)
    np.testing.assert_allclose(emb[1], want[0], rtol=1e-5, atol=1e-6)
