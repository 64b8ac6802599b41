"""The evaluation run: answers known by construction, agreement with training's own end-of-run report, and the
command line's errors."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data.types import Dataset, Interactions, Vocab
from eval.config import ConfigError, EvaluateConfig, known_keys, validate
from eval.run import evaluate_embeddings
from data.schema import unknown_override

REPO = pathlib.Path(__file__).resolve().parents[2]

# 5 users, 8 items. Per user: training items, held-out items, the item the user embedding points at (score 1),
# and a training item it points at harder (score 2), which must be excluded, not recommended.
USERS = [
    # train        held-out   target  decoy (a train item)
    ([0, 1],       [2],       2,      0),   # top-1 is the only held-out item: recall@1 = 1
    ([1, 2],       [3, 4],    3,      2),   # one of two held-out items: recall@1 = 1/2
    ([0, 3],       [5],       6,      3),   # points at item 6, not held out: recall@1 = 0
    ([4, 5, 6],    [7],       7,      5),   # recall@1 = 1
    ([2],          [0, 1, 7], 1,      2),   # recall@1 = 1/3
]
NUM_ITEMS = 8


def _dataset() -> Dataset:
    train = [(u, i) for u, (tr, _, _, _) in enumerate(USERS) for i in tr]
    test = [(u, i) for u, (_, te, _, _) in enumerate(USERS) for i in te]
    as_inter = lambda pairs: Interactions(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    return Dataset(name="hand", train=as_inter(train), test=as_inter(test), valid=None,
                   user_vocab=Vocab(np.arange(len(USERS))), item_vocab=Vocab(np.arange(NUM_ITEMS)),
                   user_features={}, item_features={}, user_feature_specs=[], item_feature_specs=[], stats={})


def _embeddings() -> tuple[np.ndarray, np.ndarray]:
    item_emb = np.eye(NUM_ITEMS, dtype=np.float32)  # score(u, i) = user_emb[u, i]
    user_emb = np.zeros((len(USERS), NUM_ITEMS), np.float32)
    for u, (_, _, target, decoy) in enumerate(USERS):
        user_emb[u, target], user_emb[u, decoy] = 1.0, 2.0
    return user_emb, item_emb


def test_hand_made_embeddings_give_the_recall_known_by_construction():
    c = EvaluateConfig(run_dir="unused", ks=[1, 2])
    c.segments.user_activity_edges = [1, 3]
    user_emb, item_emb = _embeddings()
    m = evaluate_embeddings(user_emb, item_emb, _dataset(), np.arange(len(USERS)), c)
    expected_recall_1 = np.mean([1, 1 / 2, 0, 1, 1 / 3])
    assert m["methods"]["model"]["recall@1"] == pytest.approx(expected_recall_1)
    assert m["methods"]["model"]["hitrate@1"] == pytest.approx(4 / 5)  # every user but user 2
    assert m["methods"]["model"]["mrr@1"] == pytest.approx(4 / 5)
    # Brute-force ScaNN below brute_force_below: the same top-k as exact search.
    assert m["methods"]["model_ann"]["recall@1"] == pytest.approx(expected_recall_1)
    assert m["ann"]["overlap@1"] == 1.0 and m["ann"]["params"]["mode"] == "brute_force"
    # Distinct top-1 items: 2, 3, 6, 7, 1.
    assert m["coverage"]["model"]["coverage@1"] == pytest.approx(5 / NUM_ITEMS)
    # Users 0-2 and 4 have 1-2 training items, user 3 has 3.
    buckets = {b["name"]: b for b in m["segments"]["user_activity"]}
    assert buckets["1-2"]["num_users"] == 4 and buckets["3+"]["num_users"] == 1
    assert buckets["1-2"]["metrics"]["model"]["recall@1"] == pytest.approx(np.mean([1, 1 / 2, 0, 1 / 3]))
    assert buckets["3+"]["metrics"]["model"]["recall@1"] == pytest.approx(1.0)
    assert set(m["methods"]) == {"model", "model_ann", "most_popular", "ease"}
    assert m["num_users"] == 5 and m["skipped"] == {}


def test_report_and_plots_render_from_the_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    from eval.report import markdown, summary, write_outputs, write_plots

    m = evaluate_embeddings(*_embeddings(), _dataset(), np.arange(len(USERS)), EvaluateConfig(run_dir="x", ks=[1, 2]))
    assert write_plots(m, tmp_path) == ["recall_at_k.png", "segments.png", "popularity_bias.png"]
    write_outputs(m, tmp_path)
    for name in ("recall_at_k.png", "segments.png", "popularity_bias.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "metrics.json").read_text())["methods"]["model"]["recall@1"] == pytest.approx(
        m["methods"]["model"]["recall@1"])
    text = markdown(m)
    assert f"| model (exact) | {m['methods']['model']['recall@1']:.4f} |" in text and "## Segments" in text
    assert [line.split()[:2] for line in summary(m).splitlines()[3:5]] == [["model", "(exact)"], ["model", "(ANN)"]]


def test_ease_is_skipped_above_its_item_limit_and_says_why():
    c = EvaluateConfig(run_dir="unused", ks=[1, 2])
    c.baselines.ease_max_items = 4
    c.ann.enabled = False
    m = evaluate_embeddings(*_embeddings(), _dataset(), np.arange(len(USERS)), c)
    assert "ease" not in m["methods"] and "model_ann" not in m["methods"]
    assert "8 items > baselines.ease_max_items=4" in m["skipped"]["ease"]


@pytest.mark.parametrize("extra", [[], ["model.item.use_history=true", "model.item.combine=sum"]],
                         ids=["default", "item_audience"])
def test_eval_of_a_trained_run_reproduces_the_training_report(tmp_path, extra):
    from eval.run import run
    from tests.helpers import smoke_cfg
    from train.loop import run as train

    # One device (jit): the subject here is evaluation, and pmap over 4 fake devices compiles twice as long.
    train(smoke_cfg("train.total_steps=20", "checkpoint.every_steps=10", "train.launcher=jit", *extra), tmp_path)
    printed = json.loads((tmp_path / "final_metrics.json").read_text())["eval"]["model"]
    out = tmp_path / "report"
    m = run(validate({"run_dir": str(tmp_path), "ks": [5, 10], "out_dir": str(out), "plots": False}))
    for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
        assert m["methods"]["model"][key] == pytest.approx(printed[key], abs=1e-9), key
    assert m["step"] == 20 and m["num_users"] == printed["num_users"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["methods"]["model"]["recall@10"] == pytest.approx(printed["recall@10"])
    assert saved["model_version"].startswith("step20-")
    assert "| model (exact) |" in (out / "report.md").read_text()
    # An earlier checkpoint is a different model: its own numbers, its own default directory.
    early = run(validate({"run_dir": str(tmp_path), "step": 10, "ks": [5, 10], "plots": False,
                          "ann": {"enabled": False}}))
    assert early["step"] == 10 and (tmp_path / "eval" / "step_10" / "metrics.json").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_rejects_an_unknown_key_with_one_line_and_status_2():
    result = _cli("run_dir=/nowhere", "ann.leaves=3")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ann.leaves=3: unknown key" in lines[0] and "ann.num_leaves" in lines[0]


def test_cli_refuses_a_directory_that_is_not_a_training_run(tmp_path):
    result = _cli(f"run_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"config error: run_dir='{tmp_path}': not a training run directory (needs config.yaml and ckpt/, as "
        "written by `python -m train hydra.run.dir=...`)"]
    assert list(tmp_path.iterdir()) == []  # nothing was written there


@pytest.mark.parametrize("cfg,message", [
    ({"run_dir": "/r", "split": "train"}, "split='train': must be one of test, valid"),
    ({"run_dir": "/r", "ks": [0, 10]}, "ks=[0, 10]: every element must be > 0"),
    ({"run_dir": "/r", "ks": []}, "ks=[]: must be a non-empty list of positive ints"),
    ({"run_dir": "/r", "data": {"pathh": "x"}}, "data.pathh='x': unknown data key"),
    ({"run_dir": "/r", "bogus": 1}, "bogus=1: unknown key"),
    ({"run_dir": "/r", "segments": {"item_share_edges": [0.8, 0.5]}}, "segments.item_share_edges=[0.8, 0.5]"),
    ({}, "run_dir=None: required"),
])
def test_validate_names_the_bad_key(cfg, message):
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_override_check_knows_data_keys_and_leaves_hydra_alone():
    known = known_keys()
    assert unknown_override(["run_dir=/r", "data.path=/d", "ann.num_leaves=10", "hydra.run.dir=.", "ks=[5,10]"],
                            known) is None
    assert "did you mean data.path" in unknown_override(["data.pth=/d"], known)
