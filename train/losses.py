"""The sampled-softmax retrieval loss, written as a chain of small pure corrections.

Each row of a batch is one (query, positive item) pair. Its candidates are the positives of the whole *global*
batch (gathered across devices) plus M uniformly drawn corpus items shared by all rows (mixed negative sampling,
Yang et al., WWW 2020), plus optionally M_r uniform items of the row's own ([batch, M_r], as BSL and SimpleX
draw them). The chain, in the order `retrieval_loss` applies it:

    (user dropout, in the step) -> scores (+ row_scores) -> apply_temperature -> apply_logq_correction
           -> mask_accidental_hits -> (hard_negative_mining) -> softmax_cross_entropy | bsl_cross_entropy

`loss_type="ccl"` swaps the softmax for SimpleX's cosine contrastive loss (Mao et al., CIKM 2021) on the raw
cosine scores of the same candidates: `relu(1 - cos(q, pos)) + w * mean_neg relu(cos(q, neg) - margin)`; no
temperature and no log q (it scores each pair on its own, so the sampler's frequencies do not enter the loss).

The log-q correction (Yi et al., RecSys 2019) *subtracts* the log of each candidate's expected count in the
candidate set, so items that are sampled often (popular items) are not over-penalised as negatives.
`log_expected_count` computes that term for both samplers.

Everything returns sums and counts (never means), so padded rows, the last partial batch and several devices
or hosts combine exactly; the caller divides on the host.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_value(dtype) -> jax.Array:
    """The finite stand-in for -inf used to remove a candidate.

    Half the dtype's most negative value: `exp` of it underflows to exactly 0 in the softmax, it stays finite
    (so no inf - inf = nan in `log_softmax` or its gradient), and it cannot overflow when subtracted from.
    """
    return jnp.asarray(jnp.finfo(dtype).min / 2, dtype)


def log_expected_count(prob, num_draws) -> jax.Array:
    """log q: the log of a candidate's expected count in the candidate set, `log(num_draws * prob)`.

    In-batch candidate j: `prob` is the item's training frequency p_j and `num_draws` the GLOBAL batch size.
    Uniform negative: `prob = 1 / num_items` and `num_draws` the GLOBAL number of negatives M.

    Args:
      prob: float[...] sampling probabilities; must be > 0 (log 0 = -inf would make that logit +inf).
      num_draws: scalar draws per step over all devices.

    Returns:
      float[...] log expected counts, same shape as `prob`.
    """
    return jnp.log(jnp.asarray(num_draws, jnp.float32) * jnp.asarray(prob, jnp.float32))


def apply_dropout(x: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout with a given mask: kept entries scaled by 1 / (1 - rate), the others zero.

    Args:
      x: [..., dim] values (the user embeddings q).
      keep: bool[..., dim] (or broadcastable) entries kept.
      rate: drop probability in [0, 1).
    """
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Inverted dropout of each entry with probability `rate` (training only: the caller passes a fresh key)."""
    if rate <= 0:
        return x
    return apply_dropout(x, jax.random.bernoulli(rng, 1.0 - rate, x.shape), rate)


def scores(q: jax.Array, c: jax.Array) -> jax.Array:
    """Dot-product scores of every query with every candidate.

    Args:
      q: [batch, dim] query embeddings.
      c: [num_candidates, dim] candidate embeddings.

    Returns:
      [batch, num_candidates] scores, at least float32 (bfloat16 towers still get a float32 softmax).
    """
    out_dtype = jnp.promote_types(jnp.result_type(q, c), jnp.float32)
    return jnp.einsum("bd,cd->bc", q, c, preferred_element_type=out_dtype)


def row_scores(q: jax.Array, c: jax.Array) -> jax.Array:
    """Scores of each query with its own candidates.

    Args:
      q: [batch, dim] query embeddings.
      c: [batch, num_per_row, dim] row i's candidates.

    Returns:
      [batch, num_per_row] scores, at least float32.
    """
    out_dtype = jnp.promote_types(jnp.result_type(q, c), jnp.float32)
    return jnp.einsum("bd,bmd->bm", q, c, preferred_element_type=out_dtype)


def best_interest(q: jax.Array, c: jax.Array) -> jax.Array:
    """Each row's user embedding that matches its positive best, for users with K embeddings (multi-interest).

    The sampled softmax of a multi-embedding user (Fan et al., KDD 2025; MIND's hard label-aware attention)
    scores the positive with the embedding k* = argmax_k q_k . c and then ranks every candidate of the row
    against that same q_{k*}: the interest that explains the positive is pulled towards it and pushed away from
    the negatives, the other interests are left alone. The alternative, scoring each candidate with its own best
    interest (max over K for every column), is closer to how the merged serving lists are built, but then each
    row pushes every interest away from the negatives near it, also in rows whose positive another interest
    explains: each interest is trained on rows that are not its own, which works against the clustering. It
    also needs K score matrices instead of one. The argmax is a discrete choice: no gradient flows through it
    (ties: the lower k).

    Args:
      q: [batch, K, dim] user embeddings, or [batch, dim] (returned unchanged).
      c: [batch, dim] each row's positive item.

    Returns:
      [batch, dim] q[i, k*_i], ready for `retrieval_loss`.
    """
    if q.ndim == 2:
        return q
    out_dtype = jnp.promote_types(jnp.result_type(q, c), jnp.float32)
    match = jnp.einsum("bkd,bd->bk", q, c, preferred_element_type=out_dtype)
    k = jax.lax.stop_gradient(jnp.argmax(match, axis=1))
    return jnp.take_along_axis(q, k[:, None, None], axis=1)[:, 0]


def apply_temperature(logits: jax.Array, temperature) -> jax.Array:
    """Divides [batch, num_candidates] logits by a scalar temperature (> 0; smaller = sharper softmax)."""
    return logits / temperature


def apply_logq_correction(logits: jax.Array, candidate_logq: jax.Array) -> jax.Array:
    """Sampling-bias correction: subtracts each candidate's log expected count from its column.

    Args:
      logits: [batch, num_candidates].
      candidate_logq: [num_candidates] log q of each candidate (see `log_expected_count`), or
        [batch, num_candidates] when rows have candidates of their own.

    Returns:
      [batch, num_candidates] `logits - candidate_logq` (broadcast over rows). Subtracting (not adding) is the
      correct sign: a popular candidate's logit goes down.
    """
    logq = candidate_logq if candidate_logq.ndim == 2 else candidate_logq[None, :]
    return logits - logq.astype(logits.dtype)


def accidental_hits(label_ids: jax.Array, candidate_ids: jax.Array, label_cols: jax.Array) -> jax.Array:
    """Where a candidate is the row's own positive item but not the row's label column.

    Args:
      label_ids: [batch] item id of each row's positive.
      candidate_ids: [num_candidates] item id of each candidate.
      label_cols: int[batch] column of each row's label.

    Returns:
      bool[batch, num_candidates], True at accidental hits.
    """
    same_item = candidate_ids[None, :] == label_ids[:, None]
    cols = jnp.arange(candidate_ids.shape[0])
    return same_item & (cols[None, :] != label_cols[:, None])


def outside_condition(row_condition: jax.Array, values: jax.Array) -> jax.Array:
    """Where a candidate lacks its row's condition value (conditional retrieval's filtered softmax).

    Args:
      row_condition: int[batch] each row's condition code; -1 = none (that row keeps every candidate).
      values: the candidates' values of the condition feature, L slots each (1 for a categorical feature, -1
        padded for a multihot one): int[C, L] shared by all rows, or int[batch, C, L] each row's own.
    Returns:
      bool[batch, C], True where the candidate has not the row's value.
    """
    values = values[None] if values.ndim == 2 else values
    has = jnp.any(values == row_condition[:, None, None], axis=-1)
    return ~has & (row_condition[:, None] >= 0)


def row_accidental_hits(label_ids: jax.Array, row_ids: jax.Array) -> jax.Array:
    """Where a row's own negative is the row's positive item.

    Args:
      label_ids: [batch] item id of each row's positive.
      row_ids: [batch, per_row] item ids of each row's own negatives.

    Returns:
      bool[batch, per_row], True at accidental hits.
    """
    return row_ids == label_ids[:, None]


def mask_accidental_hits(logits, label_ids, candidate_ids, label_cols) -> jax.Array:
    """Removes accidental hits from the softmax (see `accidental_hits` for the arguments' shapes).

    Returns:
      [batch, num_candidates] logits, with `masked_value` wherever a candidate equals the row's positive item,
      except at the row's own label column.
    """
    hits = accidental_hits(label_ids, candidate_ids, label_cols)
    return jnp.where(hits, masked_value(logits.dtype), logits)


def softmax_cross_entropy(logits: jax.Array, label_cols: jax.Array) -> jax.Array:
    """Per-row softmax cross entropy.

    Args:
      logits: [batch, num_candidates].
      label_cols: int[batch] column of each row's label.

    Returns:
      [batch] `logsumexp(logits[i]) - logits[i, label_cols[i]]`.
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits, label_cols)


