"""Step 3 end to end on tiny models, as subprocesses exactly as a user runs them."""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import models
from conftest import DEMO, ROOT, TINY_PPO, run_stage

TINY = [*TINY_PPO, "--data_split", "18,1,1"]


def _metrics(out):
    return json.load(open(os.path.join(out, "metrics.json")))


CRITIC_DRIVER = """
import sys, torch, common, models, ppo
device = common.init_distributed(0)
args = ppo.parse_args(sys.argv[1:])
tokenizer = models.load_tokenizer(args.actor)
engine = ppo.RLHFEngine(args.actor, args.critic, args.reward, tokenizer, args, 10, device)
ids = torch.tensor([tokenizer("Human: sort: b a\\n\\nAssistant: a b").input_ids + [tokenizer.eos_token_id]])
with torch.no_grad():
    raw, value = (m.module.score(ids, torch.ones_like(ids)).item() for m in (engine.reward, engine.critic))
print("SCORES", raw, value)
"""


@pytest.mark.parametrize("normalize", ["--normalize_reward", "--no-normalize_reward"])
def test_a_critic_from_the_reward_model_starts_on_the_rewards_scale(tmp_path, normalize):
    """Rewards are standardised by the reward model's stored statistics; the critic initialised from it must predict
    on that scale too, else its first advantages point away from the answers the reward model prefers."""
    tokenizer = models.load_tokenizer("tiny:gpt2")
    model, _ = models.load_reward_model("tiny:gpt2", tokenizer)
    torch.nn.init.constant_(model.v_head.bias, 7.0)  # raw scores far from their standardised values
    rm = str(tmp_path / "rm")
    models.save_reward_model(model, tokenizer, rm, stats={"score_mean": 3.0, "score_std": 4.0}, json_files=None)
    flags = ["--actor", "tiny:gpt2", "--reward", rm, normalize, "--output_dir", str(tmp_path / "o")]
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-c", CRITIC_DRIVER, *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw, value = map(float, proc.stdout.split("SCORES")[1].split())
    assert abs(raw - (raw - 3.0) / 4.0) > 1.0
    expected = (raw - 3.0) / 4.0 if normalize == "--normalize_reward" else raw
    assert value == pytest.approx(expected, rel=1e-4, abs=1e-5)


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without a CUDA GPU")
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
            *DEMO["ppo.py"],
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
            "18,1,1",
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
FREE = [*DEMO["ppo.py"], "--actor", "tiny:gpt2", "--per_device_generation_batch_size", "4",
        "--per_device_training_batch_size", "8", "--max_answer_seq_len", "8", "--data_split", "18,1,1", "--max_steps",
        "2"]  # fmt: skip


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


def test_grpo_with_every_knob_of_issue_28_on_two_ranks_with_zero3(tmp_path):
    out = str(tmp_path / "grpo")
    grpo = ["--advantage_estimator", "grpo", "--n_samples_per_prompt", "2", "--actor_zero_stage", "3"]
    knobs = ["--importance_sampling_level", "sequence", "--dynamic_sampling", "--cliprange_high", "0.28",
             "--overlong_buffer_len", "4", "--tis_cap", "2"]  # fmt: skip
    proc = run_stage(["ppo.py", *FREE, *grpo, *knobs, "--reward_fn", "checker", "--output_dir", out], launcher=2)
    assert "ppo: grpo, 2 models (critic-free)" in proc.stdout and "x 2 ranks = 16 sequences" in proc.stdout
    log = [x.split(",") for x in open(os.path.join(out, "log.csv")).read().splitlines()[1:]]
    assert [s for s, k, v in log if k == "extra_batches"] == ["1", "2"]  # groups refilled on each rank, in step
    assert "step 2/2" in proc.stdout and math.isfinite(_metrics(out)["eval_kl"])
    _every_held_out_prompt_once(out)


def _every_held_out_prompt_once(out):  # both ranks' eval records gathered, the metrics over all of them
    records, m = [json.loads(x) for x in open(os.path.join(out, "eval_generations.jsonl"))], _metrics(out)
    args = json.load(open(os.path.join(out, "args.json")))
    args = argparse.Namespace(**args, split=data.parse_split(args["data_split"]))
    prompts = data.build_prompts(args, models.load_tokenizer(args.actor))[1]["texts"]
    assert sorted(r["prompt"] for r in records) == sorted(prompts)
    assert m["eval_reward"] == pytest.approx(sum(r["score"] for r in records) / len(records))


def test_reinforce_pp_on_two_ranks_with_zero3_ema_and_resume(tmp_path):
    out = str(tmp_path / "rpp")
    flags = ["--advantage_estimator", "reinforce_pp", "--per_device_generation_batch_size", "8", "--reward_fn",
             "checker", "--actor_zero_stage", "3", "--enable_ema", "--checkpoint_interval", "1", "--output_dir",
             out]  # fmt: skip
    run_stage(["ppo.py", *FREE, *flags], launcher=2)  # it crashed: whitening summed on cuda:0
    full = _metrics(out)
    _every_held_out_prompt_once(out)
    resumed = run_stage(["ppo.py", *FREE, *flags, "--resume"], launcher=2)  # again from the checkpoint after step 1
    assert "after step 1" in resumed.stdout and "step 2/2" in resumed.stdout and "step 1/2" not in resumed.stdout
    again = _metrics(out)
    assert {k: v for k, v in again.items() if k != "train_seconds"} == {
        k: v for k, v in full.items() if k != "train_seconds"
    }


