"""4-bit base models with LoRA (QLoRA): the saved folder is a plain model equal to the merged one in memory, every stage
trains with --load_in_4bit, and the flags that cannot work are one-line errors."""

import json
import os

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

import common
import lora
import models
import qlora
from common import UserError
from conftest import TINY_PPO, assert_one_line_error, run_stage

IDS = {"input_ids": torch.tensor([[5, 9, 70, 71, 72, 1], [0, 0, 80, 81, 82, 83]])}
IDS["attention_mask"] = (IDS["input_ids"] != 0).long()


def _randomise_lora(model):  # LoRA starts as a zero update: give it a real one, so the merge is tested
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_left_weight" in name:
            p.data.normal_(std=0.5)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])  # gpt2: Conv1D, stored [in, out] in its checkpoint
def test_4bit_lora_model_saves_a_plain_model_with_the_same_logits(family, tmp_path):
    tokenizer = models.load_tokenizer(f"tiny:{family}")
    model = models.load_model(f"tiny:{family}", tokenizer, quant=("nf4", "fp32"))
    assert any(qlora.is_4bit(m) for m in model.modules())
    lora.convert_to_lora(model, lora.default_lora_module(model), 8)
    _randomise_lora(model)
    model.train()  # the training path: bitsandbytes' CPU inference shortcut must not change the weights either
    with torch.no_grad():
        model.eval()(**IDS)  # an eval forward first (PPO generates, then trains)
        merged = model.train()(**IDS).logits
    common.save_hf(model, tokenizer, str(tmp_path / "out"))
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert "quantization_config" not in config
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert not any(qlora.is_4bit(m) for m in plain.modules())
    with torch.no_grad():
        reloaded = plain(**IDS).logits
    torch.testing.assert_close(reloaded, merged, atol=1e-5, rtol=1e-5)  # fp32: the same numbers, not just close