def bsl_cross_entropy(logits: jax.Array, label_cols: jax.Array, negative_power: float) -> jax.Array:
    """Per-row softmax cross entropy with the negatives' log-sum-exp raised to a power (BSL, Wu et al. 2024).

    With z = logits[i], p = `negative_power` and N(i) every column but the label:

        loss_i = -log( exp(z_label) / (exp(z_label) + (sum_{j in N(i)} exp(z_j)) ** p) )
               = softplus(p * logsumexp_{j in N(i)} z_j - z_label)

    p = 1 is the plain softmax cross entropy. p > 1 weighs the negatives' partition more (BSL's extra
    robustness on the negative side: its exponent is the ratio of the two temperatures, tau_2 / tau_1).
    BSL's code sums the negatives only, `-z_label + p * logsumexp_N z`; here the label stays in the denominator
    so that p = 1 is exactly the softmax the rest of the chain uses. The two agree while the negatives' term
    dominates; they differ for a row whose label already outscores its negatives by far, which then stops
    pulling here (as in the softmax) but keeps pulling in BSL's form. Masked columns (`masked_value`) drop out
    of the sum; a row without negatives costs 0.

    Args:
      logits: [batch, num_candidates] after temperature, log q and masking.
      label_cols: int[batch] column of each row's label.
      negative_power: p > 0.

    Returns:
      [batch] per-row losses.
    """
    is_label = jnp.arange(logits.shape[1])[None, :] == label_cols[:, None]
    floor = masked_value(logits.dtype)
    neg_lse = jax.nn.logsumexp(jnp.where(is_label, floor, logits), axis=1)
    # Clipped at the masked value: p * (a very negative number) must not overflow to -inf.
    neg_term = jnp.maximum(negative_power * neg_lse, floor)
    label_logit = jnp.take_along_axis(logits, label_cols[:, None], axis=1)[:, 0]
    return jax.nn.softplus(neg_term - label_logit)


