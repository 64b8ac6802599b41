"""One pure training step, written per device with an optional named axis.

`train_step(state, local, shared, ...)` runs unchanged under `jax.pmap` (the default launcher), under
`jax.shard_map` on a (data, model) mesh and under `jax.jit` (see `train/parallel.py`):

1. gather the touched ID-table rows (`shared`, de-duplicated over the global batch on the host); with
   `table_axis` set, each device holds a row shard of every table, looks up the rows it owns and a psum over
   `table_axis` assembles them;
2. run both towers; the loss all-gathers item embeddings across devices (cross-device negatives);
3. differentiate w.r.t. the dense parameters and the gathered rows, sum the gradients over devices;
4. update dense parameters with optax and the tables row-sparsely (only touched rows are written, in place
   when the state is donated; a device writes only the rows of its own shard; a frozen table is not written).

An id's table rows arrive as `*_idx` indices into the gathered rows. A hashed table gives each id K rows (a
trailing axis of size K on its `*_idx`), summed into one embedding here.

With `loss.logq_source=streaming` (`cfg.logq_streaming` set) the in-batch candidates' log q comes from the
streaming frequency estimator in `state["logq_freq"]` (`train/freq_estimator.py`) instead of the host's counts:
the step first estimates the batch's items from the state as the previous steps left it, then (after the
gradients) updates it with the positives of the whole global batch, assembled on every device, so the
replicated estimator stays the same everywhere. Estimating before updating keeps a positive's own occurrence out
of its correction and matches Algorithm 2 of Yi et al. (estimate at step t from occurrences before t).

Metrics come back as sums and counts; the host divides.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from data.types import CONDITION
from towers.features import gathered_mean
from towers.layers import l2_normalize
from towers.two_tower import drop_condition
from train import freq_estimator, losses


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static hyper-parameters of the step (hashable: part of the compiled function)."""
    temperature: float
    global_batch: int
    global_negatives: int
    num_items: int
    logq_correction: bool
    remove_accidental_hits: bool
    embedding_l2: float
    use_user_table: bool
    use_item_table: bool
    use_history: bool
    logq_mixture: bool = False
    in_batch_negatives: bool = True
    loss_type: str = "softmax"
    ccl_margin: float = 0.9
    ccl_negative_weight: float = 150.0
    use_item_history: bool = False
    negative_power: float = 1.0
    negatives_per_row: int = 0
    user_dropout: float = 0.0
    logq_streaming: freq_estimator.FreqSpec | None = None   # None: log q from the host's item counts
    condition: str | None = None        # a conditional user tower's item feature (model.user.condition)
    condition_dropout: float = 0.0      # share of rows fed no condition (model.user.condition_dropout)
    condition_filter: bool = False      # a conditional row's softmax keeps only candidates with its value
    # Averaged histories are pooled in the step, slot by slot (`tower_inputs`); False hands the towers the
    # [B, H, d] block of rows to average themselves (the same result up to float rounding; for tests).
    pool_history: bool = True
    # Cutoffs of the in-batch recall logged as train/hits@k; each costs a [B, B] comparison pass and a reduction
    # per step (about 1 ms of a 1024-example step on 2 CPU cores).
    recall_ks: tuple[int, ...] = (10,)


def _psum(x, axis_name):
    return jax.lax.psum(x, axis_name) if axis_name else x


def as_varying(tree, axis_name: str | tuple[str, ...] | None):
    """Marks replicated values as per-device before differentiating them.

    Under `shard_map`, differentiating an axis-invariant input inside the body already sums its gradient over
    the axis; under `pmap` the inputs are per-device and it does not. Casting to "varying" first gives both the
    per-device gradient, which the step then sums explicitly, once.
    """
    if not axis_name:
        return tree
    axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)

    def one(x):
        missing = tuple(a for a in axes if a not in getattr(jax.typeof(x), "vma", frozenset()))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(one, tree)