def test_4bit_reward_model_saves_and_reloads_with_the_same_scores(tmp_path):
    tokenizer = models.load_tokenizer("tiny:llama")
    model, _ = models.load_reward_model("tiny:llama", tokenizer, quant=("nf4", "fp32"))
    lora.convert_to_lora(model.backbone, "layers.", 8)
    _randomise_lora(model)
    with torch.no_grad():
        scores = model.score(**IDS)
    models.save_reward_model(model, tokenizer, str(tmp_path / "rm"), {})
    AutoModel.from_pretrained(str(tmp_path / "rm"))  # plain transformers loads the backbone
    again, _ = models.load_reward_model(str(tmp_path / "rm"), tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(again.score(**IDS), scores, atol=1e-5, rtol=1e-5)


def test_4bit_flag_errors_name_the_flag(monkeypatch):
    with pytest.raises(UserError, match="--load_in_4bit with --zero_stage 3: ZeRO-3 cannot shard"):
        lora.check_4bit("--load_in_4bit", 3, lora_dim=8)
    with pytest.raises(UserError, match="--actor_load_in_4bit needs --actor_lora_dim > 0"):
        lora.check_4bit("--actor_load_in_4bit", 0, "--actor_zero_stage", 0, "--actor_lora_dim")
    lora.check_4bit("--ref_load_in_4bit", 0)  # a frozen model needs no LoRA
    monkeypatch.setattr(lora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="--load_in_4bit needs bitsandbytes: pip install"):
        lora.check_4bit("--load_in_4bit", 0, lora_dim=8)


@pytest.mark.parametrize(
    "stage,flags,fragments",
    [
        ("sft.py", ["--load_in_4bit"], ["--load_in_4bit needs --lora_dim > 0"]),
        ("reward.py", ["--load_in_4bit", "--lora_dim", "8", "--zero_stage", "3"], ["--zero_stage 3"]),
        ("ppo.py", [*TINY_PPO, "--ref_load_in_4bit", "--offload_reference_model"], ["--offload_reference_model"]),
    ],
)
def test_4bit_bad_flags_are_one_line_errors(stage, flags, fragments, tmp_path):
    model = [] if stage == "ppo.py" else ["--model_name_or_path", "tiny:llama"]
    proc = run_stage([stage, *model, *flags, "--output_dir", str(tmp_path / "o")], check=False)
    assert_one_line_error(proc, *fragments)


SMALL = ["--learning_rate", "1e-3", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
         "--load_in_4bit", "--lora_dim", "16", "--lora_learning_rate", "1e-2"]  # fmt: skip
GEN = ["--eval_max_new_tokens", "8"]  # sft.py and dpo.py judge greedy answers


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_every_stage_trains_a_4bit_model_with_lora(family, tmp_path):
    sft, rm, dpo = (str(tmp_path / x) for x in ("sft", "rm", "dpo"))
    run_stage(
        ["sft.py", "--model_name_or_path", f"tiny:{family}", *SMALL, *GEN, "--max_steps", "8", "--output_dir", sft]
    )
    m = json.load(open(os.path.join(sft, "metrics.json")))
    assert m["eval_perplexity"] < m["eval_perplexity_start"]  # the loss falls
    assert not any(qlora.is_4bit(x) for x in AutoModelForCausalLM.from_pretrained(sft).modules())
    run_stage(["reward.py", "--model_name_or_path", f"tiny:{family}", *SMALL, "--max_steps", "8", "--output_dir", rm])
    m = json.load(open(os.path.join(rm, "metrics.json")))
    assert m["eval_loss"] < m["eval_loss_start"]
    proc = run_stage(["dpo.py", "--model_name_or_path", sft, *SMALL, *GEN, "--max_steps", "4", "--output_dir", dpo])
    m = json.load(open(os.path.join(dpo, "metrics.json")))
    assert m["eval_kl_start"] == pytest.approx(0.0, abs=1e-5)  # the 4-bit reference is the policy's own base
    assert m["eval_loss"] < m["eval_loss_start"] and "step 4/4" in proc.stdout
    AutoModelForCausalLM.from_pretrained(dpo)


def test_ppo_with_a_4bit_actor_critic_reference_and_reward_model(tmp_path):
    out = str(tmp_path / "ppo")
    flags = ["--actor_load_in_4bit", "--actor_lora_dim", "8", "--critic_load_in_4bit", "--critic_lora_dim", "8"]
    flags += ["--ref_load_in_4bit", "--reward_load_in_4bit", "--enable_ema", "--enable_hybrid_engine"]
    models = ["--actor", "tiny:opt", "--reward", "tiny:llama"]  # both families, one run (the same byte tokenizer)
    proc = run_stage(["ppo.py", *TINY_PPO, *models, *flags, "--max_steps", "3", "--output_dir", out])
    assert "step 3/3" in proc.stdout and "16/32-bit actor; using ZeRO-gathered generate" in proc.stdout
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert all(v == v for v in m.values() if isinstance(v, float))  # no NaN anywhere
    for folder in ("actor", "actor_ema"):
        plain = AutoModelForCausalLM.from_pretrained(os.path.join(out, folder))
        assert not any(qlora.is_4bit(x) for x in plain.modules())
    AutoModel.from_pretrained(os.path.join(out, "critic"))


def test_memory_script_reports_4bit_weights_several_times_smaller(tmp_path):
    out = str(tmp_path / "mem.json")
    proc = run_stage(
        ["scripts/qlora_memory.py", "--model", "tiny:llama@hidden=256,layers=4,heads=4,ffn=512", "--json", out]
    )
    result = json.load(open(out))
    assert [r["mode"] for r in result["rows"]] == ["fp32", "4bit"] and result["weight_ratio"] >= 3
    assert result["rows"][0]["params"] == result["rows"][1]["params"]  # the same model, counted unpacked
    assert "x smaller in 4 bits" in proc.stdout