def cosine_contrastive_loss(raw: jax.Array, label_cols: jax.Array, removed: jax.Array, *, margin: float,
                            negative_weight: float) -> jax.Array:
    """Per-row cosine contrastive loss (CCL, SimpleX): pull the positive to cosine 1, push negatives below margin.

    Args:
      raw: [batch, num_candidates] cosine scores (the towers must L2-normalise their outputs).
      label_cols: int[batch] column of each row's positive.
      removed: bool[batch, num_candidates], True at columns that are not negatives of that row (accidental
        hits, padding, excluded in-batch columns). The label column is never a negative, whatever it says.
      margin: negatives with cosine at or below it cost nothing; in [-1, 1).
      negative_weight: weight of the mean negative term.

    Returns:
      [batch] `relu(1 - raw[i, label]) + negative_weight * mean_{j negative} relu(raw[i, j] - margin)`; a row
      with no negative left gets only its positive term.
    """
    cols = jnp.arange(raw.shape[1])
    is_label = cols[None, :] == label_cols[:, None]
    neg = ~(removed | is_label)
    pos_term = jax.nn.relu(1.0 - jnp.take_along_axis(raw, label_cols[:, None], axis=1)[:, 0])
    neg_sum = jnp.sum(jnp.where(neg, jax.nn.relu(raw - margin), 0.0), axis=1)
    neg_mean = neg_sum / jnp.maximum(jnp.sum(neg, axis=1), 1)
    return pos_term + negative_weight * neg_mean


def hard_negative_mining(logits: jax.Array, label_cols: jax.Array, num_hard: int):
    """Keeps each row's label column and its `num_hard` highest-scoring other columns (TFRS HardNegativeMining).

    Args:
      logits: [batch, num_candidates].
      label_cols: int[batch].
      num_hard: negatives kept per row; must be < num_candidates.

    Returns:
      ([batch, num_hard + 1] logits with the label in column 0, int[batch] zeros: the new label columns).
    """
    if not 0 < num_hard < logits.shape[1]:
        raise ValueError(f"hard_negative_mining: num_hard={num_hard} must be in [1, {logits.shape[1] - 1}] "
                         f"for logits of shape {logits.shape}; lower num_hard or add candidates.")
    is_label = jnp.arange(logits.shape[1])[None, :] == label_cols[:, None]
    # Ranking the label above everything puts it at position 0 of the top-k.
    ranked = jnp.where(is_label, jnp.finfo(logits.dtype).max, logits)
    _, cols = jax.lax.top_k(ranked, num_hard + 1)
    return jnp.take_along_axis(logits, cols, axis=1), jnp.zeros_like(label_cols)