def shard_rows(table: jax.Array, rows: jax.Array, table_axis: str) -> tuple[jax.Array, jax.Array]:
    """Where global table rows fall in this device's row shard.

    Args:
      table: [shard_rows, dim] this device's shard (shard s holds global rows s*shard_rows ...).
      rows: int[U] global row ids.
      table_axis: the mesh axis the table is split over.
    Returns:
      (local int[U]: the row inside the shard, or shard_rows (out of bounds) when another shard owns it,
       owned bool[U]).
    """
    size = table.shape[0]
    local = rows - jax.lax.axis_index(table_axis) * size
    owned = (local >= 0) & (local < size)
    return jnp.where(owned, local, size), owned


def gather_rows(table: jax.Array, rows: jax.Array, table_axis: str | None) -> jax.Array:
    """table[rows] for a whole table, or for a table split by rows over `table_axis`.

    Args:
      table: [num_rows, dim], or this device's [num_rows / n, dim] shard when `table_axis` is set.
      rows: int[U] global row ids (the same on every device).
    Returns:
      [U, dim] the rows, the same on every device: each shard contributes the rows it owns (zeros for the
      others) and a psum over `table_axis` adds them up, so only [U, dim] crosses devices.
    """
    if table_axis is None:
        return table[rows]
    local, _ = shard_rows(table, rows, table_axis)
    return jax.lax.psum(table.at[local].get(mode="fill", fill_value=0), table_axis)


def _rows_of(rows: jax.Array, idx: jax.Array, base_ndim: int) -> jax.Array:
    """rows[idx], summing an id's K hashed rows when `idx` has the extra trailing axis of a hashed table."""
    out = rows[idx]
    return out.sum(axis=-2) if idx.ndim > base_ndim else out


def candidate_logq(local: dict, cfg: StepConfig) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """log of each candidate's expected count in the candidate set (Yi et al. 2019).

    In-batch positives were drawn by the data distribution: expected count B_global * p(item). Shared uniform
    negatives: M_global / num_items each (num_items = the pool they are drawn from). A row's own uniform
    negatives (`negatives_per_row` M_r): M_r / num_items each, a sampler per row. Per source (the default),
    each candidate is corrected by its own sampler's count. With `cfg.logq_mixture`, every candidate is
    corrected by its expected count in the union of the samples a row sees, B p(item) + (M + M_r) / num_items:
    the proposal the candidate set was really drawn from. Per source overstates the correction of a rare item
    drawn in-batch (log B p alone is very negative, though uniform sampling alone would have drawn it M/N
    times) and of an item drawn by both uniform samplers.

    Returns:
      (in-batch float32[B], shared negatives float32[M], the rows' own float32[B, M_r] or None).
    """
    log_b = jnp.log(float(cfg.global_batch))
    uniform = math.log(max(cfg.global_negatives, 1) / cfg.num_items)
    per_row = cfg.negatives_per_row
    row_uniform = math.log(max(per_row, 1) / cfg.num_items)
    all_uniform = math.log(max(cfg.global_negatives + per_row, 1) / cfg.num_items)
    pos = log_b + local["item_logq"]
    neg = jnp.full(local["neg_item"].shape, uniform, jnp.float32)
    row = jnp.full(local["row_neg_item"].shape, row_uniform, jnp.float32) if per_row else None
    if not cfg.in_batch_negatives:
        # Only the uniform samplers draw negatives, so the label has their joint constant count (with one
        # sampler, every candidate has the same count and the correction cancels).
        if cfg.logq_mixture:
            neg = jnp.full_like(neg, all_uniform)
            row = None if row is None else jnp.full_like(row, all_uniform)
        return jnp.full(local["item_logq"].shape, all_uniform, jnp.float32), neg, row
    if cfg.logq_mixture and (cfg.global_negatives or per_row):
        # Every in-batch item is a training item, so it is in the uniform pool too (cold items are neither).
        pos = jnp.logaddexp(pos, all_uniform)
        neg = jnp.logaddexp(log_b + local["neg_item_logq"], all_uniform)
        row = None if row is None else jnp.logaddexp(log_b + local["row_neg_item_logq"], all_uniform)
    return pos.astype(jnp.float32), neg.astype(jnp.float32), None if row is None else row.astype(jnp.float32)


