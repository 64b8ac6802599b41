"""Multi-process (multi-host) runs: `jax.distributed.initialize` from the config or the usual environment
variables, and the few helpers that let every process run the same program.

One process per host (or several per host, as the tests do on localhost). Every process runs the same
`python -m train ...` command with the same run directory (on a shared filesystem), and:

- `train.distributed.coordinator_address` / `num_processes` / `process_id`, each falling back to
  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID when null, say how
  the processes meet; with one process (the default) nothing is initialised;
- the mesh spans the devices of all processes; every process builds the same global batch (same data, same
  seed) and de-duplicates its ID rows, then places only the slice its own devices hold (`train.mesh.put_global`);
- Orbax checkpoints are written by all processes together; the other run files and the final evaluation by
  process 0 alone.

On CPU, cross-process collectives use Gloo (jax's default `jax_cpu_collectives_implementation`).
"""
from __future__ import annotations

import os

import jax
import numpy as np

from data.schema import ConfigError

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def settings(cfg) -> dict:
    """{coordinator_address, num_processes, process_id}: the config's values, else the environment's.

    Args:
      cfg: `train.config.DistributedConfig`.
    Raises:
      ConfigError: an environment variable that should be an integer is not.
    """
    out = {}
    for key, var in ENV.items():
        value = getattr(cfg, key)
        if value is None and os.environ.get(var):
            value = os.environ[var]
            if key != "coordinator_address":
                try:
                    value = int(value)
                except ValueError:
                    raise ConfigError(f"{var}={value!r}: must be an integer") from None
        out[key] = value
    out["num_processes"] = out["num_processes"] or 1
    return out


def initialize(cfg, launcher: str) -> bool:
    """Joins the multi-process run described by `cfg` / the environment. Returns whether it is one.

    Must run before anything touches a JAX device. Calling it again in an initialised process is a no-op.

    Raises:
      ConfigError: an incomplete set-up, or pmap (which cannot span processes here).
    """
    s = settings(cfg)
    if s["num_processes"] <= 1:
        return False
    if launcher == "pmap":
        raise ConfigError(f"train.launcher=pmap: a {s['num_processes']}-process run needs train.launcher="
                          "shard_map or jit (the state and batch are global arrays on one mesh)")
    missing = [ENV[k] for k in ("coordinator_address", "process_id") if s[k] is None]
    if missing:
        raise ConfigError(f"train.distributed: {s['num_processes']} processes but no {' or '.join(missing)}; "
                          "set train.distributed.* or the environment variables on every process")
    if not 0 <= s["process_id"] < s["num_processes"]:
        raise ConfigError(f"train.distributed.process_id={s['process_id']}: must be in "
                          f"[0, {s['num_processes']})")
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(s["coordinator_address"], s["num_processes"], s["process_id"])
    return True


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def host_copy(tree):
    """Every leaf as an array this process can read whole: arrays split across processes are all-gathered
    (every process must call this together); the rest are returned unchanged."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return jax.tree.map(one, tree)


class RowExchange:
    """The union of the table rows every process's share of a global batch touches, through the coordinator's
    key-value store (host-to-host, no device collective: safe to call from the input pipeline's threads).

    Each process reads only its own examples, so it knows only the rows those touch; the row-sparse update needs
    the same de-duplicated rows on every process (the shared arrays of `train.input.prepare`). Each process
    publishes its sorted distinct rows under the batch's offset and reads everyone's; the union, sorted, is what
    one process de-duplicating the whole global batch computes, so the update is identical.

    Keys of a batch are deleted `keep` batches later, when every process has long finished reading them (the
    step is a collective, so no process runs more than its prefetch depth ahead of the slowest one's step).
    """

    def __init__(self, keep: int = 256, timeout_s: float = 600.0):
        from jax._src import distributed as jax_distributed
        self._client = jax_distributed.global_state.client
        if self._client is None:
            raise RuntimeError("RowExchange needs jax.distributed to be initialised")
        self.index, self.count = jax.process_index(), jax.process_count()
        self.keep, self.timeout_ms = keep, int(timeout_s * 1000)
        self._published: list[str] = []

    def union(self, key: str, rows: np.ndarray) -> np.ndarray:
        """Sorted distinct rows of all processes' `rows` (int; each process passes its own) for `key`."""
        mine = f"twotower/rows/{key}/{self.index}"
        self._client.key_value_set_bytes(mine, np.unique(np.asarray(rows, np.int64)).tobytes())
        self._published.append(mine)
        if len(self._published) > self.keep:
            self._client.key_value_delete(self._published.pop(0))
        parts = [np.frombuffer(self._client.blocking_key_value_get_bytes(f"twotower/rows/{key}/{q}",
                                                                         self.timeout_ms), np.int64)
                 for q in range(self.count)]
        return np.unique(np.concatenate(parts))
