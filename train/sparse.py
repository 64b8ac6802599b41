"""Row-sparse optimizers for large ID embedding tables: a step costs O(rows touched), not O(table).

A batch touches a few thousand rows of a table of millions. The training step gathers the de-duplicated
touched rows (padded to a fixed length U by the input pipeline), differentiates with respect to the gathered
[U, D] block (so duplicate ids are already summed), psums the block's gradient across devices, and calls

    new_table, new_state = opt.update(table, state, rows, grads, valid, step)

which gathers U rows of the table and of the optimizer state, applies the optimizer's math to them, and scatters
them back. No dense [N, D] gradient or update is ever built, and under `jax.jit(..., donate_argnums=...)` on the
table and state the scatters happen in place (without donation XLA must copy the whole table every step).

Padding: `rows` has a fixed length U for jit; entries with `valid=False` are routed to the out-of-bounds index N
and dropped by the scatters (`mode="drop"`), and gathered as zeros (`mode="fill"`). So the pad value may be
anything, including a row that is also a real entry. The valid entries of `rows` must be unique.

Each optimizer also has `dense_reference_update(table, state, full_grad, step)`: the same math applied to the
whole table, to every row whose gradient is not all zero ("lazy" semantics: a row the batch did not touch keeps
its weights, moments and counts, and is not weight-decayed). It is O(table) and exists for tests and checks.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

LearningRate = float | Callable[[jax.Array], jax.Array]


def _learning_rate(learning_rate: LearningRate, step) -> jax.Array:
    return jnp.asarray(learning_rate(step) if callable(learning_rate) else learning_rate, jnp.float32)


class _RowwiseOptimizer:
    """Shared plumbing: checks, gather, scatter, and the dense reference. Subclasses define `_rows_update`."""

    def __init__(self, learning_rate: LearningRate, weight_decay: float = 0.0):
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay

    def init(self, table: jax.Array) -> dict:
        """Optimizer state for a [num_rows, dim] table: a dict of arrays with leading dimension num_rows."""
        raise NotImplementedError

    def _rows_update(self, w, state_rows, g, lr):
        """The optimizer's math on a block of rows: float32 w, g [R, dim] -> (new w [R, dim], new state rows)."""
        raise NotImplementedError

    def update(self, table, state, rows, grads, valid, step):
        """Applies one step to the touched rows only; every other row and its state stay bit-identical.

        Args:
          table: [num_rows, dim] embedding table (donate it, and `state`, so the scatter is in place).
          state: dict from `init`.
          rows: int[U] touched row ids; the valid ones must be unique.
          grads: [U, dim] gradient of each touched row (summed over duplicate ids and across devices).
          valid: bool[U], False for padding entries, which change nothing.
          step: int scalar, the global step (for learning-rate schedules).

        Returns:
          (new_table [num_rows, dim], new_state).
        """
        num_rows, dim = table.shape
        if rows.ndim != 1 or grads.shape != (rows.shape[0], dim) or valid.shape != rows.shape:
            raise ValueError(f"{type(self).__name__}.update: rows {tuple(rows.shape)}, grads {tuple(grads.shape)} "
                             f"and valid {tuple(valid.shape)} must be [U], [U, {dim}] and [U] for a table of "
                             f"shape {tuple(table.shape)}.")
        # Padding goes out of bounds: gathered as zeros, dropped by every scatter, whatever its original value.
        safe = jnp.where(valid.astype(bool), rows, num_rows)

        def gather(x):
            return x.at[safe].get(mode="fill", fill_value=0)

        def scatter(x, new):
            return x.at[safe].set(new.astype(x.dtype), mode="drop")

        lr = _learning_rate(self.learning_rate, step)
        w = gather(table).astype(jnp.float32)
        new_w, new_state_rows = self._rows_update(w, {k: gather(v) for k, v in state.items()},
                                                  grads.astype(jnp.float32), lr)
        new_state = {k: scatter(state[k], new_state_rows[k]) for k in state}
        return scatter(table, new_w), new_state

    def dense_reference_update(self, table, state, full_grad, step):
        """The same step as `update`, computed densely over the whole table (O(table); for tests).

        Args:
          table: [num_rows, dim].
          state: dict from `init`.
          full_grad: [num_rows, dim] dense gradient; rows that are all zero count as untouched.
          step: int scalar.

        Returns:
          (new_table, new_state), changed only on rows with a nonzero gradient.
        """
        touched = jnp.any(full_grad != 0, axis=1)
        new_w, new_state = self._rows_update(table.astype(jnp.float32), state, full_grad.astype(jnp.float32),
                                             _learning_rate(self.learning_rate, step))

        def pick(new, old):
            mask = touched.reshape(touched.shape + (1,) * (old.ndim - 1))
            return jnp.where(mask, new.astype(old.dtype), old)

        return pick(new_w, table), {k: pick(new_state[k], state[k]) for k in state}