def in_batch_recall_hits(logits, label_cols, k: int, mask=None) -> jax.Array:
    """Number of rows whose label column ranks in the top `k` of its row (a cheap training metric).

    A row is a hit when fewer than `k` columns score strictly above its label, so ties count in the label's favour.

    Args:
      logits: [batch, num_candidates].
      label_cols: int[batch].
      k: cutoff, >= 1.
      mask: optional float[batch] row weights (0 = padding).

    Returns:
      float32 scalar: the (weighted) number of hits; divide by the summed mask on the host.
    """
    label_logit = jnp.take_along_axis(logits, label_cols[:, None], axis=1)
    rank = jnp.sum(logits > label_logit, axis=1)
    hits = (rank < k).astype(jnp.float32)
    return jnp.sum(hits if mask is None else hits * mask)


def _shape_error(name, x, expected, why):
    raise ValueError(f"retrieval_loss: {name} has shape {tuple(x.shape)} but {why} needs shape {expected}; "
                     f"fix the shape of {name}.")


def _check_inputs(q, c, temperature, candidate_ids, candidate_logq, label_ids, neg_c, neg_ids, neg_logq, mask,
                  remove_accidental_hits, in_batch_negatives=True, loss_type="softmax", num_hard_negatives=None,
                  row_neg_c=None, row_neg_ids=None, row_neg_logq=None, negative_power=1.0):
    """Raises ValueError at trace time for inconsistent arguments (the message says what to change)."""
    if q.ndim != 2 or q.shape != c.shape:
        raise ValueError(f"retrieval_loss: q has shape {tuple(q.shape)} and c has shape {tuple(c.shape)}; both must "
                         "be [batch, dim] with one positive item per query row.")
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"retrieval_loss: temperature={temperature} must be > 0 (logits are divided by it).")
    batch, dim = q.shape
    for name, x in (("candidate_ids", candidate_ids), ("candidate_logq", candidate_logq),
                    ("label_ids", label_ids), ("mask", mask)):
        if x is not None and x.shape != (batch,):
            _shape_error(name, x, (batch,), f"q of shape {tuple(q.shape)}")
    if neg_c is None:
        if neg_ids is not None or neg_logq is not None:
            raise ValueError("retrieval_loss: neg_ids/neg_logq were given without neg_c; pass the negatives' "
                             "embeddings as neg_c [num_negatives, dim] or drop neg_ids/neg_logq.")
    else:
        if neg_c.ndim != 2 or neg_c.shape[1] != dim:
            _shape_error("neg_c", neg_c, ("num_negatives", dim), f"q of shape {tuple(q.shape)}")
        for name, x in (("neg_ids", neg_ids), ("neg_logq", neg_logq)):
            if x is not None and x.shape != (neg_c.shape[0],):
                _shape_error(name, x, (neg_c.shape[0],), f"neg_c of shape {tuple(neg_c.shape)}")
        if (candidate_logq is None) != (neg_logq is None):
            raise ValueError("retrieval_loss: the log-q correction needs both candidate_logq and neg_logq (or "
                             "neither); correcting only one source biases the softmax towards the other.")
    _check_row_negatives(q, candidate_logq, row_neg_c, row_neg_ids, row_neg_logq)
    if remove_accidental_hits and (candidate_ids is None or (neg_c is not None and neg_ids is None)
                                   or (row_neg_c is not None and row_neg_ids is None)):
        raise ValueError("retrieval_loss: remove_accidental_hits=True needs item ids: pass candidate_ids [batch] "
                         "(and neg_ids [num_negatives] with neg_c, row_neg_ids [batch, per_row] with row_neg_c), "
                         "or set remove_accidental_hits=False.")
    if isinstance(negative_power, (int, float)) and not negative_power > 0:
        raise ValueError(f"retrieval_loss: negative_power={negative_power} must be > 0 (1 = plain softmax).")
    if loss_type not in ("softmax", "ccl"):
        raise ValueError(f"retrieval_loss: loss_type={loss_type!r} must be 'softmax' or 'ccl'.")
    if not in_batch_negatives and neg_c is None and row_neg_c is None:
        raise ValueError("retrieval_loss: in_batch_negatives=False leaves no negatives without neg_c; pass "
                         "sampled negatives or keep the in-batch ones.")
    if loss_type == "ccl" and num_hard_negatives is not None:
        raise ValueError("retrieval_loss: num_hard_negatives applies to the softmax only; drop it with "
                         "loss_type='ccl'.")


