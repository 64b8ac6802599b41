"""The built-in synthetic source: interactions with planted cluster structure, deterministic from a seed.

Generative story (so tests and reports know what a good model can reach, see `data.oracle`):

* Items are split evenly into `num_clusters` clusters at random; inside a cluster item popularity follows a
  power law in its (random) rank: P(rank r) = (G(r+1) - G(r)) / G(n), G(x) = ((x+1)^(1-a) - 1) / (1-a)
  (log(1+x) for a = 1), a = `popularity_exponent`. This discretised power law has an exact inverse CDF, so
  sampling is O(1) per draw.
* Each user prefers 1-3 clusters (picked with a milder power law over clusters) with Dirichlet(1) weights.
* A user has 3 + Poisson(Gamma(2, (m-3)/2)) interactions (mean m = `interactions_per_user`); each picks a
  cluster by the user's weights, then an item in it by popularity. Repeated (user, item) draws are redrawn, so
  pairs are distinct. Times increase per user; the order of a user's interactions is random.
* Side features: users `segment` (main cluster, replaced by a random cluster with prob 0.3) and `age_bucket`
  (8 values, half the users' tied to the main cluster); items `category` (the cluster), `tags` (multi-hot,
  1-4 distinct tags, mostly from the cluster's 3 home tags) and `quality` (dense, noisy log popularity).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.assemble import FeatureTable, RawLog
from data.config import DataConfig
from data.types import FeatureSpec

_REDRAW_ROUNDS = 12
_T0 = 1_600_000_000          # first timestamps (Unix seconds, Sep 2020)
_SEGMENT_NOISE = 0.3
_AGE_BUCKETS = 8
_TAGS_PER_CLUSTER = 3
_HOME_TAG_PROB = 0.75
_TAG_SLOTS = 4


@dataclass
class Latent:
    """The planted structure. Arrays are indexed by generator ids (= raw ids of the synthetic vocabularies)."""

    item_cluster: np.ndarray      # int32 [I]
    item_rank: np.ndarray         # int32 [I] popularity rank inside its cluster, 0 = most popular
    cluster_perm: np.ndarray      # int64 [I] items of cluster c by rank: cluster_perm[r * C + c]
    cluster_size: np.ndarray      # int64 [C]
    user_clusters: np.ndarray     # int32 [U, 3]
    user_weights: np.ndarray      # float64 [U, 3], rows sum to 1, unused slots 0
    exponent: float

    @property
    def num_clusters(self) -> int:
        return int(self.cluster_size.shape[0])


def params_of(cfg: DataConfig) -> dict:
    """The generator parameters (saved in `stats["synthetic"]` so the latent structure can be rebuilt)."""
    return dict(num_users=cfg.num_users, num_items=cfg.num_items, num_clusters=cfg.num_clusters,
                popularity_exponent=cfg.popularity_exponent, seed=cfg.seed)


def latent_structure(num_users: int, num_items: int, num_clusters: int, popularity_exponent: float,
                     seed: int) -> Latent:
    """Rebuilds the planted clusters and user preferences (cheap; depends only on these arguments)."""
    rng = np.random.default_rng([seed, 0])
    perm = rng.permutation(num_items)
    slot = np.arange(num_items)
    item_cluster = np.empty(num_items, np.int32)
    item_rank = np.empty(num_items, np.int32)
    item_cluster[perm] = slot % num_clusters
    item_rank[perm] = slot // num_clusters
    cluster_weight = (rng.permutation(num_clusters) + 1.0) ** (-0.5 * popularity_exponent)
    cdf = np.cumsum(cluster_weight) / cluster_weight.sum()
    picks = np.searchsorted(cdf, rng.random((num_users, 3)), side="right")
    user_clusters = np.minimum(picks, num_clusters - 1).astype(np.int32)
    k = rng.integers(1, 4, size=num_users)
    weights = rng.gamma(1.0, size=(num_users, 3))
    weights[np.arange(3)[None, :] >= k[:, None]] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    return Latent(item_cluster, item_rank, perm, np.bincount(item_cluster, minlength=num_clusters),
                  user_clusters, weights, float(popularity_exponent))


def _g(x: np.ndarray, a: float) -> np.ndarray:
    if abs(1.0 - a) < 1e-6:
        return np.log1p(x)
    return ((x + 1.0) ** (1.0 - a) - 1.0) / (1.0 - a)


def _g_inv(y: np.ndarray, a: float) -> np.ndarray:
    if abs(1.0 - a) < 1e-6:
        return np.expm1(y)
    return (1.0 + (1.0 - a) * y) ** (1.0 / (1.0 - a)) - 1.0


def item_prob_in_cluster(lat: Latent) -> np.ndarray:
    """float64 [I]: P(item | its cluster)."""
    n = lat.cluster_size[lat.item_cluster].astype(np.float64)
    r = lat.item_rank.astype(np.float64)
    return (_g(r + 1, lat.exponent) - _g(r, lat.exponent)) / _g(n, lat.exponent)


def _draw_items(lat: Latent, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One item per entry of `users` (int [n]) from the generative model; int64 [n]."""
    w = lat.user_weights
    edge0, edge1 = w[:, 0][users], (w[:, 0] + w[:, 1])[users]
    u = rng.random(users.shape[0])
    slot = (u > edge0).astype(np.int64) + (u > edge1)
    last = ((w > 0).sum(axis=1) - 1)[users]  # rounding can push u past the last non-zero weight
    cluster = lat.user_clusters.reshape(-1)[users * 3 + np.minimum(slot, last)].astype(np.int64)
    n = lat.cluster_size.astype(np.float64)
    y = rng.random(users.shape[0]) * _g(n, lat.exponent)[cluster]
    rank = np.minimum(np.floor(_g_inv(y, lat.exponent)), n[cluster] - 1).astype(np.int64)
    return lat.cluster_perm[rank * lat.num_clusters + cluster]


