"""Step 3 end to end on tiny models, as subprocesses exactly as a user runs them."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY_PPO, run_stage

TINY = [*TINY_PPO, "--data_split", "8,1,1"]


def _metrics(out):
    return json.load(open(os.path.join(out, "metrics.json")))


def test_ppo_runs_and_writes_everything(tmp_path):
    out = str(tmp_path / "ppo")
    proc = run_stage(
        [
            "ppo.py",
            *TINY,
            "--max_steps",
            "3",
            "--enable_ema",
            "--print_answers_interval",
            "3",
            "--unsupervised_dataset_name",
            "builtin:sort",
            "--unsup_coef",
            "0.5",
            "--output_dir",
            out,
        ]
    )
    assert "step 3/3 | reward" in proc.stdout and "score" in proc.stdout
    m = _metrics(out)
    for key in (
        "eval_accuracy_start",
        "eval_accuracy",
        "eval_reward_start",
        "eval_reward",
        "eval_kl_start",
        "eval_kl",
        "eval_response_length",
        "eval_eos_rate",
        "eval_hacked",
        "train_seconds",
    ):
        assert key in m, key
    assert m["eval_kl_start"] == pytest.approx(0.0, abs=1e-5)  # the actor starts as the reference
    assert m["eval_kl"] > 0  # the exact KL of the next-token distributions: never negative, and the actor moved
    rows = [json.loads(x) for x in open(os.path.join(out, "eval_generations.jsonl"))]
    assert rows and set(rows[0]) >= {"prompt", "response", "score", "correct", "reference_score"}
    hacked = [r for r in rows if not r["correct"] and r["score"] > r["reference_score"]]
    assert m["eval_hacked"] == pytest.approx(len(hacked) / len(rows))
    for folder in ("actor", "actor_ema", "critic"):
        assert os.path.isfile(os.path.join(out, folder, "config.json")), folder
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(os.path.join(out, "actor"))
    log = open(os.path.join(out, "log.csv")).read().splitlines()
    assert log[0] == "step,name,value" and any(x.startswith("3,reward,") for x in log)
    ptx = [float(x.split(",")[2]) for x in log if ",ptx_loss," in x]  # PPO-ptx: the LM loss on unsupervised text
    assert len(ptx) == 3 and all(0 < x < 10 for x in ptx)


def test_hybrid_engine_on_cpu_falls_back_with_same_results(tmp_path):
    plain, hybrid = str(tmp_path / "plain"), str(tmp_path / "hybrid")
    run_stage(["ppo.py", *TINY, "--max_steps", "2", "--output_dir", plain])
    proc = run_stage(["ppo.py", *TINY, "--max_steps", "2", "--enable_hybrid_engine", "--output_dir", hybrid])
    assert "warning: the hybrid engine needs a CUDA GPU and a 16/32-bit actor; using ZeRO-gathered" in proc.stdout
    a, b = _metrics(plain), _metrics(hybrid)
    a.pop("train_seconds"), b.pop("train_seconds")
    assert a == b


def test_kill_and_resume_gives_the_same_metrics(tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    args = [*TINY, "--max_steps", "6", "--checkpoint_interval", "2"]
    run_stage(["ppo.py", *args, "--output_dir", full])
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "ppo.py"), *args, "--output_dir", killed],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pointer = os.path.join(killed, "checkpoints", "latest")
    deadline = time.time() + 300
    while not (os.path.exists(pointer) and open(pointer).read().strip() == "step_4") and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "metrics.json"))
    resumed = run_stage(["ppo.py", *args, "--output_dir", killed, "--resume"])
    assert "resumed from" in resumed.stdout and "after step 4" in resumed.stdout
    assert "step 5/6" in resumed.stdout and "step 1/6" not in resumed.stdout
    a, b = _metrics(full), _metrics(killed)
    a.pop("train_seconds"), b.pop("train_seconds")
    assert a == b


def test_generation_batch_smaller_than_micro_batches_trains_over_the_whole_rollout(tmp_path):
    # a rollout of 2 generation batches of 6 = 12 sequences, micro-batches of 4 sliced across both batches
    out = str(tmp_path / "ppo")
    proc = run_stage(
        [
            "ppo.py",
            "--actor",
            "tiny:gpt2",
            "--reward",
            "tiny:gpt2",
            "--per_device_generation_batch_size",
            "6",
            "--generation_batches",
            "2",
            "--per_device_training_batch_size",
            "4",
            "--max_answer_seq_len",
            "8",
            "--data_split",
            "8,1,1",
            "--max_steps",
            "2",
            "--output_dir",
            out,
        ]
    )
    assert (
        "rollout 6 x 2 prompts x 1 samples per rank x 1 ranks = 12 sequences" in proc.stdout
        and "step 2/2" in proc.stdout
    )
    assert _metrics(out)["skipped_updates"] == 0


REWARD_FILE = """
def longer_is_better(prompts, responses):  # a user's reward: instructions as written, answers without the EOS
    assert all(p.startswith("sort: ") for p in prompts), prompts[:2]
    return [min(len(r.split()), 6) / 6 for r in responses]
"""
FREE = ["--actor", "tiny:gpt2", "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "8",
        "--max_answer_seq_len", "8", "--data_split", "8,1,1", "--max_steps", "2"]  # fmt: skip


def test_critic_free_grpo_with_a_user_reward_function(tmp_path):
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    out = str(tmp_path / "grpo")
    fn = f"{tmp_path / 'rewards.py'}:longer_is_better"
    grpo = [
        "--advantage_estimator",
        "grpo",
        "--n_samples_per_prompt",
        "4",
        "--kl_loss_coef",
        "0.05",
        "--kl_estimator",
        "k3",
    ]
    proc = run_stage(["ppo.py", *FREE, *grpo, "--reward_fn", fn, "--entropy_coef", "0.01", "--output_dir", out])
    assert "ppo: grpo, 2 models (critic-free)" in proc.stdout and "4 samples per rank" in proc.stdout
    assert "step 2/2" in proc.stdout and "vf_loss" not in proc.stdout
    m = _metrics(out)
    assert 0 <= m["eval_reward_start"] <= 1 and "eval_hacked" not in m  # the function's scores; no reward model
    assert not os.path.exists(os.path.join(out, "critic")) and os.path.isfile(os.path.join(out, "actor", "config.json"))
    log = [x.split(",") for x in open(os.path.join(out, "log.csv")).read().splitlines()[1:]]
    assert [k for s, k, v in log if s == "2" and k == "kl_loss"] == ["kl_loss"]


def test_critic_free_rloo_on_two_ranks_with_zero3(tmp_path):
    out = str(tmp_path / "rloo")
    rloo = ["--advantage_estimator", "rloo", "--n_samples_per_prompt", "2", "--actor_zero_stage", "3"]
    proc = run_stage(["ppo.py", *FREE, *rloo, "--reward_fn", "checker", "--output_dir", out], launcher=2)
    assert "ppo: rloo, 2 models (critic-free)" in proc.stdout and "x 2 ranks = 16 sequences" in proc.stdout
    m = _metrics(out)
    assert m["eval_reward"] == pytest.approx(m["eval_accuracy"])  # the checker's 0/1 is the reward