def global_rows(x: jax.Array, axis_name: str | tuple[str, ...] | None) -> jax.Array:
    """The global batch's [B_global, ...] array from each device's [b, ...] block, the same on every device.

    Blocks go in device order (as `losses` gathers the candidates): each device writes its block into zeros
    at its offset and a psum adds them up, so the result is replicated (axis-invariant under shard_map) and can
    update replicated state. None = one device or GSPMD: `x` is already global.
    """
    if not axis_name:
        return x
    b, n = x.shape[0], jax.lax.psum(1, axis_name)
    out = as_varying(jnp.zeros((n * b,) + x.shape[1:], x.dtype), axis_name)
    out = jax.lax.dynamic_update_slice_in_dim(out, x, jax.lax.axis_index(axis_name) * b, 0)
    return jax.lax.psum(out, axis_name)


def streaming_logq(freq_state: dict, local: dict, cfg: StepConfig) -> dict:
    """`local` with the in-batch log q read from the streaming estimator (`cfg.logq_streaming`).

    The estimator gives each item's expected occurrences per step, `p_step`; the batch's `*_logq` are per-draw
    frequencies, so `item_logq = log(p_step / B_global)` and the positive's log expected count in
    `candidate_logq` is `log p_step`. The uniform negatives keep their known `log(M / N)`; with
    `cfg.logq_mixture`, whose in-batch part reads the negatives' data frequency too, theirs are estimated as
    well (never counted: they were not drawn from the data).
    """
    spec, log_b = cfg.logq_streaming, math.log(cfg.global_batch)

    def logq(ids):
        return freq_estimator.log_estimate(freq_state, ids, spec) - log_b

    out = dict(local, item_logq=logq(local["item"]))
    if cfg.logq_mixture:
        out["neg_item_logq"] = logq(local["neg_item"])
        if cfg.negatives_per_row:
            out["row_neg_item_logq"] = logq(local["row_neg_item"])
    return out


def update_streaming(freq_state: dict, local: dict, step: jax.Array, cfg: StepConfig,
                     axis_name: str | tuple[str, ...] | None) -> dict:
    """The estimator after seeing this step's positives: the global batch's (padding rows and ids < 0 are not
    counted), so every device applies the same update."""
    seen = jnp.where(local["mask"] > 0, local["item"] + 1, 0)   # 0 = not an occurrence, after the shift
    ids = global_rows(seen, axis_name) - 1
    return freq_estimator.update(freq_state, ids, step, cfg.logq_streaming)


def _history_of(rows: jax.Array, idx: jax.Array, mask: jax.Array, pool: bool) -> tuple[jax.Array, jax.Array]:
    """(history rows, their mask) for a tower: [B, L, d] and [B, L], or with `pool` the masked mean as a
    one-slot history, [B, 1, d] with an all-true [B, 1] mask, on which the tower's own masked mean is the
    identity (x / 1). Pooling here gathers slot by slot (`towers.features.gathered_mean`) instead of building
    the [B, L, d] block that the tower would reduce at once."""
    if not pool:
        return _rows_of(rows, idx, 2), mask
    pooled = gathered_mean(rows, idx, mask)
    return pooled[:, None, :], jnp.ones((pooled.shape[0], 1), bool)


def tower_inputs(params_rows: dict, local: dict, cfg: StepConfig, *, pool_history: bool = False,
                 pool_item_history: bool = False) -> dict:
    """Per-example ID rows gathered from the de-duplicated table rows.

    Args:
      pool_history: hand the user tower its history already mean-pooled, as a one-slot history
        (`_history_of`): for a tower that only takes the history's masked mean (not one that clusters it into
        several interests). The tower's output is the same up to float rounding (the sum's order).
      pool_item_history: the same for the item tower's audiences.
    Returns:
      {"user_id", "item_id", "neg_id", "row_neg_id", "history", "history_mask", "item_history",
       "item_history_mask", "neg_item_history", "neg_item_history_mask"}, the ones the config uses.
    """
    user_rows, item_rows = params_rows.get("user"), params_rows.get("item")
    out = {}
    if cfg.use_user_table:
        out["user_id"] = _rows_of(user_rows, local["user_idx"], 1)
        if cfg.use_item_history:
            for key in ("item_history", "neg_item_history"):
                out[key], out[f"{key}_mask"] = _history_of(user_rows, local[f"{key}_idx"], local[f"{key}_mask"],
                                                           pool_item_history)
    if cfg.use_item_table:
        out["item_id"] = _rows_of(item_rows, local["item_idx"], 1)
        out["neg_id"] = _rows_of(item_rows, local["neg_idx"], 1)
        if cfg.negatives_per_row:
            out["row_neg_id"] = _rows_of(item_rows, local["row_neg_idx"], 2)
        if cfg.use_history:
            out["history"], out["history_mask"] = _history_of(item_rows, local["history_idx"],
                                                              local["history_mask"], pool_history)
    return out