def _distinct_pairs(lat: Latent, target: np.ndarray, rng: np.random.Generator, item_bits: int):
    """Draws `target[u]` distinct items per user; returns sorted keys (user << item_bits | item) and shortfall.

    Repeats are redrawn for the users still short; users that are complete leave the working set, so later
    rounds only touch a few rows.
    """
    num_users = target.shape[0]
    active = np.ones(num_users, dtype=bool)
    deficit = target.astype(np.int64)
    settled, pending = [], np.zeros(0, np.int64)
    for _ in range(_REDRAW_ROUNDS):
        users = np.repeat(np.arange(num_users, dtype=np.int64), deficit)
        pending = np.sort(np.concatenate([pending, (users << item_bits) | _draw_items(lat, users, rng)]))
        pending = pending[np.concatenate([[True], pending[1:] != pending[:-1]])]
        have = np.bincount(pending >> item_bits, minlength=num_users)
        deficit = np.where(active, target - have, 0)
        done = active & (deficit == 0)
        moving = done[pending >> item_bits]
        settled.append(pending[moving])
        pending = pending[~moving]
        active &= ~done
        if not active.any():
            break
    keys = np.sort(np.concatenate(settled + [pending]))
    return keys, int(deficit.sum())


def _shuffle_within_user(keys: np.ndarray, rng, user_bits: int, item_bits: int):
    """Random order of each user's items (keys stay grouped by user); returns (user int64, item int64)."""
    user, item = keys >> item_bits, keys & ((1 << item_bits) - 1)
    rand_bits = 63 - user_bits - item_bits
    if rand_bits >= 16:
        packed = (user << (rand_bits + item_bits)) | (rng.integers(0, 1 << rand_bits, keys.shape[0]) << item_bits)
        packed = np.sort(packed | item)
        return packed >> (rand_bits + item_bits), packed & ((1 << item_bits) - 1)
    order = np.lexsort((rng.random(keys.shape[0]), user))
    return user[order], item[order]


def _timestamps(user: np.ndarray, num_users: int, rng) -> np.ndarray:
    """int64 [N] times strictly increasing within each user (rows grouped by user, N >= 1)."""
    start = _T0 + rng.integers(0, 365 * 86_400, num_users)
    gaps = rng.integers(60, 2 * 86_400, user.shape[0])
    csum = np.cumsum(gaps)
    counts = np.bincount(user, minlength=num_users)
    first = np.minimum(np.cumsum(counts) - counts, user.shape[0] - 1)
    before_first = csum[first] - gaps[first]
    return start[user] + csum - before_first[user]


