"""The device mesh and where each part of the train state lives on it.

Sharding is chosen in config (`configs/mesh/*.yaml`: `mesh.data`, `mesh.model`), never in code. The mesh is
2-D with axes `data` and `model`:

- examples are split over every device (both axes), so the step's batch axis is ("data", "model");
- dense tower parameters, their optimizer state, the step counter and the RNG key are replicated;
- ID tables and their row-wise optimizer state are split by rows over `model` and replicated over `data`.

With `model` = 1 this is plain data parallelism. Rows go over `model` because a step reads a few thousand
rows of a table of millions: each device looks up the rows it owns, a psum over `model` assembles them (an
all-reduce of [U, dim] for U unique rows per batch, whatever the table size), and each device writes back
only its own rows. A table's rows are padded up to a multiple of the `model` size so that shards are equal;
padding rows are never read or written.

Arrays are placed with `put_global`, which in a multi-process run hands each process's devices only their own
slice of a host array (every process holds the same host array: the same global batch, the same state).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"
BATCH_AXES = (DATA, MODEL)
TABLE_KEYS = ("tables", "table_opt")


def make_mesh(devices: list, data: int, model: int) -> Mesh:
    """A (data, model) mesh; devices fill it in order, so a process's devices are neighbours on `model`."""
    if data * model != len(devices):
        raise ValueError(f"a {data} x {model} mesh needs {data * model} devices, got {len(devices)}; set "
                         "mesh.data and mesh.model to multiply to the device count")
    return Mesh(np.asarray(devices, dtype=object).reshape(data, model), (DATA, MODEL))


def padded_rows(rows: int, model: int) -> int:
    """Rows of a table split over `model` devices: `rows` rounded up to a multiple of `model`."""
    return -(-rows // model) * model


def state_specs(sharded: bool, replicated: tuple[str, ...] = ()) -> dict[str, P]:
    """PartitionSpecs of the train-state dict, one per top-level key (a pytree prefix of the state).

    Args:
      sharded: split the ID tables (and their optimizer state, whose leading axis is also the row) over
        `model`; else replicate them.
      replicated: further top-level keys of the state, replicated (e.g. "logq_freq", the streaming
        frequency estimator of `loss.logq_source=streaming`).
    """
    table = P(MODEL) if sharded else P()
    return {"params": P(), "opt_state": P(), "tables": table, "table_opt": table, "step": P(), "rng": P(),
            **{key: P() for key in replicated}}


def state_shardings(mesh: Mesh, sharded: bool, replicated: tuple[str, ...] = ()) -> dict[str, NamedSharding]:
    """`state_specs` as NamedShardings on `mesh` (the `in_shardings` / Orbax restore targets)."""
    return {k: NamedSharding(mesh, spec) for k, spec in state_specs(sharded, replicated).items()}


def put_global(tree, sharding: NamedSharding):
    """Places host arrays (the same on every process) as global arrays with `sharding`.

    In one process this is `jax.device_put`. In several, each process builds only the shards its own devices
    hold, from its copy of the host array: the share of the global batch that process feeds.

    Args:
      tree: pytree of numpy (or host-convertible) arrays with their global shapes.
      sharding: where every leaf goes.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


def table_bytes_per_device(tables: dict) -> dict[str, int]:
    """Bytes of each table held by each addressable device (the largest shard): 1/model of the table when
    split, the whole table when replicated."""
    return {name: max(s.data.nbytes for s in t.addressable_shards) for name, t in tables.items()}