def row_negative_embeddings(model, x: dict, local: dict, rng: jax.Array) -> jax.Array:
    """[B, M_r, dim] item-tower embeddings of each row's own negatives (flattened through the tower)."""
    ids = local["row_neg_item"]
    flat = lambda a: a.reshape(ids.size, *a.shape[2:])  # noqa: E731
    id_rows = x.get("row_neg_id")
    out = model.item(jax.tree.map(flat, local["row_neg_item_feat"]), None if id_rows is None else flat(id_rows),
                     dropout_rng=rng)
    return out.reshape(*ids.shape, out.shape[-1])


def user_embeddings(model, x: dict, local: dict, rng: jax.Array, cfg: StepConfig) -> jax.Array:
    """q ([B, d], or [B, K, d] for a user tower with K embeddings), with `cfg.user_dropout` on it (training
    only: this is the loss's path). A normalising tower's q is normalised again after the dropout, so the scores
    stay cosines (SimpleX drops out, then takes cosines)."""
    q = model.user(local["user_feat"], x.get("user_id"), x.get("history"), x.get("history_mask"),
                   dropout_rng=rng)
    if not cfg.user_dropout:
        return q
    q = losses.dropout(q, cfg.user_dropout, jax.random.fold_in(rng, 1))
    return l2_normalize(q) if model.user.normalize else q


def condition_inputs(local: dict, rng: jax.Array, cfg: StepConfig) -> tuple[dict, dict]:
    """A conditional tower's training inputs: `local` with `cfg.condition_dropout` of the rows' condition codes
    set to none (-1), and the `losses.retrieval_loss` arguments of `cfg.condition_filter` (each row's softmax
    over the candidates having its value; a row without one keeps all), or {} without it."""
    if cfg.condition is None:
        return local, {}
    codes = drop_condition(local["user_feat"][CONDITION], cfg.condition_dropout, jax.random.fold_in(rng, 2))
    local = dict(local, user_feat=dict(local["user_feat"], **{CONDITION: codes}))
    if not cfg.condition_filter:
        return local, {}
    name = cfg.condition
    kw = {"row_condition": codes, "candidate_condition": local["item_feat"][name]}
    if cfg.global_negatives:
        kw["neg_condition"] = local["neg_item_feat"][name]
    if cfg.negatives_per_row:
        kw["row_neg_condition"] = local["row_neg_item_feat"][name]
    return local, kw