def test_deepspeed_chats_step3_command_runs_unchanged(tmp_path):
    # training_scripts/opt/single_gpu/run_1.3b.sh with its main.py's later flags; only the sizes are the test's
    out = str(tmp_path / "ppo")
    ds_chat = ["--actor_model_name_or_path", "tiny:gpt2", "--critic_model_name_or_path", "tiny:gpt2",
               "--actor_zero_stage", "0", "--critic_zero_stage", "0", "--num_padding_at_beginning", "1",
               "--gradient_accumulation_steps", "2", "--deepspeed", "--actor_lora_dim", "128", "--enable_hybrid_engine",
               "--actor_gradient_checkpointing", "--actor_dropout", "0.0", "--preprocessing_num_workers", "4",
               "--enable_mixed_precision_lora", "--compute_fp32_loss", "--add_eot_token", "--align_overflow",
               "--disable_actor_dropout", "--enable_ema", "--enable_test_mode", "--test_stop_step", "2"]  # fmt: skip
    sizes = ["--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4",
             "--max_answer_seq_len", "8", "--data_split", "2,4,4", "--output_dir", out]  # fmt: skip
    proc = run_stage(["ppo.py", *ds_chat, *sizes])
    # --critic_model_name_or_path is the reward model, which also initialises the critic (DeepSpeed-Chat's meaning)
    assert "4 models; actor tiny:gpt2, critic tiny:gpt2, reward tiny:gpt2" in proc.stdout
    assert "micro-batch 4 x accum 2; 1 PPO epochs = 0.5 updates per step; 2 steps" in proc.stdout  # test mode: 2 steps
    assert "note: --num_padding_at_beginning is DeepSpeed-Chat's; ignored" in proc.stdout and "step 2/2" in proc.stdout
    from safetensors.torch import load_file

    # one update over two rollouts: the EMA moved once, at the accumulation boundary, not at every micro-batch
    start, end = load_file(os.path.join(models.resolve_model("tiny:gpt2"), "model.safetensors")), {}
    end, ema = (load_file(os.path.join(out, f, "model.safetensors")) for f in ("actor", "actor_ema"))
    key = "transformer.wte.weight"
    assert not torch.equal(end[key], start[key][: end[key].shape[0]])
    assert torch.allclose(ema[key], 0.992 * start[key][: ema[key].shape[0]] + 0.008 * end[key], atol=1e-6)


WHITEN_DRIVER = """
import sys, ppo
seen = {"whiten_rewards": 0, "agg": set()}
whiten, aggregate = ppo.masked_whiten, ppo.aggregate
def spy_whiten(x, mask, shift_mean=True, distributed=False):
    seen["whiten_rewards"] += not shift_mean
    return whiten(x, mask, shift_mean, distributed)
def spy_aggregate(loss, mask, mode, max_len):
    seen["agg"].add(mode)
    return aggregate(loss, mask, mode, max_len)
ppo.masked_whiten, ppo.aggregate = spy_whiten, spy_aggregate
ppo.main(sys.argv[1:])
print("SEEN", seen["whiten_rewards"], sorted(seen["agg"]))
"""


def test_gae_with_a_reward_function_and_the_loss_flags_from_the_command_line(tmp_path):
    out = str(tmp_path / "ppo")
    flags = ["--actor", "tiny:gpt2", *DEMO["ppo.py"], "--reward_fn", "checker", "--loss_agg_mode",
             "seq-mean-token-mean", "--whiten_rewards", "--target_kl", "0.01", "--eval_interval", "1",
             "--per_device_generation_batch_size", "8", "--per_device_training_batch_size", "4",
             "--max_answer_seq_len", "8", "--data_split", "18,1,1", "--max_steps", "2", "--output_dir",
             out]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", WHITEN_DRIVER, *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gae, 3 models; actor tiny:gpt2, critic tiny:gpt2, reward --reward_fn checker" in proc.stdout  # no RM
    assert "SEEN 2 ['seq-mean-token-mean']" in proc.stdout  # rewards whitened at each of 2 steps; the mode used
    log = [x.split(",") for x in open(os.path.join(out, "log.csv")).read().splitlines()[1:]]
    coefs = [float(v) for s, k, v in log if k == "kl_coef"]
    assert coefs[0] == 0.2 and coefs[1] != coefs[0]  # --target_kl moves the coefficient after each step
    assert [s for s, k, v in log if k == "eval_accuracy"] == ["0", "1", "2"]  # mid-run evals at --eval_interval
    assert os.path.isfile(os.path.join(out, "critic", "config.json"))


@pytest.mark.parametrize("estimator", ["dr_grpo", "rloo"])
def test_group_estimator_end_to_end(estimator, tmp_path):
    (tmp_path / "rewards.py").write_text(REWARD_FILE)  # rewards that differ within a group (the checker gives an
    out, fn = str(tmp_path / estimator), f"{tmp_path / 'rewards.py'}:longer_is_better"  # untrained model 0s)
    flags = ["--advantage_estimator", estimator, "--n_samples_per_prompt", "2", "--reward_fn", fn]
    proc = run_stage(["ppo.py", *FREE, *flags, "--output_dir", out])
    assert f"ppo: {estimator}, 2 models (critic-free)" in proc.stdout and "step 2/2" in proc.stdout
    assert _metrics(out)["eval_kl"] > 0
