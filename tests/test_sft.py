"""Step 1 end to end, as subprocesses exactly as a user runs them."""

import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import data
from conftest import DEMO, run_stage

FAST = [
    *DEMO["sft.py"],
    "--model_name_or_path",
    "tiny:gpt2",
    "--data_path",
    "builtin:sort",
    "--max_steps",
    "6",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "32",
    "--eval_max_new_tokens",
    "12",
]


def _check_output(out):
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["eval_perplexity"] < metrics["eval_perplexity_start"]  # a few steps already learn the format
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["train_seconds"] > 0
    args = json.load(open(os.path.join(out, "args.json")))
    assert args["model_name_or_path"] == "tiny:gpt2"
    model = AutoModelForCausalLM.from_pretrained(out)  # nothing of ours needed to load it
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id != tok.eos_token_id
    with torch.no_grad():
        assert torch.isfinite(model(**tok("Human: sort: b a\n\nAssistant:", return_tensors="pt")).logits).all()
    return metrics


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_sft_runs_with_each_zero_stage(stage, tmp_path):
    out = str(tmp_path / "sft")
    run_stage(["sft.py", *FAST, "--zero_stage", str(stage), "--output_dir", out])
    _check_output(out)


def test_sft_two_ranks_zero3_saves_a_folder_that_reloads(tmp_path):
    out = str(tmp_path / "sft")
    proc = run_stage(["sft.py", *FAST, "--zero_stage", "3", "--output_dir", out], launcher=2)
    assert "ranks 2 = global batch 16" in proc.stdout
    _check_output(out)


def test_sft_with_lora_only(tmp_path):
    out = str(tmp_path / "sft")
    run_stage(
        [
            "sft.py",
            *FAST,
            "--lora_dim",
            "4",
            "--only_optimize_lora",
            "--lora_learning_rate",
            "1e-2",
            "--output_dir",
            out,
        ]
    )
    _check_output(out)


def test_accumulation_mid_run_evals_and_sft_only_data(tmp_path):
    extra, out = tmp_path / "extra.jsonl", str(tmp_path / "sft")
    extra.write_text("".join(json.dumps({"prompt": f"say {i}", "response": f"{i}"}) + "\n" for i in range(30)))
    flags = ["--gradient_accumulation_steps", "2", "--max_steps", "3", "--print_loss", "--eval_interval", "2",
             "--sft_only_data_path", str(extra), "--data_split", "1,8,1", "--output_dir", out]  # fmt: skip
    proc = run_stage(["sft.py", *FAST, *flags])
    phase1 = len(data.phase_rows(["builtin:sort"], [1, 8, 1], 1, 1234)["train"])
    assert f"{phase1 + 27} train" in proc.stdout  # the extra file's 9:1 train part joins step 1 only
    assert "micro-batch 8 x accum 2 x ranks 1 = global batch 16, 3 steps" in proc.stdout
    log = [x.split(",") for x in open(os.path.join(out, "log.csv")).read().splitlines()[1:]]
    lrs = [float(v) for s, k, v in log if k == "lr"]  # one scheduler step per optimizer step, not per micro-batch
    peak = float(FAST[FAST.index("--learning_rate") + 1])
    assert lrs == pytest.approx([peak * 0.5 * (1 + math.cos(math.pi * s / 3)) for s in (1, 2, 3)])
    assert [s for s, k, v in log if k == "eval_perplexity"] == ["0", "2", "3"]
