"""The train-state pytree: dense tower parameters and their optax state, ID tables and their row-wise
optimizer state, the step counter and the base RNG key. Also its abstract (shape-only) twin for Orbax."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from towers.two_tower import TwoTower


def table_sizes(cfg, num_users: int, num_items: int) -> dict[str, int]:
    """Rows of each ID table the model needs: the item table also serves the user's history."""
    sizes = {}
    if cfg.model.user.use_id:
        sizes["user"] = num_users
    if cfg.model.item.use_id or cfg.model.user.use_history:
        sizes["item"] = num_items
    return sizes


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


def init_state(cfg, model: TwoTower, sizes: dict[str, int], dense_tx, sparse_opts, seed: int) -> dict:
    """A fresh state. Tables are drawn on device from N(0, id_init_scale^2)."""
    _, params = nnx.split(model)
    keys = jax.random.split(jax.random.key(seed), len(sizes) + 1)
    tables = {}
    for key, (name, rows) in zip(keys[1:], sorted(sizes.items())):
        tables[name] = init_table(key, rows, cfg.model.id_dim, cfg.model.id_init_scale)
    return {
        "params": params,
        "opt_state": dense_tx.init(params),
        "tables": tables,
        "table_opt": {name: sparse_opts[name].init(t) for name, t in tables.items()},
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(keys[0]),
    }


INIT_CHUNK_ROWS = 1 << 18


@functools.partial(jax.jit, static_argnums=(3, 4), donate_argnums=(0,))
def _fill_rows(table, key, start, rows: int, scale: float):
    block = scale * jax.random.normal(key, (rows, table.shape[1]), table.dtype)
    return jax.lax.dynamic_update_slice(table, block, (start, 0))


def init_table(key, rows: int, dim: int, scale: float) -> jax.Array:
    """A [rows, dim] table drawn from N(0, scale^2), filled in place chunk by chunk.

    Drawing the whole table in one call holds the random bits and the result at once (2-3x the table); filling
    a donated zero table in chunks keeps the peak at one table plus one chunk, which is what lets a 10M x 128
    table (5 GB) initialise on a 24 GB machine next to its twin.
    """
    table = jnp.zeros((rows, dim), jnp.float32)
    for i, start in enumerate(range(0, rows, INIT_CHUNK_ROWS)):
        n = min(INIT_CHUNK_ROWS, rows - start)
        table = _fill_rows(table, jax.random.fold_in(key, i), jnp.int32(start), n, float(scale))
    return table


def abstract_state(state: dict) -> dict:
    """Shape/dtype/sharding twin of a state, the target Orbax restores into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        state)
