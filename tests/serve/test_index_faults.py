"""Fault injection into index directories: every corrupted byte of every file is refused by `load_index`.

Small indexes of both backends are written by `write_index` (the export's writer): a ScaNN tree (its corpus is
above `brute_force_below`, so `scann/` holds ScaNN's assets) and an exact one. Each fault is applied to a fresh
copy: one byte inverted at the start, middle and end of each file, and single-bit flips at seeded positions
(every one of the manifest's bytes: the file that describes all others). The detection rate is printed and
must be 100%.
"""
import contextlib
import json
import pathlib

import numpy as np
import pytest

from serve.index import BruteForce
from serve.manifest import IndexLoadError, load_index, write_index
from serve.scann_index import ScaNNIndex
from tests.serve.test_index import clustered


def _faults(size: int, rng, *, every_byte: bool) -> list[tuple[int, int]]:
    """(offset, xor mask) pairs: the first, middle and last byte inverted, and single-bit flips (at every
    offset, or at 8 seeded ones)."""
    inverted = [(p, 0xFF) for p in sorted({0, size // 2, size - 1})]
    offsets = range(size) if every_byte else rng.choice(size, min(size, 8), replace=False).tolist()
    return inverted + [(int(p), 1 << int(rng.integers(8))) for p in offsets]


@contextlib.contextmanager
def _flipped(path: pathlib.Path, offset: int, mask: int):
    """`path` with one byte xor-ed with `mask`, restored afterwards."""
    original = path.read_bytes()
    data = bytearray(original)
    data[offset] ^= mask
    path.write_bytes(bytes(data))
    try:
        yield
    finally:
        path.write_bytes(original)


@pytest.mark.parametrize("backend", ["scann", "brute_force"])
def test_every_flipped_byte_of_an_index_directory_is_refused(backend, tmp_path, capsys):
    rng = np.random.default_rng(0)
    emb, ids = clustered(400, 8, rng), [f"item{j}" for j in range(400)]
    index = ScaNNIndex(brute_force_below=100) if backend == "scann" else BruteForce()
    src = write_index(index.index(emb, ids), tmp_path / "src", model_version="step1-abc")
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    if backend == "scann":
        assert {"scann/scann_assets.pbtxt", "scann/hashed_dataset.npy", "scann/dataset.npy"} <= set(files)
    load_index(src, model_version="step1-abc")   # the intact directory loads
    undetected, total = [], 0
    for rel in files:
        size = (src / rel).stat().st_size
        for offset, mask in _faults(size, rng, every_byte=rel == "manifest.json"):
            total += 1
            with _flipped(src / rel, offset, mask):
                try:
                    load_index(src, model_version="step1-abc")
                except IndexLoadError:
                    continue
            undetected.append((rel, offset, mask))
    load_index(src, model_version="step1-abc")   # every fault was undone
    with capsys.disabled():
        print(f"\n{backend}: {total - len(undetected)}/{total} injected faults detected in {len(files)} files")
    assert not undetected, f"{len(undetected)}/{total} faults loaded without error, e.g. {undetected[:10]}"


def test_a_format_1_directory_without_the_manifest_checksum_still_loads(tmp_path):
    """Exports written before the manifest carried its own sha256 keep loading (without that check)."""
    out = write_index(BruteForce().index(clustered(50, 8, np.random.default_rng(3)), np.arange(50)),
                      tmp_path / "v1", model_version="step1-abc")
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["manifest_sha256"]
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    assert len(load_index(out, model_version="step1-abc")[0]) == 50
