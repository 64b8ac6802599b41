"""Launchers: the same per-device step under `jax.pmap` (default), `jax.shard_map` on a mesh, or `jax.jit`.

A launcher owns where the state lives and how a host batch reaches the devices:
- pmap: the state carries a leading device axis (replicated), examples are split [n_dev, B/n_dev, ...];
- shard_map: the state is replicated on a 1-D `data` mesh, examples are sharded along their first axis;
- jit: one device, no named axis.
Shared arrays (the de-duplicated table rows) are replicated in every case. The state is donated: tables are
updated in place, never copied per step.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
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
            self._fn = jax.pmap(functools.partial(step, axis_name=AXIS), axis_name=AXIS,
                                in_axes=(0, 0, None), devices=self.devices, donate_argnums=(0,))
        elif kind == "shard_map":
            body = jax.shard_map(functools.partial(step, axis_name=AXIS), mesh=self.mesh,
                                 in_specs=(P(), P(AXIS), P()), out_specs=(P(), P()))
            self._fn = jax.jit(body, donate_argnums=(0,))
        elif kind == "jit":
            self._fn = jax.jit(functools.partial(step, axis_name=None), donate_argnums=(0,))
        else:
            raise ValueError(f"unknown launcher {kind!r}: expected pmap, shard_map or jit")

    def put_state(self, state):
        """Places a single-copy state (host or device arrays) where the step expects it."""
        if self.kind == "pmap":
            n = self.n
            rep = jax.jit(lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x[None], (n, *x.shape)), t),
                          out_shardings=self.batch_sharding)
            return rep(jax.device_put(state, self.replicated))
        if self.kind == "shard_map":
            return jax.device_put(state, self.replicated)
        return jax.device_put(state, self.devices[0])

    def get_state(self, dev_state):
        """A single copy of the state (device 0's), e.g. for checkpoints and evaluation."""
        if self.kind == "pmap":
            return jax.tree.map(lambda x: x.addressable_data(0).reshape(x.shape[1:]), dev_state)
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
        dev_state, metrics = self._fn(dev_state, local, shared)
        if self.kind == "pmap":
            metrics = jax.tree.map(lambda x: x[0], metrics)
        return dev_state, metrics
