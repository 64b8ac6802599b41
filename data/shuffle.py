"""A seeded permutation of 0..N-1 evaluated at any positions, vectorised, in O(1) memory.

Each epoch visits the N training examples in an order given by a bijection of [0, N): a 4-round Feistel network
on the smallest even number of bits covering N, with round keys from (seed, epoch), and cycle walking (values
that land outside [0, N) are permuted again until they fall inside; at most 4x the domain, so about 1.3 rounds
on average). Position p of epoch e is `permute(seed, e, p, N)`.

Why not a stored permutation: it grows with the number of interactions (1.6 GB for 200M examples) and every
process would hold it. Why not Grain's own `MapDataset.shuffle`: it evaluates its (also O(1)-memory) bijection
one index per Python call, 12 us each here, i.e. 16 ms for a batch of 1,024, more than a CPU training step;
this evaluates a whole batch in one numpy pass.

`EpochOrder` reads consecutive positions the way the training batches do. On datasets up to
`CACHE_MAX_EXAMPLES` it evaluates each epoch's whole order once and slices it: per batch, the cycle walking
costs about 20 rounds of Python and numpy for a few stragglers, about 1 ms for 1,024 positions on ml-100k, while
the whole epoch of 80k positions costs 18 ms (0.23 ms per batch); the order is the same.
"""
from __future__ import annotations

import collections
import threading

import numpy as np

# Datasets with at most this many examples per epoch keep whole epochs' orders (int32, 16 MB at most for each of
# the two epochs held); larger ones evaluate each batch's positions on their own, in O(1) memory.
CACHE_MAX_EXAMPLES = 1 << 22

_ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _round_keys(seed: int, epoch: np.ndarray) -> np.ndarray:
    """uint64 [n, ROUNDS] round keys of each position's epoch."""
    with np.errstate(over="ignore"):
        base = _mix(np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.asarray(epoch, np.uint64) + np.uint64(1))
        return np.stack([_mix(base + np.uint64(r + 1) * np.uint64(0xD1B54A32D192ED03)) for r in range(_ROUNDS)],
                        axis=-1)


def _feistel(x: np.ndarray, keys: np.ndarray, half: int) -> np.ndarray:
    mask = np.uint64((1 << half) - 1)
    left, right = x >> np.uint64(half), x & mask
    for r in range(_ROUNDS):
        left, right = right, left ^ (_mix(right ^ keys[:, r]) & mask)
    return (left << np.uint64(half)) | right


def permute(seed: int, epoch, position, n: int) -> np.ndarray:
    """Position(s) `position` of epoch(s) `epoch` in the seeded order of 0..n-1.

    Args:
      seed: the shuffle seed.
      epoch: int [k] (or scalar) epoch of each position.
      position: int [k] positions in [0, n).
      n: the number of elements.

    Returns:
      int64 [k]: for a fixed (seed, epoch) a bijection of [0, n) (`np.sort(permute(s, e, arange(n), n))` is
      `arange(n)`).
    """
    position = np.asarray(position, np.int64).reshape(-1)
    epoch = np.broadcast_to(np.asarray(epoch, np.int64), position.shape)
    if n < 2:
        return np.zeros(position.shape, np.int64)
    half = max(1, ((int(n - 1).bit_length()) + 1) // 2)
    keys = _round_keys(seed, epoch)
    x = position.astype(np.uint64)
    todo = np.arange(x.size)
    while todo.size:
        x[todo] = _feistel(x[todo], keys[todo], half)
        todo = todo[x[todo] >= np.uint64(n)]
    return x.astype(np.int64)


class EpochOrder:
    """`permute(seed, epoch, position, n)` of consecutive global positions (epoch e's position p is global
    position e * n + p), with whole epochs' orders cached when n <= `cache_max`.

    Thread-safe (Grain's reading threads share it); pickles without its cache, so a worker process builds its
    own.
    """

    def __init__(self, seed: int, n: int, cache_max: int = CACHE_MAX_EXAMPLES):
        self.seed, self.n, self.cache_max = seed, n, cache_max
        self._setup()

    def _setup(self) -> None:
        self._epochs: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"seed": self.seed, "n": self.n, "cache_max": self.cache_max}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._setup()

    def _epoch(self, epoch: int) -> np.ndarray:
        with self._lock:
            order = self._epochs.get(epoch)
            if order is None:
                order = permute(self.seed, epoch, np.arange(self.n), self.n).astype(np.int32)
                self._epochs[epoch] = order
                while len(self._epochs) > 2:   # a batch spans at most two epochs once n >= the batch size
                    self._epochs.popitem(last=False)
            return order

    def __call__(self, start: int, count: int) -> np.ndarray:
        """int64 [count]: the examples at global positions start .. start + count - 1."""
        at = start + np.arange(count, dtype=np.int64)
        epoch, position = at // self.n, at % self.n
        if self.n > self.cache_max:
            return permute(self.seed, epoch, position, self.n)
        out = np.empty(count, np.int64)
        first, last = int(epoch[0]), int(epoch[-1])
        for e in range(first, last + 1):
            rows = slice(max(0, e * self.n - start), min(count, (e + 1) * self.n - start))
            out[rows] = self._epoch(e)[position[rows]]
        return out
