"""`towers.restore.checksums`: small arrays summed on the host give the device's checksum, without compiling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from towers import restore


def _arrays():
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((37, 5, 3)).astype(np.float32)
    f32[2, 1, 0] = np.nan
    return {"f32": jnp.asarray(f32), "bf16": jnp.asarray(rng.standard_normal((9, 4)), jnp.bfloat16),
            "i32": jnp.asarray(rng.integers(-2**31, 2**31 - 1, (300,), dtype=np.int64).astype(np.int32)),
            "u8": jnp.asarray(rng.integers(0, 256, (6, 7), dtype=np.uint8)), "flag": jnp.asarray([True, False]),
            "scalar": jnp.asarray(3.5, jnp.float32), "numpy": rng.standard_normal((4, 4)).astype(np.float32)}


def test_small_arrays_are_summed_on_the_host_to_the_same_checksums_as_on_the_device(monkeypatch):
    tree = _arrays()
    monkeypatch.setattr(restore, "_HOST_SUM_MAX", -1)   # everything on the device, as a large sharded table
    on_device = restore.checksums(tree)
    monkeypatch.setattr(restore, "_HOST_SUM_MAX", 1 << 22)
    compiled = []
    monkeypatch.setattr(restore, "_tree_sums", lambda leaves: compiled.append(leaves))
    on_host = restore.checksums(tree)
    assert compiled == []   # nothing compiled for a tree of small single-device arrays (a restore for eval)
    assert on_host == on_device
    assert on_host[1] == ["f32"]


def test_a_tree_too_large_for_the_host_is_summed_on_the_device(monkeypatch):
    tree = _arrays()
    monkeypatch.setattr(restore, "_HOST_SUM_MAX", sum(np.size(x) for x in tree.values()) - 1)
    real, compiled = restore._tree_sums, []
    monkeypatch.setattr(restore, "_tree_sums", lambda leaves: compiled.append(len(leaves)) or real(leaves))
    on_device = restore.checksums(tree)
    monkeypatch.undo()
    assert compiled == [len(tree)] and on_device == restore.checksums(tree)


def test_a_single_bit_flip_changes_the_host_checksum():
    x = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    flipped = x.copy()
    flipped.view(np.uint32)[17, 3] ^= np.uint32(1 << 9)
    assert restore.checksums({"t": x})[0] != restore.checksums({"t": flipped})[0]


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two devices (XLA_FLAGS host device count)")
def test_arrays_split_over_devices_are_summed_where_they_live(monkeypatch):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("d",))
    x = jax.device_put(np.arange(64, dtype=np.float32).reshape(8, 8),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    assert not restore._on_host([x]) and restore._on_host([np.asarray(x)])
    assert restore.checksums({"t": x}) == restore.checksums({"t": np.asarray(x)})
