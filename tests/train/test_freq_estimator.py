"""The streaming item-frequency estimator (Yi et al. 2019, Algorithm 2): its update by hand, padding, convergence
to known frequencies on a synthetic Zipf stream, and `loss.logq_source=streaming` in training (it trains, the
estimator is checkpointed and resumes exactly, every device updates with the global batch)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import smoke_cfg
from tests.train.test_loop import _final_state
from train import freq_estimator as fe
from train.loop import run


def test_update_follows_the_algorithm_by_hand():
    spec = fe.make_spec(16, 2, 0.5, num_ids=8, draws_per_step=4)
    assert spec.exact and spec.buckets == 8 and spec.hashes == 1 and spec.init_gap == 2.0
    s = fe.init(spec)
    # Step 0: id 3 twice (its first occurrence: gap (0 + 1) / 2), id 5 once (gap 1).
    s = fe.update(s, jnp.array([3, 3, 5, -1]), 0, spec)
    np.testing.assert_allclose(fe.estimate(s, jnp.array([3, 5]), spec), [2.0, 1.0])
    # Step 2: id 3 once: B <- (1 - a) B + a (t - A) = 0.5 * 0.5 + 0.5 * 2.
    s = fe.update(s, jnp.array([3, -1, -1, -1]), 2, spec)
    # Step 3: id 5 twice, evenly spread over its gap of 3: B <- (1 - a)^2 B + (1 - (1 - a)^2) 3 / 2.
    s = fe.update(s, jnp.array([5, 5, -1, -1]), 3, spec)
    np.testing.assert_allclose(fe.estimate(s, jnp.array([3, 5]), spec),
                               [1 / 1.25, 1 / (0.25 * 1.0 + 0.75 * 1.5)], rtol=1e-6)
    np.testing.assert_array_equal(s["last_step"][0, [3, 5]], [2, 3])
    # Never seen and padding ids: the uniform prior, draws / num_ids per step.
    np.testing.assert_allclose(fe.estimate(s, jnp.array([0, -1]), spec), [0.5, 0.5])


def test_estimate_is_clipped_and_takes_the_largest_gap_over_hashes():
    spec = fe.make_spec(64, 3, 0.1, num_ids=1000, draws_per_step=8)
    assert not spec.exact and spec.hashes == 3
    ids = jnp.array([7, 123])
    b = fe.buckets_of(ids, spec)
    assert b.shape == (3, 2) and int(b.min()) >= 0 and int(b.max()) < 64
    s = fe.init(spec)
    gaps = jnp.array([[0.5, 1e12], [4.0, 1e-6], [2.0, 1e-6]])   # [hash, id]
    s["gap"] = s["gap"].at[jnp.arange(3)[:, None], b].set(gaps)
    np.testing.assert_allclose(fe.estimate(s, ids, spec), [1 / 4.0, fe.MIN_PROB], rtol=1e-6)
    s["gap"] = jnp.full_like(s["gap"], 1e-6)
    np.testing.assert_allclose(fe.estimate(s, ids, spec), [8.0, 8.0])   # at most draws per step


def test_padding_ids_are_ignored():
    spec = fe.make_spec(1 << 10, 2, 0.05, num_ids=1 << 20, draws_per_step=6)
    s = fe.update(fe.init(spec), jnp.array([11, 12, 13]), 0, spec)
    untouched = fe.update(s, jnp.full((6,), -1), 1, spec)
    for key in s:
        np.testing.assert_array_equal(untouched[key], s[key])
    padded = fe.update(s, jnp.array([-1, 12, -1, 12, -1, 40]), 5, spec)
    plain = fe.update(s, jnp.array([12, 12, 40]), 5, spec)
    masked = fe.update(s, jnp.array([99, 12, 7, 12, 3, 40]), 5, spec,
                       valid=jnp.array([False, True, False, True, False, True]))
    for key in s:
        np.testing.assert_array_equal(padded[key], plain[key])
        np.testing.assert_array_equal(masked[key], plain[key])
    changed = np.flatnonzero(np.any(np.asarray(padded["last_step"] != s["last_step"]), axis=0))
    assert set(changed) <= set(np.asarray(fe.buckets_of(jnp.array([12, 40]), spec)).ravel())


N, B, STEPS = 1000, 256, 4000
P = 1.0 / np.arange(1, N + 1)
P /= P.sum()   # Zipf(1) over 1,000 items: the top item is 13% of the draws, the last 0.013%


def _stream_estimates(spec, raw_ids=None):
    """Estimates of every item after STEPS iid batches of B Zipf draws (items named by `raw_ids` if given)."""
    cdf = jnp.asarray(np.cumsum(P), jnp.float32)
    names = jnp.arange(N) if raw_ids is None else jnp.asarray(raw_ids, jnp.int32)

    @jax.jit
    def go(key):
        def body(state, t):
            item = jnp.minimum(jnp.searchsorted(cdf, jax.random.uniform(jax.random.fold_in(key, t), (B,))), N - 1)
            return fe.update(state, names[item], t, spec), None

        state, _ = jax.lax.scan(body, fe.init(spec), jnp.arange(STEPS))
        return fe.estimate(state, names, spec)

    return np.asarray(go(jax.random.key(0)))


def _errors(est):
    """(median and 90th percentile relative error over items drawn >= 0.5 times a step, correlation of log
    estimates with log truths over all items). The truth per step is B p."""
    truth = B * P
    rel = np.abs(est / truth - 1)[truth >= 0.5]
    return np.median(rel), np.quantile(rel, 0.9), np.corrcoef(np.log(est), np.log(truth))[0, 1]


def test_converges_to_the_true_frequencies():
    spec = fe.make_spec(1 << 12, 2, 0.01, num_ids=N, draws_per_step=B)
    assert spec.exact
    median, p90, corr = _errors(_stream_estimates(spec))
    # alpha = 0.01 averages ~100 occurrences: ~10% noise per item. Ignoring alpha (averaging nothing) gives a
    # median of 40%, p90 120%, correlation 0.65; the occurrences of a step taken as gaps t - A, 0, ..., 0 (not
    # spread evenly) overstate the popular items by ~18%.
    assert median < 0.08 and p90 < 0.16, (median, p90)
    assert corr > 0.98, corr


def test_hashed_estimates_converge_and_more_hashes_help():
    raw = np.random.default_rng(1).choice(1 << 24, N, replace=False)   # sparse ids in a large vocabulary
    results = {}
    for buckets, hashes in ((1 << 14, 2), (1 << 12, 2), (1 << 12, 1)):
        spec = fe.make_spec(buckets, hashes, 0.01, num_ids=1 << 24, draws_per_step=B)
        assert not spec.exact
        results[buckets, hashes] = _errors(_stream_estimates(spec, raw))
    median, p90, corr = results[1 << 14, 2]
    assert median < 0.08 and p90 < 0.16 and corr > 0.97, results
    # A collision only makes a bucket look more frequent: the largest gap over two hashes is closer to the truth
    # than one hash's (measured 0.97 against 0.85; the smallest gap would do worse than one hash).
    assert results[1 << 12, 2][2] > results[1 << 12, 1][2] + 0.05, results


# ---------------------------------------------------------------- training with loss.logq_source=streaming
STREAMING = ["loss.logq_source=streaming", "eval.at_end=false"]


def test_streaming_run_lowers_the_loss_and_checkpoints_the_estimator(tmp_path):
    steps = 40
    cfg = smoke_cfg(*STREAMING, f"train.total_steps={steps}", "train.log_every_steps=10",
                    "checkpoint.every_steps=1000", "optimizer.dense.learning_rate=0.01",
                    "optimizer.sparse.learning_rate=0.2")
    run(cfg, tmp_path)
    losses = [json.loads(l)["train/loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses
    step, state = _final_state(tmp_path, cfg)
    assert step == steps
    freq = state["logq_freq"]
    assert freq["last_step"].shape == freq["gap"].shape == (1, 100)   # 100 items < buckets: one bucket each
    assert freq["last_step"].max() == steps - 1                       # updated in every step, before counting it
    seen = freq["last_step"] >= 0
    assert seen.sum() > 50 and np.all(freq["gap"][seen] > 0) and np.any(freq["gap"][seen] != 100 / 16)


def test_streaming_resume_matches_uninterrupted(tmp_path):
    run(smoke_cfg(*STREAMING), tmp_path / "resumed")                       # steps 1-4, checkpoints at 2 and 4
    run(smoke_cfg(*STREAMING, "train.total_steps=6"), tmp_path / "resumed")
    run(smoke_cfg(*STREAMING, "train.total_steps=6"), tmp_path / "straight")
    cfg = smoke_cfg(*STREAMING, "train.total_steps=6")
    (step_a, a), (step_b, b) = _final_state(tmp_path / "resumed", cfg), _final_state(tmp_path / "straight", cfg)
    assert step_a == step_b == 6 and "logq_freq" in a
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("launcher", ["pmap", "shard_map"])
def test_every_device_updates_with_the_global_batch(tmp_path, launcher):
    """4 devices, each holding a quarter of the batch, end with the estimator of one device seeing it all."""
    common = [*STREAMING, "train.total_steps=3", "checkpoint.every_steps=3", "model.item.id_dropout=0.0"]
    one = smoke_cfg(*common, "train.launcher=jit", "train.num_devices=1")
    four = smoke_cfg(*common, f"train.launcher={launcher}", "train.num_devices=4")
    r1, r4 = run(one, tmp_path / "one"), run(four, tmp_path / "four")
    assert r1["train"]["train/loss"] == pytest.approx(r4["train"]["train/loss"], rel=1e-5)
    _, s1 = _final_state(tmp_path / "one", one)
    _, s4 = _final_state(tmp_path / "four", four)
    np.testing.assert_array_equal(s1["logq_freq"]["last_step"], s4["logq_freq"]["last_step"])
    np.testing.assert_allclose(s1["logq_freq"]["gap"], s4["logq_freq"]["gap"], rtol=1e-6)
    assert (s1["logq_freq"]["last_step"] == 2).sum() > 8   # the last step's positives, from all devices


@pytest.mark.parametrize("override", ["loss.logq_correction=false", "loss.in_batch_negatives=false",
                                      "loss.name=ccl"])
def test_streaming_needs_a_loss_that_reads_the_in_batch_log_q(override):
    from data.schema import ConfigError
    from tests.helpers import compose_cfg
    from train.config import validate
    with pytest.raises(ConfigError, match=r"loss\.logq_source='streaming'"):
        validate(compose_cfg("loss.logq_source=streaming", "model.normalize=true", override))
    assert validate(compose_cfg("model.normalize=true", override)).loss.logq_source == "counts"