def loss_fn(params, rows: dict, local: dict, rng: jax.Array, *, graphdef, cfg: StepConfig,
            axis_name: str | None):
    """Global-mean sampled-softmax loss contribution of this device's rows (+ L2 on touched rows)."""
    model = nnx.merge(graphdef, params)
    # A tower that only averages its history gets it pooled here, without the [B, H, d] block of rows.
    x = tower_inputs(rows, local, cfg, pool_history=cfg.pool_history and model.user.interests is None,
                     pool_item_history=cfg.pool_history and model.item.interests is None)
    k_user, k_item, k_neg = jax.random.split(rng, 3)
    local, condition_kw = condition_inputs(local, k_user, cfg)
    q = user_embeddings(model, x, local, k_user, cfg)
    c = model.item(local["item_feat"], x.get("item_id"), x.get("item_history"), x.get("item_history_mask"),
                   dropout_rng=k_item)
    nc = model.item(local["neg_item_feat"], x.get("neg_id"), x.get("neg_item_history"),
                    x.get("neg_item_history_mask"), dropout_rng=k_neg) if cfg.global_negatives else None
    per_row = cfg.negatives_per_row
    row_nc = row_negative_embeddings(model, x, local, jax.random.fold_in(k_neg, 1)) if per_row else None
    q = losses.best_interest(q, c)   # a multi-embedding user [B, K, d]: the interest nearest the positive
    pos_logq, neg_logq, row_logq = candidate_logq(local, cfg) if cfg.logq_correction else (None, None, None)
    loss_sum, count, extras = losses.retrieval_loss(
        q, c, temperature=cfg.temperature,
        candidate_ids=local["item"], candidate_logq=pos_logq, label_ids=local["item"],
        neg_c=nc,
        neg_ids=local["neg_item"] if cfg.global_negatives else None,
        neg_logq=neg_logq if cfg.global_negatives else None,
        row_neg_c=row_nc, row_neg_ids=local["row_neg_item"] if per_row else None, row_neg_logq=row_logq,
        axis_name=axis_name, mask=local["mask"], remove_accidental_hits=cfg.remove_accidental_hits,
        recall_ks=cfg.recall_ks, in_batch_negatives=cfg.in_batch_negatives, loss_type=cfg.loss_type,
        ccl_margin=cfg.ccl_margin, ccl_negative_weight=cfg.ccl_negative_weight,
        negative_power=cfg.negative_power, **condition_kw)
    total = _psum(count, axis_name)
    loss = loss_sum / total
    if cfg.embedding_l2:
        # Each device adds 1/n of the penalty on the (replicated) touched rows, so the psum'd gradient is exact.
        n = jax.lax.psum(1, axis_name) if axis_name else 1
        loss = loss + cfg.embedding_l2 / n * sum(jnp.sum(jnp.square(r)) for r in rows.values()) / total
    return loss, {"loss_sum": loss_sum, "count": count, **extras}


def train_step(state: dict, local: dict, shared: dict, *, graphdef, cfg: StepConfig,
               dense_tx: optax.GradientTransformation, sparse_opts: dict[str, Any],
               axis_name: str | tuple[str, ...] | None = None,
               table_axis: str | None = None) -> tuple[dict, dict]:
    """One optimisation step. `state` = {params, opt_state, tables, table_opt, step, rng}, plus `logq_freq`
    with `cfg.logq_streaming`.

    Args:
      axis_name: the mapped axis (or axes) the examples are split over; None for one device or GSPMD.
      table_axis: the mesh axis the tables are split over by rows (shard_map with `mesh.model` > 1), or None
        when every device holds whole tables.
    """
    step = state["step"]
    rng = jax.random.fold_in(state["rng"], step)  # a fresh key per step, same on resume
    if axis_name:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))  # different dropout per device
    rows = {name: gather_rows(state["tables"][name], shared[f"{name}_uniq"], table_axis)
            for name in state["tables"]}
    if cfg.logq_streaming is not None:   # estimated from the steps before this one
        local = streaming_logq(state["logq_freq"], local, cfg)
    grad_fn = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)
    (g_params, g_rows), metrics = grad_fn(as_varying(state["params"], axis_name), as_varying(rows, axis_name),
                                          local, rng, graphdef=graphdef, cfg=cfg, axis_name=axis_name)
    g_params, g_rows = _psum((g_params, g_rows), axis_name)
    updates, opt_state = dense_tx.update(g_params, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    tables, table_opt = {}, {}
    for name, opt in sparse_opts.items():
        table, uniq, valid = state["tables"][name], shared[f"{name}_uniq"], shared[f"{name}_valid"]
        if table_axis is not None:  # write only this shard's rows; the other shards write theirs
            uniq, owned = shard_rows(table, uniq, table_axis)
            valid = valid & owned
        tables[name], table_opt[name] = opt.update(table, state["table_opt"][name], uniq, g_rows[name], valid,
                                                   step)
    metrics = _psum(metrics, axis_name)
    metrics["grad_norm_sq"] = optax.tree_utils.tree_norm(g_params, squared=True)
    new_state = dict(state, params=params, opt_state=opt_state, tables=tables, table_opt=table_opt,
                     step=step + 1)
    if cfg.logq_streaming is not None:
        new_state["logq_freq"] = update_streaming(state["logq_freq"], local, step, cfg, axis_name)
    return new_state, metrics


def make_step(**kwargs) -> Callable:
    """`train_step` with its static arguments bound."""
    import functools
    return functools.partial(train_step, **kwargs)
