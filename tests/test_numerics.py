"""Non-finite losses and rewards are skipped, counted and logged, never trained on or saved; the same
command with the same seed gives the same metrics."""

import json
import math
import os
import subprocess
import sys

import torch

import common
from conftest import DEMO, ROOT, TINY_PPO, run_stage

PPO = [*TINY_PPO, "--data_split", "18,1,1", "--ppo_epochs", "2"]


class FakeEngine:
    def __init__(self):
        self.calls = []

    def backward(self, loss):
        self.calls.append("backward")

    def step(self):
        self.calls.append("step")


def test_backward_step_skips_non_finite_losses():
    engine = FakeEngine()
    assert common.backward_step(engine, torch.tensor(1.5)) is True
    assert engine.calls == ["backward", "step"]
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert common.backward_step(engine, torch.tensor(bad)) is False
    assert engine.calls == ["backward", "step"]  # nothing reached the optimizer


NAN_REWARD_DRIVER = """
import sys, torch, ppo
original, calls = ppo.compute_rewards, []
def first_rollout_nan(scores, *rest, **kw):  # the reward model returns NaN for one sample of the first rollout
    calls.append(1)
    if len(calls) == 1:
        scores = scores.clone(); scores[0] = float('nan')
    return original(scores, *rest, **kw)
ppo.compute_rewards = first_rollout_nan
ppo.main(sys.argv[1:])
"""


def test_nan_reward_skips_that_rollouts_updates_and_never_reaches_the_weights(tmp_path):
    out = str(tmp_path / "ppo")
    proc = subprocess.run(
        [sys.executable, "-c", NAN_REWARD_DRIVER, *PPO, "--max_steps", "2", "--enable_ema", "--output_dir", out],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # step 1: whitening spreads sample 0's NaN advantage to all, so all 2 PPO epochs x 2 micro-batches of the
    # actor are skipped; only sample 0's return is NaN, so the critic skips the 2 micro-batches holding it
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["skipped_updates"] == 6
    assert "skipped 6 non-finite updates" in proc.stdout
    log = [line.split(",") for line in open(os.path.join(out, "log.csv")).read().splitlines()[1:]]
    assert [(s, v) for s, k, v in log if k == "skipped"] == [("1", "6.0"), ("2", "6.0")]  # step 2 trained normally
    assert (
        math.isfinite(metrics["eval_kl"]) and abs(metrics["eval_kl"]) > 1e-4
    )  # and did move the actor (k1 on greedy answers: either sign)
    from safetensors.torch import load_file

    for folder in ("actor", "actor_ema", "critic"):
        for name, t in load_file(os.path.join(out, folder, "model.safetensors")).items():
            assert torch.isfinite(t).all(), (folder, name)


def _metrics(out):
    m = json.load(open(os.path.join(out, "metrics.json")))
    m.pop("train_seconds")
    return m


def test_same_command_same_seed_same_metrics(tmp_path):
    sft = [
        "sft.py",
        *DEMO["sft.py"],
        "--model_name_or_path",
        "tiny:gpt2",
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "8",
        "--eval_max_new_tokens",
        "8",
        "--data_split",
        "1,18,1",
        "--seed",
        "7",
    ]
    ppo = ["ppo.py", *PPO, "--max_steps", "2", "--seed", "7"]
    for name, cmd in (("sft", sft), ("ppo", ppo)):
        for i in (0, 1):
            run_stage([*cmd, "--output_dir", str(tmp_path / f"{name}{i}")])
        first, second = _metrics(str(tmp_path / f"{name}0")), _metrics(str(tmp_path / f"{name}1"))
        assert first == second, name
    assert abs(first["eval_kl"]) > 1e-4  # PPO moved the actor, identically both times
