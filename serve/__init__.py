"""twotower.serve: item embeddings -> a top-k index on disk, and the index behind the server.

`serve.index` (the `TopK` interface and `BruteForce`), `serve.scann_index` (`ScaNNIndex`), `serve.manifest`
(the verified on-disk format: `write_index`, `load_index`), `serve.export` (`python -m serve.export run_dir=RUN`).
"""