class RowwiseSGD(_RowwiseOptimizer):
    """Plain SGD on touched rows: `w -= lr * (g + weight_decay * w)`. No state."""

    def init(self, table):
        return {}

    def _rows_update(self, w, state_rows, g, lr):
        return w - lr * (g + self.weight_decay * w), {}


class RowwiseAdagrad(_RowwiseOptimizer):
    """Row-wise Adagrad as in FBGEMM / TorchRec: one accumulator per row instead of one per weight.

    For a touched row r with gradient g (after L2 weight decay `g += weight_decay * w`, as FBGEMM's L2 mode):

        accum[r] += mean(g ** 2)            # mean over the dim entries of the row
        w[r]     -= lr * g / (sqrt(accum[r]) + eps)

    The state is float32[num_rows]: 1/dim of full Adagrad's memory.
    """

    def __init__(self, learning_rate: LearningRate, eps: float = 1e-8, initial_accumulator_value: float = 0.0,
                 weight_decay: float = 0.0):
        super().__init__(learning_rate, weight_decay)
        self.eps = eps
        self.initial_accumulator_value = initial_accumulator_value

    def init(self, table):
        return {"accum": jnp.full((table.shape[0],), self.initial_accumulator_value, jnp.float32)}

    def _rows_update(self, w, state_rows, g, lr):
        g = g + self.weight_decay * w
        accum = state_rows["accum"] + jnp.mean(g * g, axis=1)
        return w - (lr / (jnp.sqrt(accum) + self.eps))[:, None] * g, {"accum": accum}


class LazyAdam(_RowwiseOptimizer):
    """Adam whose moments, step counts and bias corrections advance only for the rows a batch touches.

    Bias correction uses a per-row count of the steps that touched the row, not the global step (TF's LazyAdam
    uses the global step). With the global step a row first touched at step 10 000 gets no bias correction on its
    zero-initialised moments, so its first update is (1 - b1) / sqrt(1 - b2), about 3.2 times, a corrected one;
    with per-row counts every row's first update is a properly corrected Adam step. For a row touched at every step
    both choices agree with `optax.adam`. Weight decay is decoupled (AdamW) and also lazy.

    State: m, v float32[num_rows, dim] and count int32[num_rows]. The moments make memory O(table); prefer
    `RowwiseAdagrad` for the largest tables.
    """

    def __init__(self, learning_rate: LearningRate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(learning_rate, weight_decay)
        self.b1, self.b2, self.eps = b1, b2, eps

    def init(self, table):
        # Two separate buffers: sharing one between m and v would break donating the state.
        return {"m": jnp.zeros(table.shape, jnp.float32), "v": jnp.zeros(table.shape, jnp.float32),
                "count": jnp.zeros((table.shape[0],), jnp.int32)}

    def _rows_update(self, w, state_rows, g, lr):
        count = state_rows["count"] + 1
        m = self.b1 * state_rows["m"] + (1 - self.b1) * g
        v = self.b2 * state_rows["v"] + (1 - self.b2) * g * g
        t = count.astype(jnp.float32)[:, None]
        m_hat = m / (1 - self.b1 ** t)
        v_hat = v / (1 - self.b2 ** t)
        new_w = w - lr * (m_hat / (jnp.sqrt(v_hat) + self.eps) + self.weight_decay * w)
        return new_w, {"m": m, "v": v, "count": count}


class FrozenTable:
    """A table that does not train (`model.<tower>.table.freeze`): no state, and `update` returns the table
    untouched, so under donation the step hands the same buffer back and the table stays bit-identical."""

    def init(self, table):
        return {}

    def update(self, table, state, rows, grads, valid, step):
        return table, state

    def dense_reference_update(self, table, state, full_grad, step):
        return table, state


_OPTIMIZERS = {"rowwise_adagrad": RowwiseAdagrad, "lazy_adam": LazyAdam, "sgd": RowwiseSGD}


def make_sparse_optimizer(name: str, **kwargs) -> _RowwiseOptimizer:
    """Builds a row-sparse optimizer by config name.

    Args:
      name: "rowwise_adagrad" | "lazy_adam" | "sgd" (`optimizer.sparse.name`).
      **kwargs: the class's arguments, e.g. learning_rate (a float or an optax schedule of the step).

    Returns:
      An object with `init(table)`, `update(table, state, rows, grads, valid, step)` and
      `dense_reference_update(table, state, full_grad, step)`.
    """
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown sparse optimizer {name!r}; choose one of {', '.join(_OPTIMIZERS)}.")
    return _OPTIMIZERS[name](**kwargs)
