"""Every bad input a user can give, through the command line as they give it: exit status 2, one line
`error: <flag or file>: <what is wrong>`, no traceback, and no output folder left behind."""

import json
import shutil

import pytest
import torch

import builtin
from conftest import TINY_PPO, assert_one_line_error, run_stage
from hub_copies import write_records

PPO = ["ppo.py", *TINY_PPO]
SFT = ["sft.py", "--model_name_or_path", "tiny:gpt2"]
PPO_FN = [*PPO[:3], *PPO[5:], "--reward_fn"]  # no --reward


def _rows(tmp):
    write_records(str(tmp / "rows.jsonl"), [{"prompt": "Q", "chosen": "A"}] * 10)
    return str(tmp / "rows.jsonl")


def _reward_file(tmp):
    (tmp / "rewards.py").write_text("def score(prompts, responses):\n    return [0.0] * len(responses)\n")
    return str(tmp / "rewards.py")


def _missing_column(tmp):
    write_records(str(tmp / "rows.jsonl"), [{"question": "Q", "chosen": "A"}] * 10)
    return [*SFT, "--data_path", str(tmp / "rows.jsonl")]


def _blank_rows(tmp):
    write_records(str(tmp / "rows.jsonl"), [{"prompt": " ", "chosen": "A"}] * 10)
    return [*SFT, "--data_path", str(tmp / "rows.jsonl")]


def _no_eos(tmp):
    model = tmp / "no-eos"
    shutil.copytree(builtin.tiny_model_path("gpt2"), model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["eos_token"] = None
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    return ["sft.py", "--model_name_or_path", str(model)]


# case -> (command from tmp_path, fragments the one error line must hold)
CASES = {
    "model path that does not exist": (
        lambda t: ["sft.py", "--model_name_or_path", str(t / "missing")],
        ["--model_name_or_path", "missing: no such model folder"],
    ),
    "hub model name that does not resolve": (
        lambda t: ["reward.py", "--model_name_or_path", "nobody/no-such-model-xyz"],
        ["--model_name_or_path nobody/no-such-model-xyz"],
    ),
    "dataset that does not exist": (
        lambda t: [*SFT, "--data_path", "no/such-dataset"],
        ["--data_path no/such-dataset: unknown dataset"],
    ),
    "local file missing a column": (_missing_column, ["rows.jsonl: missing column(s) prompt"]),
    "data empty after filtering (blank rows)": (_blank_rows, ["rows.jsonl: no usable train rows"]),
    "data empty after filtering (prompt length)": (
        lambda t: [*PPO, "--max_prompt_seq_len", "4"],
        ["--max_prompt_seq_len 4: no train prompt"],
    ),
    "malformed --data_split": (lambda t: [*SFT, "--data_split", "2,4"], ["--data_split '2,4'"]),
    "--zero_stage outside 0-3": (lambda t: [*SFT, "--zero_stage", "4"], ["--zero_stage 4"]),
    "--critic_zero_stage outside 0-3": (lambda t: [*PPO, "--critic_zero_stage", "-1"], ["--critic_zero_stage -1"]),
    "--offload with ZeRO 0": (lambda t: [*PPO, "--offload"], ["--offload with --actor_zero_stage 0", "ZeRO 1-3"]),
    "--lora_module_name matching no layer of the critic": (
        lambda t: [*PPO, "--critic_lora_dim", "4", "--critic_lora_module_name", "nope"],
        ["--critic_lora_module_name 'nope': matches no linear layer of GPT2Model"],
    ),
    "--eos_token that is not a token": (lambda t: [*SFT, "--eos_token", "<|nope|>"], ["--eos_token <|nope|>: not a"]),
    "--checkpoint_interval that splits an accumulated update": (
        lambda t: [*PPO, "--gradient_accumulation_steps", "4", "--checkpoint_interval", "1"],
        ["--checkpoint_interval 1: 2 micro-batches per step do not end a --gradient_accumulation_steps update"],
    ),
    "--lora_module_name matching no layer": (
        lambda t: [*SFT, "--lora_dim", "4", "--lora_module_name", "nothing_like_this"],
        ["--lora_module_name 'nothing_like_this': matches no linear layer"],
    ),
    "--inference_tp_size > 1 without actor ZeRO-3": (
        lambda t: [*PPO, "--inference_tp_size", "2"],
        ["--inference_tp_size", "--actor_zero_stage 3"],
    ),
    "batch sizes that do not divide": (
        lambda t: [*PPO, "--per_device_generation_batch_size", "6"],
        ["--per_device_generation_batch_size x --generation_batches x --n_samples_per_prompt (6)", "multiple of"],
    ),
    "--output_dir that cannot be written": (
        lambda t: [*SFT, "--output_dir", "/proc/no/such"],
        ["--output_dir /proc/no/such: cannot be created"],
    ),
    "--resume with no checkpoint": (lambda t: [*PPO, "--resume"], ["--resume: no checkpoint"]),
    "tokenizer with no EOS": (_no_eos, ["--model_name_or_path", "no-eos: its tokenizer has no EOS token"]),
    "--chat_template with a tokenizer that has none": (
        lambda t: [*SFT, "--chat_template"],
        ["--chat_template", "has no chat template"],
    ),
    "group estimator with one sample per prompt": (
        lambda t: [*PPO, "--advantage_estimator", "grpo"],
        ["--advantage_estimator grpo: needs --n_samples_per_prompt 2 or more"],
    ),
    "--dynamic_sampling without groups": (
        lambda t: [*PPO, "--dynamic_sampling"],
        ["--dynamic_sampling: needs groups: a critic-free --advantage_estimator and --n_samples_per_prompt 2 or more"],
    ),
    "both --reward and --reward_fn": (lambda t: [*PPO, "--reward_fn", "checker"], ["--reward or --reward_fn"]),
    "--reward_fn checker on data without a checker": (
        lambda t: [*PPO_FN, "checker", "--data_path", _rows(t)],
        ["--reward_fn checker", "has no ground-truth checker"],
    ),
    "--reward_fn file that does not exist": (lambda t: [*PPO_FN, "nowhere.py:score"], ["--reward_fn nowhere.py:score"]),
    "--reward_fn function that does not exist": (
        lambda t: [*PPO_FN, _reward_file(t) + ":nothing"],
        ["--reward_fn", "has no function 'nothing'"],
    ),
}


if not torch.cuda.is_available():  # on a GPU machine fp16 is fine
    CASES["--dtype fp16 without a GPU"] = (lambda t: [*SFT, "--dtype", "fp16"], ["--dtype fp16 needs a GPU"])


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_any_work(case, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network, minus the connection timeouts
    make, fragments = CASES[case]
    cmd = make(tmp_path)
    out = tmp_path / "out"
    if "--output_dir" not in cmd:
        cmd = [*cmd, "--output_dir", str(out)]
    proc = run_stage(cmd, cwd=str(tmp_path), check=False)
    assert_one_line_error(proc, *fragments)
    assert not out.exists() or not any(out.iterdir())  # nothing written where output would go
