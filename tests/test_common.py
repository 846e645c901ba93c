import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
import lora
import models
from common import UserError


def _model(family):
    tok = models.load_tokenizer(f"tiny:{family}")
    return models.load_model(f"tiny:{family}", tok), tok


@pytest.mark.parametrize("family", ["gpt2", "opt"])  # Conv1D and nn.Linear
def test_lora_fused_equals_unfused_and_saved_weights_match(family, tmp_path):
    torch.manual_seed(0)
    model, tok = _model(family)
    model.eval()
    lora.convert_to_lora(model, lora.default_lora_module(model), lora_dim=4)
    for layer in [m for m in model.modules() if isinstance(m, lora.LinearLayer_LoRA)]:
        torch.nn.init.normal_(layer.lora_left_weight, std=0.5)  # a non-zero update (init is zero)
    x = torch.randint(2, 200, (2, 12))
    with torch.no_grad():
        unfused = model(x).logits
        for layer in [m for m in model.modules() if isinstance(m, lora.LinearLayer_LoRA)]:
            layer.fuse_lora_weight()
        fused = model(x).logits
        for layer in [m for m in model.modules() if isinstance(m, lora.LinearLayer_LoRA)]:
            layer.unfuse_lora_weight()
        again = model(x).logits
    assert torch.allclose(unfused, fused, atol=1e-4)
    assert torch.allclose(unfused, again, atol=1e-5)
    plain, _ = _model(family)
    assert not torch.allclose(plain.eval()(x).logits, unfused, atol=1e-3)  # LoRA changed the function
    common.save_hf(model, tok, str(tmp_path / "out"), json_files={"args.json": {"a": 1}})
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert not any("lora" in k for k in reloaded.state_dict())
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, unfused, atol=1e-4)
    assert json.load(open(tmp_path / "out" / "args.json")) == {"a": 1}


def test_lora_module_name_matching_nothing_is_refused():
    model, _ = _model("gpt2")
    with pytest.raises(UserError, match="--lora_module_name 'nothing_like_this': matches no linear layer"):
        lora.convert_to_lora(model, "nothing_like_this", 4)


def test_only_optimize_lora_freezes_the_rest():
    model, _ = _model("opt")
    lora.convert_to_lora(model, "layers.", 2)
    lora.only_optimize_lora(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_save_replaces_folder_and_keeps_other_files(tmp_path):
    model, tok = _model("gpt2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.log").write_text("log")
    (out / "model.safetensors").write_text("stale")
    common.save_hf(model, tok, str(out))
    assert (out / "train.log").read_text() == "log"
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(reloaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert not [p for p in os.listdir(tmp_path) if p != "out"]  # no temporary folders left behind


def test_reload_generates_the_same_text(tmp_path):
    model, tok = _model("llama")
    torch.manual_seed(3)
    for p in model.parameters():
        p.data.normal_(0, 0.3)  # a random model that says something other than EOS
    prompt = tok("Human: sort: c a b\n\nAssistant:", return_tensors="pt")
    kw = dict(do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    before = model.generate(**prompt, **kw)
    common.save_hf(model, tok, str(tmp_path / "m"))
    model2 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    after = model2.generate(**tok2("Human: sort: c a b\n\nAssistant:", return_tensors="pt"), **kw)
    assert before.shape[1] > prompt["input_ids"].shape[1]
    assert tok.decode(before[0]) == tok2.decode(after[0])


def test_fp16_without_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="--dtype fp16 needs a GPU.*bf16 or fp32"):
        common.check_dtype("fp16")


def test_bad_model_paths_are_refused(tmp_path):
    with pytest.raises(UserError, match="--model_name_or_path /no/such/model: no such model folder"):
        models.check_model_path("/no/such/model")
    with pytest.raises(UserError, match="no config.json"):
        models.check_model_path(str(tmp_path))
    with pytest.raises(UserError, match="unknown tiny model type"):
        models.check_model_path("tiny:nonsense")
    with pytest.raises(UserError, match=r"tiny:gpt2@width=3: bad size 'width=3' \(expected key=integer, keys: hidden"):
        models.check_model_path("tiny:gpt2@width=3")


def test_tiny_size_specs_build_the_shape_asked_for():
    import builtin

    for spec, (hidden, layers, ffn_key, ffn) in {
        "gpt2@hidden=256,layers=4,ffn=1024,positions=512": (256, 4, "n_inner", 1024),
        "opt@hidden=64,layers=2,heads=2,ffn=128": (64, 2, "ffn_dim", 128),
        "llama@hidden=96,layers=5,heads=6,ffn=200": (96, 5, "intermediate_size", 200),
        "opt-350m": (1024, 24, "ffn_dim", 4096),
    }.items():
        model_type, kw = builtin.tiny_config(spec)
        config = transformers.AutoConfig.for_model(model_type, **kw)
        assert (config.hidden_size, config.num_hidden_layers, getattr(config, ffn_key)) == (hidden, layers, ffn), spec
    assert builtin.tiny_config("opt-350m")[1]["word_embed_proj_dim"] == 512  # opt-350m projects, as the real one
    assert builtin.tiny_config("opt@hidden=64")[1]["word_embed_proj_dim"] == 64
    assert builtin.tiny_config("gpt2@positions=512")[1]["n_positions"] == 512


def test_ds_config_batch_hierarchy_and_offload():
    cfg = common.ds_config(3, "bf16", micro_batch=4, grad_accum=2, offload=True)
    assert cfg["train_batch_size"] == 4 * 2 * common.world_size()
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert common.ds_config(2, "fp32", 4, offload=True)["zero_optimization"]["offload_param"]["device"] == "none"


def test_output_dir_that_cannot_be_created_is_refused_and_probe_leaves_nothing(tmp_path):
    with pytest.raises(UserError, match="--output_dir /proc/no/such: cannot be created"):
        common.check_output_dir("/proc/no/such")
    common.check_output_dir(str(tmp_path / "a" / "b"))
    assert not (tmp_path / "a").exists()


def test_run_cli_destroys_the_process_group_after_main():
    # A two-rank Gloo run aborted at exit (rc -6) after saving when the group was left for the interpreter to tear down.
    code = (
        "import common, torch; common.run_cli(lambda: common.init_distributed(0)); "
        "print(torch.distributed.is_initialized())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
