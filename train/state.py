"""The train-state pytree: dense tower parameters and their optax state, ID tables and their row-wise
optimizer state, the step counter and the base RNG key, and with `loss.logq_source=streaming` the streaming
item-frequency estimator (`train/freq_estimator.py`). Also its abstract (shape-only) twin for Orbax."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from towers.two_tower import TwoTower
from train import freq_estimator
from train.mesh import padded_rows, put_global


def table_sizes(cfg, num_users: int, num_items: int, model: int = 1) -> dict[str, int]:
    """Rows of each ID table the model needs: the item table also serves the user's history.

    A table has one row per vocabulary id, or `model.<tower>.table.hash_buckets` rows when hashed, rounded up
    to a multiple of `model` (the mesh axis it is split over).
    """
    sizes = {}
    if cfg.model.user.use_id:
        sizes["user"] = cfg.model.user.table.hash_buckets or num_users
    if cfg.model.item.use_id or cfg.model.user.use_history:
        sizes["item"] = cfg.model.item.table.hash_buckets or num_items
    return {name: padded_rows(rows, model) for name, rows in sizes.items()}


def dense_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """optax transform for the tower parameters, from `optimizer.dense`."""
    o = cfg.optimizer.dense
    lr = learning_rate_schedule(o.learning_rate, o.schedule, o.warmup_steps, total_steps)
    tx = {"adam": lambda: optax.adam(lr),
          "adamw": lambda: optax.adamw(lr, weight_decay=o.weight_decay),
          "adagrad": lambda: optax.adagrad(lr),
          "sgd": lambda: optax.sgd(lr)}[o.name]()
    return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx) if o.grad_clip_norm else tx


def learning_rate_schedule(peak: float, kind: str, warmup: int, total: int):
    """constant (with optional linear warm-up) or warm-up + cosine decay to 0 at `total`."""
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 0), max(total, warmup + 1), 0.0)
    if warmup > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                    [warmup])
    return optax.constant_schedule(peak)


def sparse_learning_rate(o, total_steps: int):
    """The ID tables' learning rate from `optimizer.sparse`: the float itself when constant without warm-up (the
    step then computes exactly what it did before schedules existed), else an optax schedule of the global step,
    evaluated inside the jitted step.

    Args:
      o: `SparseOptimizerConfig`.
      total_steps: the run's steps (the end of a cosine decay when `decay_steps` is null).
    """
    peak = o.learning_rate
    if o.schedule == "cosine":
        decay = o.decay_steps or total_steps
        return optax.warmup_cosine_decay_schedule(0.0, peak, o.warmup_steps, max(decay, o.warmup_steps + 1),
                                                  end_value=peak * o.end_factor)
    if o.schedule == "step":
        decay = optax.exponential_decay(peak, o.step_every, o.step_factor, staircase=True)
    elif o.warmup_steps == 0:
        return peak
    else:
        decay = optax.constant_schedule(peak)
    if o.warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, o.warmup_steps), decay], [o.warmup_steps])


def init_state(cfg, model: TwoTower, sizes: dict[str, int], dense_tx, sparse_opts, seed: int, *,
               table_sharding=None, overrides: dict | None = None, abstract: bool = False,
               logq_freq: freq_estimator.FreqSpec | None = None) -> dict:
    """A fresh state. Tables are drawn on device from N(0, id_init_scale^2).

    Args:
      sizes: rows of each ID table (padded for the mesh: see `train.mesh.padded_rows`).
      table_sharding: where the tables and their optimizer state go; each device draws only its own rows,
        so a split table is never built whole on one device. None = the default device.
      overrides: {table: (rows int64[m], values float32[m, id_dim])} rows set after the draw (pre-trained).
      abstract: tables and their optimizer state as shape/dtype/sharding structs, allocating nothing (the
        restore target of a run that resumes).
      logq_freq: the streaming frequency estimator's spec (`StepConfig.logq_streaming`), or None for none.
    Returns:
      {params, opt_state, tables, table_opt, step, rng}, plus `logq_freq` (the estimator's state, shape/dtype
      structs when `abstract`) with a `logq_freq` spec; a row's value does not depend on the sharding.
    """
    _, params = nnx.split(model)
    keys = jax.random.split(jax.random.key(seed), len(sizes) + 1)
    tables, table_opt = {}, {}
    dim, scale = cfg.model.id_dim, cfg.model.id_init_scale
    for key, (name, rows) in zip(keys[1:], sorted(sizes.items())):
        if abstract:
            tables[name] = jax.ShapeDtypeStruct((rows, dim), jnp.float32, sharding=table_sharding)
            table_opt[name] = jax.eval_shape(sparse_opts[name].init, tables[name])
            continue
        override = (overrides or {}).get(name)
        if table_sharding is None or rows <= INIT_CHUNK_ROWS:
            # A small table is drawn once and copied to its devices: cheaper than a compile per device.
            table = init_table(key, rows, dim, scale, override=override)
            pair = (table, sparse_opts[name].init(table))
            tables[name], table_opt[name] = pair if table_sharding is None else _put(pair, table_sharding)
        else:  # drawn in place, shard by shard; the optimizer state likewise
            tables[name] = init_table(key, rows, dim, scale, sharding=table_sharding, override=override)
            table_opt[name] = jax.jit(sparse_opts[name].init, out_shardings=table_sharding)(tables[name])
    state = {
        "params": params,
        "opt_state": dense_tx.init(params),
        "tables": tables,
        "table_opt": table_opt,
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(keys[0]),
    }
    if logq_freq is not None:
        state["logq_freq"] = freq_estimator.abstract(logq_freq) if abstract else freq_estimator.init(logq_freq)
    return state


INIT_CHUNK_ROWS = 1 << 18


def _put(tree, sharding):
    if jax.process_count() > 1:  # each process places its own shards of the (identical) host value
        return put_global(jax.tree.map(np.asarray, tree), sharding)
    return jax.device_put(tree, sharding, donate=True)


@functools.partial(jax.jit, static_argnums=(3, 4, 6), donate_argnums=(0,))
def _fill_rows(block, key, skip, drawn: int, kept: int, dst, scale: float):
    """Rows [skip, skip + kept) of normal(key, [drawn, dim]) written into `block` at row `dst`."""
    rows = scale * jax.random.normal(key, (drawn, block.shape[1]), block.dtype)
    piece = jax.lax.dynamic_slice_in_dim(rows, skip, kept)
    return jax.lax.dynamic_update_slice(block, piece, (dst, 0))


def _init_rows(key, start: int, stop: int, dim: int, scale: float, device=None, override=None) -> jax.Array:
    """Rows [start, stop) of the table: row r is row r % CHUNK of normal(fold_in(key, r // CHUNK), [CHUNK, dim]).

    Random draws are prefix-stable (the first k rows of an [n, dim] draw are the [k, dim] draw), so a block
    drawn here equals the same rows of a table drawn whole: values do not depend on how rows are split.
    """
    block = jnp.zeros((stop - start, dim), jnp.float32, device=device)
    for c in range(start // INIT_CHUNK_ROWS, -(-stop // INIT_CHUNK_ROWS)):
        first = c * INIT_CHUNK_ROWS
        a, b = max(start, first), min(stop, first + INIT_CHUNK_ROWS)
        block = _fill_rows(block, jax.random.fold_in(key, c), jnp.int32(a - first), b - first, b - a,
                           jnp.int32(a - start), float(scale))
    if override is not None:
        rows, values = override
        mine = (rows >= start) & (rows < stop)
        if mine.any():
            block = block.at[jnp.asarray(rows[mine] - start)].set(jnp.asarray(values[mine], jnp.float32))
    return block


def init_table(key, rows: int, dim: int, scale: float, *, sharding=None, override=None) -> jax.Array:
    """A [rows, dim] table drawn from N(0, scale^2), filled in place chunk by chunk.

    Drawing the whole table in one call holds the random bits and the result at once (2-3x the table); filling
    a donated zero table in chunks keeps the peak at one table plus one chunk, which is what lets a 10M x 128
    table (5 GB) initialise on a 24 GB machine next to its twin. With a `sharding`, every device fills only
    the rows it holds, on itself.

    Args:
      key: PRNG key of this table.
      sharding: a `jax.sharding.Sharding` of the [rows, dim] table, or None for the default device.
      override: (rows int64[m], values [m, dim]) set after the draw, or None.
    """
    if sharding is None:
        return _init_rows(key, 0, rows, dim, scale, override=override)
    blocks = []
    for device, index in sharding.addressable_devices_indices_map((rows, dim)).items():
        start, stop, _ = index[0].indices(rows)
        block = _init_rows(key, start, stop, dim, scale, device=device, override=override)
        # One device at a time: devices sharing host memory (CPU) would otherwise hold every device's
        # random-draw temporaries at once.
        blocks.append(block.block_until_ready())
    return jax.make_array_from_single_device_arrays((rows, dim), sharding, blocks)


def abstract_state(state: dict) -> dict:
    """Shape/dtype/sharding twin of a state, the target Orbax restores into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        state)
