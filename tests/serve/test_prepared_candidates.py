"""`python -m serve.candidates` on a run trained on a prepared dataset: the same Parquet rows as the twin run on
the same data in memory, with each chunk of `chunk_users` users reading only its own users' records."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

import serve.candidates as candidates
from data import load
from data.prepared.write import write_dataset
from tests.helpers import REPO, smoke_cfg
from train.loop import run as train

STEPS = ["train.total_steps=2", "checkpoint.every_steps=2", "train.log_every_steps=1", "eval.max_users=10"]
HIST = ["data.history_len=5", "model.user.use_history=true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Twin runs of the same seeds, in memory and on a prepared copy (3 shards), each exported (exact index)."""
    from serve.export import export, validate as export_validate

    root = tmp_path_factory.mktemp("prepared_cand")
    mem_cfg = smoke_cfg("data.valid_fraction=0.1", *HIST, *STEPS)
    write_dataset(load(mem_cfg.data), root / "prepared", num_shards=3, config={})
    disk_cfg = smoke_cfg("data=prepared", "data.source=prepared", f"data.path={root / 'prepared'}", *HIST, *STEPS)
    for name, cfg in (("mem", mem_cfg), ("disk", disk_cfg)):
        train(cfg, root / name)
        export(export_validate({"run_dir": str(root / name), "num_queries": 20}))
    return SimpleNamespace(root=root, mem=root / "mem", disk=root / "disk", prepared=root / "prepared",
                           ds=load(mem_cfg.data))


def generate(run_dir, out, **overrides) -> dict:
    return candidates.run({"run_dir": str(run_dir), "out": str(out), "progress": False, **overrides})


def read_rows(out) -> list[dict]:
    return [row for path in sorted(out.glob("part-*.parquet")) for row in pq.read_table(path).to_pylist()]


@pytest.mark.parametrize("search", ["exact", "index"])
def test_prepared_candidates_equal_in_memory_and_read_chunks(runs, reads, tmp_path, search):
    opts = dict(k=7, num_shards=2, chunk_users=16, batch_size=16, search=search)
    mem = generate(runs.mem, tmp_path / "mem", **opts)
    assert reads.load_users == [] and reads.records == []
    disk = generate(runs.disk, tmp_path / "disk", **opts)
    assert disk["users"] == mem["users"] == runs.ds.num_users and disk["stats"] == mem["stats"]
    rows_mem, rows_disk = read_rows(tmp_path / "mem"), read_rows(tmp_path / "disk")
    assert rows_disk == rows_mem
    # Each chunk read its own users' records once: 200 users in chunks of at most 16, every user once.
    assert max(reads.load_users) <= 16 and max(reads.records) <= 16
    assert sum(reads.load_users) == sum(reads.records) == runs.ds.num_users
    # Seen items (train and valid) were excluded with the prepared records, not an empty history.
    ds, raw = runs.ds, runs.ds.item_vocab.raw_ids
    (tp, ti), (vp, vi) = ds.train_csr(), ds.valid_csr()
    for u, row in enumerate(rows_disk):
        seen = set(raw[ti[tp[u]:tp[u + 1]]].tolist()) | set(raw[vi[vp[u]:vp[u + 1]]].tolist())
        assert seen and not seen & set(row["item_ids"]) and len(row["item_ids"]) == 7


def test_prepared_candidates_of_a_user_list_read_those_users_only(runs, reads, tmp_path):
    users = runs.ds.user_vocab.raw_ids[[3, 50, 51, 199]]
    (tmp_path / "users.txt").write_text("".join(f"{u}\n" for u in users))
    opts = dict(k=5, chunk_users=3, users=str(tmp_path / "users.txt"))
    mem = read_rows(generate(runs.mem, tmp_path / "mem", **opts)["out"])
    disk = read_rows(generate(runs.disk, tmp_path / "disk", **opts)["out"])
    assert disk == mem and [r["user_id"] for r in disk] == [str(u) for u in users]
    assert reads.load_users == [3, 1] and sum(reads.records) == 4


def _metadata(path) -> dict:
    """A shard's job identity less the model's (the twin runs' configs differ in their data: section, so their
    model and index versions differ)."""
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(path).metadata.items()}
    return {k: v for k, v in meta.items() if k.startswith("twotower.")
            and k not in ("twotower.model_version", "twotower.index_version")}


def test_command_line_on_a_prepared_run(runs, tmp_path):
    generate(runs.mem, tmp_path / "mem", k=7, num_shards=2, chunk_users=32)
    proc = subprocess.run([sys.executable, "-m", "serve.candidates", f"run_dir={runs.disk}", f"out={tmp_path / 'cli'}",
                           "k=7", "num_shards=2", "chunk_users=32", "progress=false"], cwd=REPO, text=True,
                          capture_output=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "mem").glob("part-*.parquet"))
    assert names == sorted(p.name for p in (tmp_path / "cli").glob("part-*.parquet")) and len(names) == 2
    for name in names:   # the same rows, row groups and job settings
        cli, mem = pq.ParquetFile(tmp_path / "cli" / name), pq.ParquetFile(tmp_path / "mem" / name)
        assert cli.read().to_pylist() == mem.read().to_pylist() and cli.num_row_groups == mem.num_row_groups > 1
        assert _metadata(tmp_path / "cli" / name) == _metadata(tmp_path / "mem" / name)