def _check_row_negatives(q, candidate_logq, row_neg_c, row_neg_ids, row_neg_logq):
    """The per-row negatives' shapes agree with q, and their log q comes exactly when the in-batch one does."""
    if row_neg_c is None:
        if row_neg_ids is not None or row_neg_logq is not None:
            raise ValueError("retrieval_loss: row_neg_ids/row_neg_logq were given without row_neg_c; pass the "
                             "per-row negatives' embeddings as row_neg_c [batch, per_row, dim] or drop them.")
        return
    batch, dim = q.shape
    if row_neg_c.ndim != 3 or row_neg_c.shape[0] != batch or row_neg_c.shape[2] != dim:
        _shape_error("row_neg_c", row_neg_c, (batch, "per_row", dim), f"q of shape {tuple(q.shape)}")
    for name, x in (("row_neg_ids", row_neg_ids), ("row_neg_logq", row_neg_logq)):
        if x is not None and x.shape != row_neg_c.shape[:2]:
            _shape_error(name, x, row_neg_c.shape[:2], f"row_neg_c of shape {tuple(row_neg_c.shape)}")
    if (candidate_logq is None) != (row_neg_logq is None):
        raise ValueError("retrieval_loss: the log-q correction needs both candidate_logq and row_neg_logq (or "
                         "neither); correcting only one source biases the softmax towards the other.")


def _gather(x, axis_name):
    """Concatenates the per-device [n, ...] blocks of x in device order (None passes through)."""
    if x is None or axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, tiled=True)


def _concat(in_batch, negatives):
    return in_batch if negatives is None else jnp.concatenate([in_batch, negatives.astype(in_batch.dtype)])


def _global_candidates(c, candidate_ids, candidate_logq, neg_c, neg_ids, neg_logq, axis_name, gather_negatives):
    """[gathered in-batch positives; negatives]: embeddings [C, dim], ids [C] and log q [C] (None if not given),
    and the number of in-batch columns (the first ones)."""
    neg_axis = axis_name if gather_negatives else None
    in_batch = _gather(c, axis_name)
    cands = _concat(in_batch, _gather(neg_c, neg_axis))
    ids = None if candidate_ids is None else _concat(_gather(candidate_ids, axis_name), _gather(neg_ids, neg_axis))
    logq = None if candidate_logq is None else _concat(_gather(candidate_logq, axis_name),
                                                       _gather(neg_logq, neg_axis))
    return cands, ids, logq, in_batch.shape[0]


def _append_row_negatives(raw, removed, hits, logq, row_raw, row_hits, row_logq):
    """The [batch, C] score, removed, hit and log q arrays with the rows' own [batch, M_r] columns appended
    (log q becomes [batch, C + M_r]; row_hits None = no hits)."""
    removed = jnp.pad(removed, ((0, 0), (0, row_raw.shape[1])))
    hits = jnp.concatenate([hits, jnp.zeros(row_raw.shape, bool) if row_hits is None else row_hits], axis=1)
    if logq is not None:
        logq = jnp.concatenate([jnp.broadcast_to(logq[None, :], raw.shape), row_logq.astype(logq.dtype)], axis=1)
    return jnp.concatenate([raw, row_raw], axis=1), removed, hits, logq


def _condition_columns(row_condition, candidate_condition, neg_condition, row_neg_condition, label_cols,
                       axis_name, gather_negatives, num_cols):
    """bool[batch, num_cols]: the columns outside each row's condition (never the row's own label)."""
    def flat(v):   # [n] or [n, L] -> [n, L]
        return v.reshape(v.shape[0], -1)

    values = flat(_gather(flat(candidate_condition), axis_name))
    if neg_condition is not None:
        values = jnp.concatenate([values, flat(_gather(flat(neg_condition), axis_name if gather_negatives
                                                       else None))], axis=0)
    out = outside_condition(row_condition, values)
    if row_neg_condition is not None:
        per_row = row_neg_condition.reshape(*row_neg_condition.shape[:2], -1)
        out = jnp.concatenate([out, outside_condition(row_condition, per_row)], axis=1)
    if out.shape[1] != num_cols:
        raise ValueError(f"condition values for {out.shape[1]} candidate columns, the scores have {num_cols}")
    return out & (jnp.arange(num_cols)[None, :] != label_cols[:, None])


