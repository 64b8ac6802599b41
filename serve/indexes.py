"""Every index backend by name: `index_class` and `make_index` (from an `index:` config).

Backends register their `kind` when their module is imported (`TopK.__init_subclass__`); this module imports
them all, so the base (`serve.index`) never imports a backend and no two modules import each other.
"""
from __future__ import annotations

from serve.index import BruteForce, TopK
from serve.scann_index import ScaNNIndex


def index_class(kind) -> type[TopK]:
    """The `TopK` subclass of an index type ("brute_force" | "scann"). Raises ValueError for any other."""
    return TopK.registered(kind)


def make_index(config: dict | None = None) -> TopK:
    """An empty index from an `index:` config: {"type": "scann" | "brute_force", ...ScaNNIndex args}."""
    config = dict(config or {"type": "scann"})
    kind = config.pop("type", "scann")
    if kind == "brute_force":
        return BruteForce()
    if kind == "scann":
        return ScaNNIndex(**config)
    raise ValueError(f"index.type={kind!r}: must be scann or brute_force")
