"""How raw ids become rows of an ID table: one row per vocabulary id, or hashed into a fixed number of rows.

A hashed table (`model.<tower>.table.hash_buckets`) bounds memory whatever the id space, and gives every id a
row, ids first seen at serving time included. With `num_hashes: 2` an id reads two rows (two independent
hashes) and its embedding is their sum: two ids share their whole embedding only when both hashes collide
(about n / B^2 of the ids instead of n / B), while each row is still trained by every id hashed into it.

Training and evaluation work on vocabulary rows (the data layer's `Vocab`). `IdHashing.rows` maps raw ids to
table rows, once per vocabulary when the run starts, and `vocab_view` turns a hashed table into the
[vocab, dim] table of per-id embeddings that evaluation, export and serving index by vocabulary row.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from data.ids import hash_ids

TABLE_TOWERS = {"user": "user", "item": "item"}  # table name -> the tower config holding its `table:` options


@dataclasses.dataclass(frozen=True)
class IdHashing:
    """Raw ids -> `num_hashes` rows of a table of `buckets` rows.

    Attributes:
      buckets: rows of the table (hash values are taken modulo this).
      num_hashes: 1, or 2 independent hashes whose rows are summed.
      seed: selects the hash functions; part of the model (the same ids must map to the same rows to serve).
    """
    buckets: int
    num_hashes: int = 1
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.buckets < 2 ** 31 or self.num_hashes not in (1, 2):
            raise ValueError(f"IdHashing(buckets={self.buckets}, num_hashes={self.num_hashes}): buckets must be "
                             "in [1, 2^31) and num_hashes 1 or 2")

    @classmethod
    def from_config(cls, table_cfg) -> "IdHashing | None":
        """From a `towers.config.IdTableConfig` (or its dict); None when the table is not hashed."""
        get = table_cfg.get if isinstance(table_cfg, dict) else functools.partial(getattr, table_cfg)
        buckets = get("hash_buckets", None)
        if not buckets:
            return None
        return cls(int(buckets), int(get("num_hashes", 1)), int(get("hash_seed", 0)))

    def rows(self, raw_ids) -> np.ndarray:
        """Table rows of raw ids, seen in training or not.

        Args:
          raw_ids: int or str ids, shape [n].
        Returns:
          int32 [n, num_hashes].
        """
        cols = [hash_ids(raw_ids, 2 * self.seed + k) % np.uint64(self.buckets) for k in range(self.num_hashes)]
        return np.stack(cols, axis=1).astype(np.int32)

    def collision_report(self, raw_ids, rows: np.ndarray | None = None) -> dict:
        """How often ids share rows, for the run's log and `hashing.json`.

        Args:
          raw_ids: int or str ids, shape [n].
          rows: `self.rows(raw_ids)` when already computed.

        Returns:
          {"ids", "buckets", "num_hashes", "seed", "rows_used",
           "collision_rate_per_hash": [share of ids whose row under hash k also holds another id],
           "collision_rate": share of ids whose whole embedding (all their rows) another id also has,
           "expected_collision_rate": the same share for uniformly random hashes}.
        """
        rows = self.rows(raw_ids) if rows is None else rows
        n = rows.shape[0]
        per_hash = [_shared_share(rows[:, k]) for k in range(self.num_hashes)]
        if self.num_hashes == 1:
            full, slots = per_hash[0], self.buckets
        else:  # the embedding is a sum, so the pair is unordered
            lo, hi = rows.min(axis=1).astype(np.int64), rows.max(axis=1).astype(np.int64)
            full, slots = _shared_share(lo * self.buckets + hi), self.buckets * (self.buckets + 1) // 2
        expected = 1.0 - (1.0 - 1.0 / slots) ** max(n - 1, 0)
        return {"ids": int(n), "buckets": self.buckets, "num_hashes": self.num_hashes, "seed": self.seed,
                "rows_used": int(np.unique(rows).size) if n else 0,
                "collision_rate_per_hash": per_hash, "collision_rate": full,
                "expected_collision_rate": float(expected)}


def _shared_share(keys: np.ndarray) -> float:
    """Share of entries whose key occurs more than once."""
    if keys.size == 0:
        return 0.0
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return float(np.mean(counts[inverse] > 1))


def hashings(model_cfg) -> dict[str, IdHashing]:
    """{table name: IdHashing} for every hashed table of a `ModelConfig` (or its dict)."""
    out = {}
    for table, tower in TABLE_TOWERS.items():
        tower_cfg = model_cfg[tower] if isinstance(model_cfg, dict) else getattr(model_cfg, tower)
        table_cfg = tower_cfg.get("table", {}) if isinstance(tower_cfg, dict) else tower_cfg.table
        h = IdHashing.from_config(table_cfg)
        if h is not None:
            out[table] = h
    return out


@jax.jit
def _sum_rows(table, rows):
    return jnp.sum(table[rows], axis=1)


def vocab_view(table, rows: np.ndarray, *, block: int = 1 << 16) -> np.ndarray:
    """Per-id embeddings of a hashed table: the sum of each id's rows.

    Args:
      table: [buckets, dim] (a jax array, split over devices or not, or numpy).
      rows: int32 [n, num_hashes] from `IdHashing.rows`.
      block: ids per gather (bounds the temporary [block, num_hashes, dim]).
    Returns:
      float32 [n, dim], row i = the embedding of id i.
    """
    table = table if isinstance(table, jax.Array) else jnp.asarray(table)
    n = rows.shape[0]
    out = np.empty((n, table.shape[1]), np.float32)
    size = min(block, max(n, 1))
    for a in range(0, n, size):
        chunk = rows[a:a + size]
        padded = np.zeros((size, rows.shape[1]), np.int32)
        padded[:len(chunk)] = chunk
        out[a:a + len(chunk)] = np.asarray(_sum_rows(table, jnp.asarray(padded)))[:len(chunk)]
    return out
