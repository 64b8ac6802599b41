"""Launchers: the same per-device step under `jax.pmap` (default), `jax.shard_map` on a mesh, or `jax.jit`.

A launcher owns where the state lives and how a host batch reaches the devices. Under pmap and shard_map the
state is one global array per leaf, replicated over a 1-D `data` mesh (pmap with `in_axes=None` and
`out_axes=None` for it, so there is no per-device leading axis and a checkpoint holds one copy); examples are
split over the devices along their first axis. Shared arrays (the de-duplicated table rows) are replicated.
The state is donated: tables are updated in place, never copied per step.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


class Launcher:
    """Runs `step(state, local, shared, axis_name=...)` on `devices` in the chosen way."""

    def __init__(self, kind: str, step, devices: list):
        self.kind, self.devices, self.n = kind, list(devices), len(devices)
        if kind == "jit" and self.n != 1:
            raise ValueError(f"launcher 'jit' runs on one device, got {self.n}")
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.batch_sharding = NamedSharding(self.mesh, P(AXIS))
        self.replicated = NamedSharding(self.mesh, P())
        if kind == "pmap":
            self._fn = jax.pmap(functools.partial(step, axis_name=AXIS), axis_name=AXIS, devices=self.devices,
                                in_axes=(None, 0, None), out_axes=(None, None), donate_argnums=(0,))
        elif kind == "shard_map":
            body = jax.shard_map(functools.partial(step, axis_name=AXIS), mesh=self.mesh,
                                 in_specs=(P(), P(AXIS), P()), out_specs=(P(), P()))
            self._fn = jax.jit(body, donate_argnums=(0,))
        elif kind == "jit":
            self._fn = jax.jit(functools.partial(step, axis_name=None), donate_argnums=(0,))
        else:
            raise ValueError(f"unknown launcher {kind!r}: expected pmap, shard_map or jit")

    def put_state(self, state):
        """Places a single-copy state where the step expects it (donating the input: no second copy)."""
        target = self.devices[0] if self.kind == "jit" else self.replicated
        return jax.device_put(state, target, donate=True)

    def get_state(self, dev_state):
        """The state as global arrays (each leaf fully replicated): what checkpoints and evaluation read."""
        return dev_state

    def put_batch(self, local: dict, shared: dict):
        if self.kind == "pmap":
            n = self.n
            local = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), local)
            return jax.device_put(local, self.batch_sharding), jax.device_put(shared, self.devices[0])
        if self.kind == "shard_map":
            return jax.device_put(local, self.batch_sharding), jax.device_put(shared, self.replicated)
        return jax.device_put((local, shared), self.devices[0])

    def __call__(self, dev_state, local, shared):
        return self._fn(dev_state, local, shared)
