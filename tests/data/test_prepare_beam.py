"""The Beam preparation (`data.prepared.beam`, DirectRunner) writes the same files, byte for byte, as the local
out-of-core job, and its dataset equals the in-memory loader's row for row. Runs only where Apache Beam is
installed (its own environment: `pip install -e ".[test,beam]"`)."""
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("apache_beam")

from data import DataError, load  # noqa: E402
from data.config import resolve_config  # noqa: E402
from data.prepared.beam import prepare_beam  # noqa: E402
from data.prepared.local import prepare_parquet  # noqa: E402
from data.prepared.read import PreparedData  # noqa: E402
from tests.data.test_prepared import _same_dataset  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _log(tmp_path, files=3, rows=1500, seed=0, strings=False):
    """A small Parquet log over several files of several row groups: raw ids, many equal timestamps (of a user
    too), repeated (user, item) pairs and ratings."""
    rng = np.random.default_rng(seed)
    d = tmp_path / "log"
    d.mkdir()
    for k in range(files):
        user = rng.integers(0, 150, rows) * 7 + 3
        item = rng.integers(0, 120, rows) * 11
        table = pa.table({"user_id": [f"u{x}" for x in user] if strings else user,
                          "item_id": [f"item-{x}" for x in item] if strings else item,
                          "timestamp": rng.integers(0, 15, rows) * 1000, "rating": rng.integers(1, 6, rows)})
        pq.write_table(table, d / f"part-{k}.parquet", row_group_size=400)
    return d


FILTERS = {"drop_duplicates": True, "min_user_interactions": 12, "valid_fraction": 0.1, "min_rating": 2,
           "rating_column": "rating", "split_seed": 3}


@pytest.mark.parametrize("extra,strings", [({}, False), (FILTERS, False), (FILTERS, True)])
def test_beam_files_equal_local_and_rows_equal_loader(tmp_path, extra, strings):
    cfg = resolve_config({"source": "parquet", "path": str(_log(tmp_path, strings=strings)), **extra})
    local = prepare_parquet(cfg, tmp_path / "local", num_shards=3, config={"k": 1}, chunk_rows=1000)
    beam = prepare_beam(cfg, tmp_path / "beam", num_shards=3, config={"k": 1})
    assert len(beam["shards"]) == 3
    assert beam["files"] == local["files"]          # every shard and side file: same sha256
    assert beam["stats"] == local["stats"]
    for key in ("shards", "rows", "num_users", "num_items", "train_window"):
        assert beam[key] == local[key], key
    if extra:
        assert beam["stats"]["filtered"]["min_rating"] > 0 and beam["stats"]["filtered"]["duplicates"] > 0
        assert beam["stats"]["filtered"]["min_user_interactions"] > 0 and beam["rows"]["valid"] > 0
    data = PreparedData(tmp_path / "beam")
    ds = load(cfg)
    _same_dataset(ds, data.load_users())
    assert data.stats == ds.stats
    assert not (tmp_path / "beam" / "work").exists()


def test_rerun_keeps_shards_and_an_empty_log_is_refused(tmp_path):
    cfg = resolve_config({"source": "parquet", "path": str(_log(tmp_path, files=2, rows=800)), "min_rating": 2,
                          "rating_column": "rating"})
    first = prepare_beam(cfg, tmp_path / "p", num_shards=2, config={})
    (tmp_path / "p" / first["shards"][1]["file"]).unlink()
    (tmp_path / "p" / "manifest.json").unlink()
    second = prepare_beam(cfg, tmp_path / "p", num_shards=2, config={})
    assert second["files"] == first["files"]
    strict = resolve_config({**{"source": "parquet", "path": cfg.path}, "min_rating": 9, "rating_column": "rating"})
    with pytest.raises(DataError, match="every interaction was filtered"):
        prepare_beam(strict, tmp_path / "q", num_shards=2, config={})


def test_prepare_command_engine_beam(tmp_path):
    log = _log(tmp_path, files=2, rows=1000)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    manifests = {}
    for engine in ("beam", "local"):
        run = subprocess.run([sys.executable, "-m", "data.prepare", f"engine={engine}", f"data.path={log}",
                              f"out={tmp_path / engine}", "num_shards=3", "data.drop_duplicates=true"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        manifests[engine] = PreparedData(tmp_path / engine).manifest
    assert manifests["beam"]["files"] == manifests["local"]["files"]
    assert manifests["beam"]["stats"] == manifests["local"]["stats"]


def test_null_ids_name_file_and_row(tmp_path):
    d = tmp_path / "log"
    d.mkdir()
    pq.write_table(pa.table({"user_id": [1, 2, 3, 4], "item_id": pa.array([5, 6, None, 8]),
                             "timestamp": [1, 2, 3, 4]}), d / "a.parquet", row_group_size=2)
    with pytest.raises(DataError, match=r"a\.parquet: column 'item_id' has a null id in data row 3"):
        prepare_beam(resolve_config({"source": "parquet", "path": str(d)}), tmp_path / "p", num_shards=1,
                     config={})
