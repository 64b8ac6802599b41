"""Embedding the items and users of a trained run: the one recipe evaluation, export, trending, the server and
batch candidates all follow, so the same item (or user) gets the same embedding whichever of them asks.

The towers themselves run in `towers.embed` (jitted, on table rows); this module decides what goes in:

- items: the ID row only of an item that trained (it has training interactions: `trained_item_rows`); an item
  without any (a cold item, a catalog item nobody chose, a new item) embeds from its features alone. With a
  hashed item table, an id outside the vocabulary reads its hashed rows (`TrainedModel.id_embeddings`). An item
  tower that pools its audience gets each known item's mean user row (`data.batching.item_audience_mean`).
- users: a known user's stored features and last `history_len` training items (`stored_user_inputs`), or
  inputs a caller encoded from a raw request (`UserInputs`, e.g. with the hashed-row ID embedding of a user id
  outside the vocabulary).

Batches can be padded to a few fixed sizes (`buckets`), so a server or a job compiles each tower once per size.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from data.batching import item_audience_mean, user_history
from data.types import CONDITION
from towers.embed import embed_items as run_item_tower
from towers.embed import user_forward
from towers.two_tower import feature_names


@dataclasses.dataclass
class Towers:
    """The towers as inference needs them, for towers that were not restored from a run directory (training's
    end-of-run evaluation). A `towers.restore.TrainedModel` has the same attributes, plus `hashing`."""
    graphdef: object
    params: object
    tables: dict          # "user" / "item" ID tables indexed by vocabulary row
    model: object         # the `towers.two_tower.TwoTower`


@dataclasses.dataclass
class UserInputs:
    """User-tower inputs of Q users, aligned by row.

    Attributes:
      rows: int32[Q] user-table rows; -1 = no ID row.
      features: {name: array[Q, ...]} every user feature the tower reads.
      history: int32[Q, H] item rows, most recent first, -1 padded; None when the tower reads no history.
      id_emb: float32[Q, id_dim] added to the ID embedding (the hashed rows of user ids outside the
        vocabulary, zeros elsewhere), or None.
      condition: int32[Q] codes of a conditional tower's condition feature (`model.user.condition`), -1 = none;
        None = no condition for anyone (and ignored by an unconditional tower).
    """
    rows: np.ndarray
    features: dict
    history: np.ndarray | None = None
    id_emb: np.ndarray | None = None
    condition: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)


def trained_item_rows(item_rows: np.ndarray, train_counts: np.ndarray) -> np.ndarray:
    """The ID row each item should read: its own row, or -1 (features alone) when it has no training data.

    An item with no training interaction (a cold item held out of training, or a catalog item nobody chose)
    has an ID row that was never trained as a positive: it holds its random initial value plus whatever it
    received as a sampled negative. The item tower learns to embed from features alone with a zeroed row
    (`id_dropout`), so that is what such items get.

    Args:
      item_rows: int[N] item rows (-1 entries stay -1).
      train_counts: int[num_items] training interactions per item (`Dataset.item_counts()`).
    Returns:
      int32[N] rows for `towers.embed.embed_items`.
    """
    rows = np.asarray(item_rows, dtype=np.int32)
    counts = np.asarray(train_counts)
    trained = (rows >= 0) & (counts[np.maximum(rows, 0)] > 0)
    return np.where(trained, rows, -1).astype(np.int32)


def _padded_size(n: int, batch_size: int, buckets: tuple[int, ...] | None) -> tuple[int, int]:
    """(rows after padding, tower batch size): every tower call has the same shape, `batch_size` (or n when
    fewer), or with `buckets` the smallest bucket holding n rows (else the largest); the last call is padded."""
    size = min(batch_size, max(n, 1)) if not buckets else next((b for b in sorted(buckets) if b >= n), max(buckets))
    return -(-n // size) * size, size


def _pad(x: np.ndarray, size: int, fill) -> np.ndarray:
    if len(x) == size:
        return x
    return np.concatenate([x, np.full((size - len(x), *x.shape[1:]), fill, dtype=x.dtype)])


# ------------------------------------------------------------------------------------------------- items
def _item_id_table(trained, ds, rows: np.ndarray, raw_ids) -> tuple[object, np.ndarray]:
    """(table, rows into it) for the item tower: vocabulary rows of trained items; with a hashed table, ids
    outside the vocabulary read their hashed rows (from a table of just these items)."""
    if not trained.model.item.use_id:
        return None, np.full(len(rows), -1, np.int32)
    table, id_rows = trained.tables["item"], trained_item_rows(rows, ds.item_counts())
    unseen = np.flatnonzero(rows < 0)
    if raw_ids is None or not unseen.size or "item" not in getattr(trained, "hashing", {}):
        return table, id_rows
    own = np.zeros((len(rows), table.shape[1]), np.float32)
    used = np.flatnonzero(id_rows >= 0)
    own[used] = np.asarray(table[id_rows[used]])
    own[unseen] = trained.id_embeddings("item", np.asarray(raw_ids)[unseen])
    local = np.where(id_rows >= 0, np.arange(len(rows)), -1).astype(np.int32)
    local[unseen] = unseen
    return own, local


def embed_items(trained, ds, rows=None, *, features: dict | None = None, raw_ids=None, batch_size: int = 8192,
                buckets: tuple[int, ...] | None = None) -> np.ndarray:
    """Item embeddings of a trained run.

    Args:
      trained: a `towers.restore.TrainedModel` (or `Towers`).
      ds: the run's `data.types.Dataset` (vocabularies checked with `check_vocabularies`).
      rows: int[N] item rows of the vocabulary, -1 = an item outside it (a new item); None = every item.
      features: {name: array[N, ...]} the item features the tower reads; None = the stored ones of `rows`
        (then every row must be >= 0).
      raw_ids: [N] raw ids of the items; needed only so that ids outside the vocabulary read their hashed rows
        when the item table is hashed.
      batch_size: items per tower call without `buckets`.
      buckets: pad to the smallest of these sizes holding the items (or to a multiple of the largest).
    Returns:
      float32[N, output_dim]
    """
    rows = np.arange(ds.num_items, dtype=np.int32) if rows is None else np.asarray(rows, np.int32)
    names = feature_names(trained.model)[1]
    if features is None:
        if (rows < 0).any():
            raise ValueError("embed_items: items outside the vocabulary (row -1) need their features")
        features = {k: ds.item_features[k][rows] for k in names}
    n = len(rows)
    total, size = _padded_size(n, batch_size, buckets)
    table, id_rows = _item_id_table(trained, ds, rows, raw_ids)
    rows_p = _pad(rows, total, -1)
    audience = None
    if trained.model.item.use_history:   # a known item pools its training audience; new ones have none
        audience = item_audience_mean(ds, trained.tables["user"], rows_p)
    feats = {k: _pad(np.asarray(features[k]), total, 0) for k in names}
    out = run_item_tower(trained.graphdef, trained.params, table, _pad(id_rows, total, -1), feats,
                         batch_size=size, audience=audience)
    return np.asarray(out[:n], np.float32)


# ------------------------------------------------------------------------------------------------- users
def history_len_of(trained) -> int:
    """The history length the run trained with (its config's data.history_len)."""
    return int((getattr(trained, "config", None) or {}).get("data", {}).get("history_len", 0) or 0)


def stored_user_inputs(trained, ds, users, history_len: int | None = None) -> UserInputs:
    """The inputs of known users from the data: their stored features and last training items.

    Args:
      users: int[Q] user rows of `ds`.
      history_len: H; None = the run's own.
    """
    users = np.asarray(users, np.int32)
    feats = {k: ds.user_features[k][users] for k in feature_names(trained.model)[0]}
    history = None
    if trained.model.user.use_history:
        history = user_history(ds, users, history_len_of(trained) if history_len is None else history_len)
    return UserInputs(users, feats, history)


def _user_forward(trained):
    """The user tower as one jitted call over pre-flattened parameters, built once per trained model.

    Taking the graph definition as a static argument and the parameters as an `nnx.State` would hash the one
    and flatten the other in Python at every call, which costs more than the tower itself at serving batch
    sizes. Here both happen once (the graph definition is closed over, the parameters become a flat list of
    arrays), and `towers.embed.user_forward` runs inside.
    """
    cache = vars(trained)
    if "_inference_user_forward" not in cache:
        import jax

        leaves, treedef = jax.tree.flatten(trained.params)
        graphdef = trained.graphdef
        user_table = trained.tables.get("user") if trained.model.user.use_id else None

        def forward(leaves, user_table, item_table, ids, history, feats, extra_id_emb):
            return user_forward(graphdef, jax.tree.unflatten(treedef, leaves), user_table, item_table, ids,
                                history, feats, extra_id_emb)

        cache["_inference_user_forward"] = (jax.jit(forward), leaves, user_table, trained.tables.get("item"))
    return cache["_inference_user_forward"]


def embed_users(trained, ds, users, *, history_len: int | None = None, batch_size: int = 8192,
                buckets: tuple[int, ...] | None = None, condition=None) -> np.ndarray:
    """User embeddings of a trained run.

    Args:
      trained: a `towers.restore.TrainedModel` (or `Towers`).
      ds: the run's dataset (read only for user rows).
      users: int[Q] user rows of `ds` (`stored_user_inputs`), or `UserInputs` encoded from requests.
      history_len: H for user rows; None = the run's own.
      batch_size: users per tower call without `buckets`.
      buckets: pad to the smallest of these sizes holding the users (or to a multiple of the largest).
      condition: int[Q] condition codes for user rows of a conditional tower (-1 = none); `UserInputs` carry
        their own. Ignored by an unconditional tower.
    Returns:
      float32[Q, output_dim]; float32[Q, K, output_dim] for a user tower with K = `num_embeddings` > 1, the
      embeddings past each user's K' (`towers.inference.multi.active_interests`, from its valid history items)
      zeroed: those are not searched.
    """
    inputs = users if isinstance(users, UserInputs) else stored_user_inputs(trained, ds, users, history_len)
    if condition is not None:
        inputs = dataclasses.replace(inputs, condition=condition)
    n = len(inputs)
    total, size = _padded_size(n, batch_size, buckets)
    fn, leaves, user_table, item_table = _user_forward(trained)
    rows = _pad(np.asarray(inputs.rows, np.int32), total, -1)
    feats = {k: _pad(np.asarray(v), total, 0) for k, v in inputs.features.items()}
    if inputs.condition is not None and trained.model.user.condition is not None:
        feats[CONDITION] = _pad(np.asarray(inputs.condition, np.int32), total, -1)
    history = None if inputs.history is None else _pad(np.asarray(inputs.history, np.int32), total, -1)
    extra = None
    if user_table is not None and inputs.id_emb is not None:
        extra = _pad(np.asarray(inputs.id_emb, np.float32), total, 0.0)
    out = [np.asarray(fn(leaves, user_table, item_table, rows[a:a + size],
                         None if history is None else history[a:a + size],
                         {k: v[a:a + size] for k, v in feats.items()}, None if extra is None else extra[a:a + size]))
           for a in range(0, total, size)]
    if not out:
        return np.zeros((0, 0), np.float32)
    emb = np.concatenate(out)[:n].astype(np.float32)
    if emb.ndim == 3 and inputs.history is not None:
        from towers.inference.multi import active_interests
        tower = trained.model.user
        active = active_interests((np.asarray(inputs.history) >= 0).sum(axis=1), emb.shape[1],
                                  tower.history_per_interest)
        emb[np.arange(emb.shape[1])[None, :] >= active[:, None]] = 0.0
    return emb