def _user_table(lat: Latent, rng) -> FeatureTable:
    num_users, c = lat.user_weights.shape[0], lat.num_clusters
    main = lat.user_clusters[np.arange(num_users), lat.user_weights.argmax(axis=1)]
    segment = np.where(rng.random(num_users) < _SEGMENT_NOISE, rng.integers(0, c, num_users), main)
    age = np.where(rng.random(num_users) < 0.5, main % _AGE_BUCKETS, rng.integers(0, _AGE_BUCKETS, num_users))
    specs = [FeatureSpec("segment", "categorical", c), FeatureSpec("age_bucket", "categorical", _AGE_BUCKETS)]
    return FeatureTable(np.arange(num_users, dtype=np.int64),
                        {"segment": segment.astype(np.int32), "age_bucket": age.astype(np.int32)}, specs, "synthetic")


def _item_table(lat: Latent, rng) -> FeatureTable:
    num_items, c = lat.item_cluster.shape[0], lat.num_clusters
    num_tags = max(16, 4 * c)
    home = rng.integers(0, num_tags, (c, _TAGS_PER_CLUSTER))
    from_home = home[lat.item_cluster[:, None], rng.integers(0, _TAGS_PER_CLUSTER, (num_items, _TAG_SLOTS))]
    tags = np.where(rng.random((num_items, _TAG_SLOTS)) < _HOME_TAG_PROB, from_home,
                    rng.integers(0, num_tags, (num_items, _TAG_SLOTS)))
    tags[np.arange(_TAG_SLOTS)[None, :] >= rng.integers(1, _TAG_SLOTS + 1, num_items)[:, None]] = num_tags
    tags.sort(axis=1)  # distinct tags first, then padding: repeats become the sentinel and sort to the end
    tags[:, 1:][tags[:, 1:] == tags[:, :-1]] = num_tags
    tags.sort(axis=1)
    tags[tags == num_tags] = -1
    logp = np.log(item_prob_in_cluster(lat))
    z = (logp - logp.mean()) / (logp.std() + 1e-9)
    quality = (0.8 * z + 0.6 * rng.standard_normal(num_items)).astype(np.float32)[:, None]
    specs = [FeatureSpec("category", "categorical", c), FeatureSpec("tags", "multihot", num_tags, _TAG_SLOTS),
             FeatureSpec("quality", "dense", 1)]
    feats = {"category": lat.item_cluster.astype(np.int32), "tags": tags.astype(np.int32), "quality": quality}
    return FeatureTable(np.arange(num_items, dtype=np.int64), feats, specs, "synthetic")


def read(cfg: DataConfig) -> RawLog:
    """Generates the synthetic log for `cfg` (keys num_users, num_items, interactions_per_user, num_clusters,
    popularity_exponent, seed); raw ids are generator ids 0..num-1."""
    params = params_of(cfg)
    lat = latent_structure(**params)
    rng = np.random.default_rng([cfg.seed, 1])
    extra = max(cfg.interactions_per_user - 3.0, 0.0)
    lam = rng.gamma(2.0, extra / 2.0, cfg.num_users) if extra > 0 else np.zeros(cfg.num_users)
    target = np.minimum(3 + rng.poisson(lam), cfg.num_items)
    user_bits = max(int(cfg.num_users - 1).bit_length(), 1)
    item_bits = max(int(cfg.num_items - 1).bit_length(), 1)
    keys, short = _distinct_pairs(lat, target, rng, item_bits)
    user, item = _shuffle_within_user(keys, rng, user_bits, item_bits)
    ts = _timestamps(user, cfg.num_users, rng)
    stats = {"synthetic": params, "synthetic_target_interactions": int(target.sum()),
             "synthetic_shortfall": short}
    return RawLog(name="synthetic", user=user, item=item, timestamp=ts, stats=stats,
                  user_table=_user_table(lat, np.random.default_rng([cfg.seed, 2])),
                  item_table=_item_table(lat, np.random.default_rng([cfg.seed, 3])), item_catalog=True)
