"""The inference layer: what evaluation and serving both do with a trained run, done once.

- `towers.inference.embed`: item and user embeddings of a run (`embed_items`, `embed_users`), with one rule for
  items without training interactions, hashed ids, audiences and histories;
- `towers.inference.vocab`: `check_vocabularies`, whether a dataset maps raw ids to the run's rows;
- `towers.inference.exact` (blocked JAX) and `towers.inference.search` (host numpy, ScaNN, exclusions over an
  approximate search with widening): top-k with per-user exclusions and one tie rule.

It sits between `towers` and its two users: `data` <- `towers` <- `towers.inference` <- `eval`, `serve`; it
imports neither of them, and they do not import each other. Import the submodules directly (nothing is loaded
here, so `towers.inference.vocab` costs no JAX import).
"""
