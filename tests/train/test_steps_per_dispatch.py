"""Several steps per dispatch (`train.steps_per_dispatch`): the groups end wherever the loop logs, saves or
validates; a run trains as one step per dispatch does (state, logged metrics, checkpoints, validation), on one
device and on four, resumed or not.

Up to float rounding: XLA compiles the step inside the group's loop as a program of its own and may order a few
float operations differently: the row-wise Adagrad accumulators and the MLP's parameters differ by 1-2 ULP after a
step, up to 2e-6 after eleven (Adam scales small gradients up); the logged losses agree to 1e-6. The relative
tolerance is that of one device against four (`tests/train/test_loop.py`, 2e-4), the absolute one 1e-5. A real
slip moves the state by far more: swapping the last two of eleven batches moves a parameter by 3.7 beyond them."""
import functools
import json

import jax
import numpy as np
import pytest

from tests.helpers import smoke_cfg
from tests.train.test_loop import _final_state
from train.input import dispatch_groups, grain_feed, prepare
from train.loop import build_parts, load_data, make_batches, prepare_kwargs, run, select_devices


def _ends(start, sizes):
    return list(start + np.cumsum(sizes))


def test_groups_end_at_every_step_the_loop_acts_on():
    sizes = dispatch_groups(0, 23, 4, (5, 10))
    assert sizes.sum() == 23 and sizes.max() == 4
    ends = _ends(0, sizes)
    assert {5, 10, 15, 20, 23} <= set(ends)
    assert ends == [4, 5, 9, 10, 14, 15, 19, 20, 23]
    # resumed mid-cadence: the first group runs to the next multiple
    assert _ends(7, dispatch_groups(7, 23, 4, (5, 10))) == [10, 14, 15, 19, 20, 23]
    assert list(dispatch_groups(3, 9, 1, (4,))) == [1] * 6
    assert list(dispatch_groups(0, 8, 8, ())) == [8]
    assert list(dispatch_groups(0, 8, 3, (100,))) == [3, 3, 2]
    assert dispatch_groups(9, 9, 4, (2,)).size == 0
    with pytest.raises(ValueError):
        dispatch_groups(0, 8, 0, ())


@pytest.mark.parametrize("workers", [0, 1])
def test_the_grouped_feed_stacks_the_batches_of_the_single_feed(workers):
    """From the reading thread, and from a worker process (the group function pickles)."""
    c = smoke_cfg("data.num_users=500", "train.global_batch_size=384", "loss.num_negatives=0")
    ds = load_data(c)
    parts = build_parts(c, ds, 4, select_devices(c))
    fn = functools.partial(prepare, **prepare_kwargs(parts.step_cfg))
    single, grouped = grain_feed(make_batches(c, ds, seed=0), fn), None
    try:
        ones = [next(single) for _ in range(7)]
        grouped = grain_feed(make_batches(c, ds, seed=0), fn, groups=np.array([3, 1, 3]), workers=workers)
        groups = [next(grouped) for _ in range(3)]
    finally:
        single.close()
        if grouped is not None:
            grouped.close()
    k = 0
    for ((local, shared), pos), size in zip(groups, (3, 1, 3)):
        assert pos == ones[k + size - 1][1]   # the data position after the group's last batch
        for i in range(size):
            (l1, s1), _ = ones[k + i]
            for key, value in l1.items():
                if isinstance(value, dict):
                    for name, v in value.items():
                        np.testing.assert_array_equal(local[key][name][i], v)
                else:
                    np.testing.assert_array_equal(local[key][i], value)
            for key, value in s1.items():   # rows padded to the group's largest: row 0, not valid
                n = len(value)
                np.testing.assert_array_equal(shared[key][i][:n], value)
                assert not shared[key][i][n:].any()
        k += size


def _lines(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_run(tmp_path, common, *, grouped: str = "train.steps_per_dispatch=3"):
    one = smoke_cfg(*common)
    many = smoke_cfg(*common, grouped)
    r1, rk = run(one, tmp_path / "one"), run(many, tmp_path / "many")
    lines1, linesk = _lines(tmp_path / "one"), _lines(tmp_path / "many")
    assert [l["step"] for l in lines1] == [l["step"] for l in linesk]
    for a, b in zip(lines1, linesk):   # every logged metric (loss, grad norm, hits, validation) is the same
        for key in a:
            if key.startswith(("train/", "valid/")) and "_sec" not in key and "seconds" not in key:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    assert sorted(p.name for p in (tmp_path / "one" / "ckpt").iterdir()) == \
        sorted(p.name for p in (tmp_path / "many" / "ckpt").iterdir())
    s1, sk = _final_state(tmp_path / "one", one), _final_state(tmp_path / "many", many)
    assert s1[0] == sk[0]
    _close(s1[1], sk[1])
    return r1, rk


def _close(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("launcher", ["jit_1", "pmap_4", "shard_map_4"])
def test_grouped_steps_train_as_single_steps(tmp_path, launcher):
    kind, devices = launcher.rsplit("_", 1)
    common = ["eval.at_end=false", "train.total_steps=11", "train.log_every_steps=5", "checkpoint.every_steps=4",
              "model.item.id_dropout=0.2", f"train.launcher={kind}", f"train.num_devices={devices}"]
    r1, rk = _same_run(tmp_path, common)
    assert rk["timing"]["first_step_seconds"] > 0


def test_grouped_steps_validate_at_the_same_steps_and_resume(tmp_path):
    import shutil
    common = ["data.valid_fraction=0.2", "eval.valid_every_steps=3", "eval.at_end=false", "train.total_steps=8",
              "train.log_every_steps=4", "checkpoint.every_steps=4"]
    _same_run(tmp_path / "a", common, grouped="train.steps_per_dispatch=2")
    # killed after the checkpoint of step 4, resumed with another group size: the same run
    run(smoke_cfg(*common, "train.steps_per_dispatch=2"), tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "ckpt" / "8")
    run(smoke_cfg(*common, "train.steps_per_dispatch=4"), tmp_path / "b")
    s1 = _final_state(tmp_path / "a" / "one", smoke_cfg(*common))
    sb = _final_state(tmp_path / "b", smoke_cfg(*common))
    assert s1[0] == sb[0] == 8
    _close(s1[1], sb[1])
