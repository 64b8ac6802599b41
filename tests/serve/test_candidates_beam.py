"""The Beam pipeline of batch candidates, on the DirectRunner with two parallel workers: the same rows (and,
under one pyarrow, the same bytes) as the single-process command. Skipped without the `beam` extra."""
import pytest

beam = pytest.importorskip("apache_beam")

from serve.candidates import run as run_single  # noqa: E402
from serve.candidates.beam import parse, run as run_beam  # noqa: E402
from serve.candidates.config import ConfigError  # noqa: E402
from tests.serve.test_candidates import make_run, read_rows  # noqa: E402


def test_direct_runner_writes_the_rows_of_the_single_process_command(tmp_path):
    run_dir, ds = make_run(tmp_path)
    keys = [f"run_dir={run_dir}", "k=9", "num_shards=5", "chunk_users=32", "progress=false"]
    c, flags = parse([*keys, f"out={tmp_path / 'beam'}", "--runner=DirectRunner", "--direct_num_workers=2",
                      "--direct_running_mode=multi_threading"])
    assert flags == ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_threading"]
    paths = run_beam(c, flags)
    assert [p.name for p in paths] == [f"part-{i:05d}-of-00005.parquet" for i in range(5)]
    single, _ = parse([*keys, f"out={tmp_path / 'single'}"])
    run_single(single)
    rows = read_rows(tmp_path / "beam")
    assert rows == read_rows(tmp_path / "single")
    assert [r["user_id"] for r in rows] == [str(u) for u in ds.user_vocab.raw_ids]
    assert all(len(r["item_ids"]) == 9 for r in rows)
    for path in paths:
        assert path.read_bytes() == (tmp_path / "single" / path.name).read_bytes()
    # A second launch finds every shard complete and rewrites nothing.
    before = {p: p.stat().st_mtime_ns for p in paths}
    run_beam(c, flags)
    assert {p: p.stat().st_mtime_ns for p in paths} == before


def test_arguments_split_into_candidate_keys_and_beam_flags(tmp_path):
    with pytest.raises(ConfigError, match="bogus=1: unknown key"):
        parse([f"run_dir={tmp_path}", "out=x", "bogus=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse([f"run_dir={tmp_path}", "out=x", "DirectRunner"])
    with pytest.raises(ConfigError, match="k=0: must be > 0"):
        parse([f"run_dir={tmp_path}", "out=x", "k=0"])
