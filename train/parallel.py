"""Launchers: the same per-device step under `jax.pmap` (default), `jax.shard_map` on a mesh, or `jax.jit`.

A launcher owns where the state lives and how a host batch reaches the devices; `train/mesh.py` says where
each part goes. Under pmap the state is one global array per leaf, replicated (pmap with `in_axes=None` and
`out_axes=None` for it, so there is no per-device leading axis and a checkpoint holds one copy). Under
shard_map and jit the state lives on a (data, model) mesh: replicated when `mesh.model` is 1, ID tables split
by rows over `model` otherwise. shard_map runs the per-device body with explicit collectives (the step
assembles table rows with a psum over `model`); jit runs the same body written for one device and lets GSPMD
partition it. Examples are split over all devices along their first axis; the shared arrays (the
de-duplicated table rows) are replicated. The state is donated: tables are updated in place, never copied.

Several steps can run in one dispatch (`train.steps_per_dispatch`): `put_group` places a group of prepared
batches stacked on a leading axis and `run_group` runs them in one program, a `lax.scan` of the same step over
that axis. The host then transfers and dispatches once per group, not once per step; the results are those of
the steps one by one, up to float rounding (XLA compiles the step inside the loop as a program of its own).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train.mesh import BATCH_AXES, DATA, MODEL, make_mesh, put_global, state_shardings, state_specs

AXIS = DATA  # pmap's axis name


class Launcher:
    """Runs `step(state, local, shared, axis_name=..., table_axis=...)` on `devices` in the chosen way.

    Args:
      kind: "pmap" | "shard_map" | "jit".
      step: the per-device step (`train.step.make_step(...)`).
      devices: the devices, in mesh order (all processes' devices in a multi-process run).
      model: size of the mesh's `model` axis (tables are split over it when > 1); `data` is the rest.
      replicated: top-level state keys beyond the standard ones (`train.mesh.state_specs`), replicated.
    """

    def __init__(self, kind: str, step, devices: list, *, model: int = 1, replicated: tuple[str, ...] = ()):
        self.kind, self.devices, self.n = kind, list(devices), len(devices)
        # True when each process passes only its share of every batch (`put_batch`), as a multi-process run does.
        self.process_local_batches = False
        if self.n % model:
            raise ValueError(f"mesh.model={model} does not divide the {self.n} devices")
        if kind == "pmap" and model != 1:
            raise ValueError("pmap replicates the state; use train.launcher=shard_map or jit to split tables")
        self.model_size, self.sharded = model, model > 1
        self.mesh = make_mesh(self.devices, self.n // model, model)
        self.batch_sharding = NamedSharding(self.mesh, P(BATCH_AXES))
        self.replicated = NamedSharding(self.mesh, P())
        # pmap returns its outputs on a one-axis ('data',) mesh: the state starts there too, so the second step
        # finds the program the first compiled (on the two-axis mesh it compiled again, seconds on CPU).
        state_mesh = Mesh(np.array(self.devices), (AXIS,)) if kind == "pmap" else self.mesh
        self.state_sharding = state_shardings(state_mesh, self.sharded, replicated)
        self.table_sharding = self.state_sharding["tables"]
        if kind not in ("pmap", "shard_map", "jit"):
            raise ValueError(f"unknown launcher {kind!r}: expected pmap, shard_map or jit")
        self._specs = state_specs(self.sharded, replicated)
        # A group of batches: examples split over the devices along axis 1, after the group axis.
        self.group_sharding = NamedSharding(self.mesh, P(None, BATCH_AXES))
        self._fn = self._launch(step, lead=0)
        self._group_fn = self._launch(functools.partial(scan_steps, step), lead=1)

    def _launch(self, body, lead: int):
        """`body(state, local, shared, axis_name=..., [table_axis=...])` run the launcher's way, with the examples
        of `local` split over the devices along axis `lead` (0: one batch; 1: a group, after its group axis)."""
        batch_spec = P(*(None,) * lead, BATCH_AXES)
        if self.kind == "pmap":
            return jax.pmap(functools.partial(body, axis_name=AXIS), axis_name=AXIS, devices=self.devices,
                            in_axes=(None, lead, None), out_axes=(None, None), donate_argnums=(0,))
        if self.kind == "shard_map":
            mapped = jax.shard_map(
                functools.partial(body, axis_name=BATCH_AXES, table_axis=MODEL if self.sharded else None),
                mesh=self.mesh, in_specs=(self._specs, batch_spec, P()), out_specs=(self._specs, P()))
            return jax.jit(mapped, donate_argnums=(0,))
        return jax.jit(functools.partial(body, axis_name=None), donate_argnums=(0,),
                       in_shardings=(self.state_sharding, NamedSharding(self.mesh, batch_spec), self.replicated),
                       out_shardings=(self.state_sharding, self.replicated))

    def put_state(self, state: dict) -> dict:
        """Places a single-copy state where the step expects it; leaves already there are kept as they are.

        In one process, other leaves are moved with donation (no second copy of a table). In several, every
        process holds the same host value of each such leaf and places its own shards of it.
        """
        def one(x, sharding):
            if getattr(x, "sharding", None) == sharding:
                return x
            if jax.process_count() > 1:
                return put_global(np.asarray(x), sharding)
            return jax.device_put(x, sharding, donate=True)

        return {key: jax.tree.map(functools.partial(one, sharding=self.state_sharding[key]), sub)
                for key, sub in state.items()}

    def abstract_state(self, state: dict) -> dict:
        """Shape/dtype twin of `state` with the launcher's shardings: the target Orbax restores straight into,
        so restored tables arrive already split (no full copy on one device)."""
        return {key: jax.tree.map(lambda x, s=self.state_sharding[key]: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                           sharding=s), sub)
                for key, sub in state.items()}

    def get_state(self, dev_state):
        """The state as global arrays: what checkpoints and evaluation read."""
        return dev_state

    def put_batch(self, local: dict, shared: dict):
        """Host arrays of one batch -> device arrays: `local` split over the devices, `shared` on all. With
        `process_local_batches`, `local` holds this process's share only (`batch_share`) and the global arrays are
        assembled from every process's share."""
        return self._put(local, shared, lead=0)

    def put_group(self, local: dict, shared: dict):
        """`put_batch` for a group of batches stacked on a leading axis: local [G, B, ...] (with
        `process_local_batches`, this process's rows [G, B_p, ...]) and shared [G, ...]."""
        return self._put(local, shared, lead=1)

    def _put(self, local: dict, shared: dict, lead: int):
        """`put_batch` (lead 0) or `put_group` (lead 1: the examples are axis 1)."""
        sharding = self.group_sharding if lead else self.batch_sharding
        if self.kind == "pmap":   # the examples' axis becomes [devices, examples per device]
            n = self.n
            local = jax.tree.map(lambda x: x.reshape(*x.shape[:lead], n, x.shape[lead] // n, *x.shape[lead + 1:]),
                                 local)
            return jax.device_put(local, sharding), jax.device_put(shared, self.devices[0])
        if self.process_local_batches:
            count = jax.process_count()
            local = jax.tree.map(lambda x: jax.make_array_from_process_local_data(
                sharding, np.asarray(x), (*x.shape[:lead], x.shape[lead] * count, *x.shape[lead + 1:])), local)
            return local, put_global(shared, self.replicated)
        return put_global(local, sharding), put_global(shared, self.replicated)

    def run_group(self, dev_state, local, shared):
        """The steps of a group placed by `put_group`, in order, in one dispatch: (state after the last step,
        metrics with a leading axis of one entry per step)."""
        return self._group_fn(dev_state, local, shared)

    def batch_share(self, batch_size: int) -> tuple[int, int]:
        """(index, count): this process feeds rows [index * B / count, (index + 1) * B / count) of each global batch
        (and the same share of its negatives), the rows the batch sharding puts on its own devices."""
        count = jax.process_count()
        slices = self.batch_sharding.addressable_devices_indices_map((batch_size,)).values()
        lo = min(s[0].start or 0 for s in slices)
        hi = max(batch_size if s[0].stop is None else s[0].stop for s in slices)
        share = batch_size // count
        if hi - lo != share or lo % share:
            raise ValueError(f"this process's devices hold rows [{lo}, {hi}) of a batch of {batch_size}: not one "
                             f"contiguous 1/{count} share, so it cannot read only its own examples")
        return lo // share, count

    def __call__(self, dev_state, local, shared):
        return self._fn(dev_state, local, shared)


def scan_steps(step, state, local, shared, **kwargs):
    """`step` over a group of batches (local and shared stacked on a leading axis), one after the other."""
    return jax.lax.scan(lambda s, batch: step(s, *batch, **kwargs), state, (local, shared))