def retrieval_loss(q, c, *, temperature, candidate_ids=None, candidate_logq=None, label_ids=None, neg_c=None,
                   neg_ids=None, neg_logq=None, axis_name=None, mask=None, remove_accidental_hits=True,
                   gather_negatives=True, num_hard_negatives=None, recall_ks=(), in_batch_negatives=True,
                   loss_type="softmax", ccl_margin=0.9, ccl_negative_weight=150.0, row_neg_c=None,
                   row_neg_ids=None, row_neg_logq=None, negative_power=1.0, row_condition=None,
                   candidate_condition=None, neg_condition=None, row_neg_condition=None):
    """Sampled softmax over [global in-batch positives ∪ M negatives ∪ the row's own M_r negatives], with log-q
    and accidental-hit corrections.

    Row i's label is in-batch column `axis_index * batch + i`. With `axis_name` set (inside pmap or shard_map)
    c, candidate_ids, candidate_logq and mask are all-gathered (tiled, device order), and so are the negatives
    when `gather_negatives` is True: each device then passes its OWN slice of the negatives and every device
    scores all M_global of them. Pass `gather_negatives=False` when every device already holds the same M.
    Either way the log q terms must use global counts (B_global, M_global; see `log_expected_count`).

    Args:
      q: [batch, dim] query embeddings of this device's rows.
      c: [batch, dim] embeddings of each row's positive item.
      temperature: scalar > 0.
      candidate_ids: optional int[batch] item ids of c's rows (needed to remove accidental hits).
      candidate_logq: optional float[batch] log expected count of each in-batch candidate.
      label_ids: optional int[batch] item id of each row's positive; defaults to candidate_ids.
      neg_c: optional [num_negatives, dim] negatives shared by all rows.
      neg_ids: optional int[num_negatives]; needed with neg_c when removing accidental hits.
      neg_logq: optional float[num_negatives]; required with neg_c exactly when candidate_logq is given.
      axis_name: mapped axis to gather candidates over, or None for a single device.
      mask: optional float[batch], 1 = real row, 0 = padding. Padding rows contribute no loss and are removed
        as candidates from the other rows' softmax.
      remove_accidental_hits: mask candidates whose id equals the row's positive id (other than the label).
      gather_negatives: see above.
      num_hard_negatives: if set, keep only the label and this many top-scoring other columns per row.
      recall_ks: cutoffs k for in-batch recall, computed on the masked raw scores (the serving ranking).
      in_batch_negatives: False = the other rows' positives are not negatives (only `neg_c` is); the label's
        log q must then be the negatives' sampler's too (a constant for uniform negatives).
      loss_type: "softmax" (sampled softmax cross entropy) or "ccl" (`cosine_contrastive_loss` on the raw
        scores; temperature and log q are then unused).
      ccl_margin, ccl_negative_weight: the CCL margin and negative weight.
      row_neg_c: optional [batch, per_row, dim] negatives of each row's own (never gathered: row i scores only
        row_neg_c[i]); their columns follow the shared ones.
      row_neg_ids: optional int[batch, per_row]; needed with row_neg_c when removing accidental hits.
      row_neg_logq: optional float[batch, per_row]; required with row_neg_c exactly when candidate_logq is given.
      negative_power: the exponent on the negatives' log-sum-exp (`bsl_cross_entropy`); 1 = plain softmax.
      row_condition: optional int[batch] condition code of each row (-1 = none): the row's softmax then keeps
        only the candidates having that value (`outside_condition`), as the filtered search at serving ranks
        only those. Needs candidate_condition ([batch] or [batch, L], gathered like the ids), neg_condition
        with neg_c and row_neg_condition ([batch, per_row(, L)]) with row_neg_c. The in-batch recall metric
        still ranks every candidate.

    Returns:
      (loss_sum, count, extras): float32 scalars `sum(mask * loss_row)` and `sum(mask)`, and a dict of sums:
      `pos_score_sum` (raw q·c of the label), `accidental_hits_sum` (masked candidate entries of real rows)
      and `hits@{k}_sum` for each k in recall_ks. Divide by `count` on the host.
    """
    _check_inputs(q, c, temperature, candidate_ids, candidate_logq, label_ids, neg_c, neg_ids, neg_logq, mask,
                  remove_accidental_hits, in_batch_negatives, loss_type, num_hard_negatives, row_neg_c,
                  row_neg_ids, row_neg_logq, negative_power)
    batch = q.shape[0]
    row_mask = jnp.ones((batch,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    label_ids = candidate_ids if label_ids is None else label_ids
    label_cols = jnp.arange(batch)
    if axis_name is not None:
        label_cols = label_cols + jax.lax.axis_index(axis_name) * batch
    cands, ids, logq, num_in_batch = _global_candidates(c, candidate_ids, candidate_logq, neg_c, neg_ids,
                                                        neg_logq, axis_name, gather_negatives)
    raw = scores(q, cands)
    # Removed entries: accidental hits, and padding rows as candidates (negatives are always real items).
    # Each row keeps its own label column in both cases.
    removed = jnp.zeros(raw.shape, bool)
    if mask is not None:
        keep = _gather(row_mask, axis_name) > 0
        keep = jnp.pad(keep, (0, cands.shape[0] - keep.shape[0]), constant_values=True)
        removed = ~keep[None, :] & (jnp.arange(cands.shape[0])[None, :] != label_cols[:, None])
    hits = accidental_hits(label_ids, ids, label_cols) if remove_accidental_hits else jnp.zeros_like(removed)
    if row_neg_c is not None:  # the row's own negatives: more columns, each row with its own items
        row_hits = row_accidental_hits(label_ids, row_neg_ids) if remove_accidental_hits else None
        raw, removed, hits, logq = _append_row_negatives(raw, removed, hits, logq, row_scores(q, row_neg_c),
                                                         row_hits, row_neg_logq)
    shown = removed  # the in-batch recall metric ranks all real candidates, whatever the loss uses
    if row_condition is not None:
        removed = removed | _condition_columns(row_condition, candidate_condition, neg_condition, row_neg_condition,
                                               label_cols, axis_name, gather_negatives, raw.shape[1])
    if not in_batch_negatives:
        cols = jnp.arange(raw.shape[1])
        in_batch = cols < num_in_batch
        removed = removed | (in_batch[None, :] & (cols[None, :] != label_cols[:, None]))

    if loss_type == "ccl":
        per_row = cosine_contrastive_loss(raw, label_cols, removed | hits, margin=ccl_margin,
                                          negative_weight=ccl_negative_weight)
        return _finish(per_row, raw, shown, hits, row_mask, label_cols, recall_ks)
    logits = apply_temperature(raw, temperature)
    if logq is not None:
        logits = apply_logq_correction(logits, logq)
    logits = jnp.where(removed | hits, masked_value(logits.dtype), logits)
    loss_cols = label_cols
    if num_hard_negatives is not None:
        logits, loss_cols = hard_negative_mining(logits, label_cols, num_hard_negatives)
    if negative_power == 1.0:
        per_row = softmax_cross_entropy(logits, loss_cols)
    else:
        per_row = bsl_cross_entropy(logits, loss_cols, negative_power)
    return _finish(per_row, raw, shown, hits, row_mask, label_cols, recall_ks)


def _finish(per_row, raw, removed, hits, row_mask, label_cols, recall_ks):
    """(loss_sum, count, extras) from per-row losses; see `retrieval_loss`. `removed` | `hits` are the columns
    the in-batch recall metric leaves out."""
    # `where` (not only the product) keeps a non-finite padding row from turning the sum into nan.
    loss_sum = jnp.sum(jnp.where(row_mask > 0, row_mask * per_row, 0.0))

    ranking = jnp.where(removed | hits, masked_value(raw.dtype), raw)
    extras = {
        "pos_score_sum": jnp.sum(row_mask * jnp.take_along_axis(raw, label_cols[:, None], axis=1)[:, 0]),
        "accidental_hits_sum": jnp.sum(hits * row_mask[:, None]),
    }
    for k in recall_ks:
        extras[f"hits@{k}_sum"] = in_batch_recall_hits(ranking, label_cols, k, row_mask)
    return loss_sum, jnp.sum(row_mask), extras
