"""scripts/bench_multi_interest.py: the equal-time step budget, the steady step time of a run's logged windows, and
the step times combined over rounds measured under changing load."""
import json
import math

import numpy as np
import pytest

from scripts.bench_multi_interest import equal_time_steps, median_step_seconds, round_ratio_step_seconds


def test_equal_time_steps_exact_answers():
    # 2855 steps of K=1 at 15 ms: 42.825 s; K=2 at 30 ms fits 1427.5 -> 1427 steps, K=4 at 60 ms 713.75 -> 713.
    assert equal_time_steps(2855, {1: 0.015, 2: 0.030, 4: 0.060}) == {1: 2855, 2: 1427, 4: 713}
    # A slower reference gives the others more steps; a step slower than the whole budget still gets one.
    assert equal_time_steps(10, {1: 0.2, 2: 0.1, 4: 5.0}) == {1: 10, 2: 20, 4: 1}
    # An exact ratio that floats below its integer (0.3 / 0.1 = 2.9999999999999996) is not floored a step short.
    assert equal_time_steps(1, {1: 0.3, 2: 0.1}) == {1: 1, 2: 3}
    assert equal_time_steps(7, {"a": 1.0, "b": 3.0}, reference="b") == {"a": 21, "b": 7}


def test_equal_time_steps_fill_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(200):
        ref = int(rng.integers(1, 10_000))
        times = {k: float(t) for k, t in zip((1, 2, 4, 8), rng.uniform(1e-3, 1.0, 4))}
        budget = ref * times[1]
        for k, steps in equal_time_steps(ref, times).items():
            if k == 1:
                assert steps == ref
            elif steps > 1:   # the most steps whose time stays within the budget
                assert steps * times[k] <= budget * (1 + 1e-9)
                assert (steps + 1) * times[k] > budget
            else:
                assert 2 * times[k] > budget


@pytest.mark.parametrize("reference_steps, times, match", [
    (10, {2: 0.1}, "reference 1 has no step time"),
    (10, {1: 0.1, 2: 0.0}, "must be > 0"),
    (10, {1: 0.1, 2: math.nan}, "must be > 0"),
    (0, {1: 0.1}, "reference_steps=0"),
])
def test_equal_time_steps_rejects(reference_steps, times, match):
    with pytest.raises(ValueError, match=match):
        equal_time_steps(reference_steps, times)


def test_median_step_seconds_leaves_out_a_recompiling_window():
    lines = [json.dumps({"step": 10, "train/steps_per_sec": 50.0, "train/loss": 3.0}),
             json.dumps({"step": 20, "train/steps_per_sec": 0.5}),        # the window that recompiled the step
             {"step": 30, "train/steps_per_sec": 40.0},
             json.dumps({"step": 30, "eval/valid/recall@50": 0.3})]       # a line without a throughput
    # Seconds per step of the windows: 0.02, 2.0, 0.025 -> median 0.025.
    assert median_step_seconds(lines) == pytest.approx(0.025, rel=1e-12)
    with pytest.raises(ValueError, match="no logged window"):
        median_step_seconds([json.dumps({"step": 1, "train/loss": 1.0})])


def test_round_ratio_step_seconds_follows_the_per_round_ratios():
    # Round 2 ran K=4 under a burst of load (6.0 s against 1.5 s for K=1), round 1 ran K=1 under one: the
    # per-round ratios are 3, 2, 4 -> median 3; K=1's median step time is 1.5 s -> K=4 4.5 s, K=2 1.5 * 1.
    measured = {1: [1.0, 2.0, 1.5], 2: [1.0, 2.0, 1.5], 4: [3.0, 4.0, 6.0]}
    assert round_ratio_step_seconds(measured) == pytest.approx({1: 1.5, 2: 1.5, 4: 4.5}, rel=1e-12)
    # A load that doubles every step time of one round leaves the result alone.
    slowed = {k: [v[0], 2 * v[1], v[2]] for k, v in measured.items()}
    assert round_ratio_step_seconds(slowed)[4] / round_ratio_step_seconds(slowed)[1] == pytest.approx(3.0)
    assert equal_time_steps(100, round_ratio_step_seconds(measured)) == {1: 100, 2: 100, 4: 33}
    with pytest.raises(ValueError, match="same number"):
        round_ratio_step_seconds({1: [1.0, 2.0], 4: [3.0]})
    with pytest.raises(ValueError, match="reference 1 has no step times"):
        round_ratio_step_seconds({4: [3.0]})
