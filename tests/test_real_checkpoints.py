"""What only real checkpoints, real tokenizers and GPUs trigger, reproduced on CPU with tiny models of the family that
triggers it (issue 23): checkpoints shipped in bf16 with their own generation config, long rows, SentencePiece's
leading space, chat templates whose turns end with another token than the EOS, several ranks and nodes, real-size
vocabularies, the order of the hybrid engine's modes. Each test failed before its fix."""

import argparse
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from foreign_tokenizers import chatml_folder, demo_lines

import common
import data
import models
import ppo
from conftest import DEMO, ROOT, run_stage


def hub_like_folder(root, family="llama", dtype=torch.bfloat16, generation=None):
    """A tiny model of `family` saved as the hub ships it: weights in `dtype`, a generation_config.json of its own."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = os.path.join(root, f"hub-{family}-{str(dtype)[6:]}")
    if not os.path.isdir(path):
        tok = models.load_tokenizer(f"tiny:{family}")
        model = AutoModelForCausalLM.from_pretrained(models.resolve_model(f"tiny:{family}")).to(dtype)
        model.generation_config = GenerationConfig(**(generation or {}), eos_token_id=1, pad_token_id=0)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


# 1. Models load in fp32 whatever the checkpoint's dtype: the v_head meets fp32 hidden states; fp32 training is fp32.
def test_a_bf16_checkpoint_loads_in_fp32_and_step_2_trains_on_it(tmp_path):
    folder = hub_like_folder(str(tmp_path))
    tok = models.load_tokenizer(folder)
    model, _ = models.load_reward_model(folder, tok)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = torch.tensor([data.encode_prompt(tok, "Human: hi\n\nAssistant:")])
    assert model.score(ids, torch.ones_like(ids)).dtype == torch.float32  # crashed: BFloat16 hidden x Float v_head
    out = str(tmp_path / "rm")
    run_stage(["reward.py", "--model_name_or_path", folder, *DEMO["reward.py"], "--max_steps", "2",
               "--per_device_train_batch_size", "4", "--eval_iters", "1", "--output_dir", out])  # fmt: skip
    assert json.load(open(os.path.join(out, "metrics.json")))["eval_accuracy"] >= 0


def test_fp32_training_of_a_bf16_checkpoint_moves_every_weight(tmp_path):
    from safetensors.torch import load_file

    folder, out = hub_like_folder(str(tmp_path)), str(tmp_path / "sft")
    run_stage(["sft.py", "--model_name_or_path", folder, "--dtype", "fp32", "--learning_rate", "1e-5", "--max_steps",
               "1", "--per_device_train_batch_size", "4", "--data_split", "1,8,1", "--eval_max_new_tokens", "2",
               "--output_dir", out])  # fmt: skip
    before, after = (
        load_file(os.path.join(folder, "model.safetensors")),
        load_file(os.path.join(out, "model.safetensors")),
    )
    matrices = [k for k, v in before.items() if v.dim() == 2 and "embed" not in k]
    moved = [(after[k].float() != before[k].float()).float().mean().item() for k in matrices]
    assert min(moved) > 0.9, min(moved)  # in bf16, a 1e-5 step rounds away on 85% of the weights


# 3. The hub's generation config is dropped: samples come from the policy the log-probs score.
def test_a_hub_generation_config_does_not_change_sampling(tmp_path):
    folder = hub_like_folder(str(tmp_path), generation={"repetition_penalty": 3.0, "no_repeat_ngram_size": 1})
    tok = models.load_tokenizer(folder)
    model = models.load_model(folder, tok).eval()
    assert model.generation_config.repetition_penalty is None and model.generation_config.no_repeat_ngram_size is None
    ids = torch.tensor([data.encode_prompt(tok, "Human: sort: b a\n\nAssistant:")])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8, min_new_tokens=8)
    seq = ids
    with torch.no_grad():
        for _ in range(8):  # greedy by hand: the argmax of the model's own logits
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert out.tolist() == seq.tolist()


# 4. Long rows: responses keep their EOS, prompts keep their end (and BOS), pairs share the cut prompt, or are dropped.
def test_long_rows_keep_their_eos_and_the_end_of_their_prompt():
    tok = models.load_tokenizer("tiny:gpt2")
    prompt = data.format_prompt("sort: " + " ".join("abcdefghij" * 10))  # ~230 byte tokens
    (chosen, rejected), cut = data.encode_row(tok, prompt, [" a b c", " a b c d e f"], 64)
    assert cut and len(rejected["input_ids"]) == 64 and len(chosen["input_ids"]) < 64
    assert chosen["input_ids"][-1] == rejected["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(rejected["input_ids"]).endswith("\n\nAssistant: a b c d e f<|endoftext|>")
    assert chosen["input_ids"][: len(chosen["input_ids"]) - 7] == rejected["input_ids"][: 64 - 13]  # one context
    assert data.encode_row(tok, prompt, [" x" * 40], 64) is None  # 81 tokens of answer: no room left for a prompt
    assert data.encode_row(tok, "Human: a\n\nAssistant:", [" b" * 20], 64) is not None  # a short prompt fits whole


def test_dropped_and_cut_rows_are_counted_and_printed(tmp_path, capsys):
    tok = models.load_tokenizer("tiny:gpt2")
    rows = [data.make_row("q " * n, answer) for n, answer in ((2, " ans"), (40, " ans"), (200, " ans"), (2, " x" * 30))]
    encode = lambda r: (e := data.encode_row(tok, r["prompt"], [r["chosen"]], 48)) and {**e[0][0], "cut": e[1]}
    sets = data.build_cached("sft", {"train": rows, "eval": rows}, tok, str(tmp_path), encode, max_seq_len=48)
    assert len(sets["train"]) == 3 and "cut" not in sets["train"].column_names  # a 61-token answer: dropped
    printed = capsys.readouterr().out
    assert "data: sft train: 1 dropped (response + EOS leaves the prompt < max_len / 4), 2 prompts cut" in printed


def test_a_bos_is_kept_when_a_prompt_is_cut(tmp_path):
    from foreign_tokenizers import build_model_folder

    tok = models.load_tokenizer(build_model_folder("sentencepiece", str(tmp_path)))  # <s> in front of every text
    ids = data.encode_prompt(tok, data.format_prompt("sort: " + "d b a c " * 30), max_len=20)
    assert len(ids) == 20 and ids[0] == tok.bos_token_id and tok.decode(ids).endswith("Assistant:")


# 5. A flag a user does not pass is safe for a real model; the demo's values come from train.py's recipe.
def test_defaults_are_for_real_models_and_train_py_passes_the_demos(tmp_path):
    import dpo
    import reward
    import sft
    import train

    out = ["--output_dir", str(tmp_path / "o")]
    assert sft.parse_args(["--model_name_or_path", "tiny:gpt2", *out]).learning_rate == 9.65e-6
    assert reward.parse_args(["--model_name_or_path", "tiny:gpt2", *out]).learning_rate == 9.65e-6
    assert dpo.parse_args(["--model_name_or_path", "tiny:gpt2", *out]).learning_rate == 1e-6
    a = ppo.parse_args(["--actor", "tiny:gpt2", "--reward", "tiny:gpt2", *out])
    assert (a.actor_learning_rate, a.critic_learning_rate, a.max_answer_seq_len) == (9.65e-6, 5e-6, 256)
    demo = train.step_command(1, train.parse_args(["--output-dir", str(tmp_path)]))
    assert demo[demo.index("--learning_rate") + 1] == "5e-4"  # the tiny demo keeps its tuned values
    assert demo[demo.index("--per_device_train_batch_size") + 1] == "8"  # twice the steps of 16 (README, issue 27)
    real = train.parse_args(["--actor-model", "facebook/opt-1.3b", "--reward-model", "facebook/opt-350m"])
    assert all("--learning_rate" not in train.step_command(i, real) for i in (1, 2))


# 6. Frozen models under ZeRO-3 are sharded as they load (zero.Init), never whole on a rank first.
FROZEN_DRIVER = """
import sys, common, models, ppo
loaded = []
def spy(load):
    def wrapped(*a, **kw):
        out = load(*a, **kw)
        loaded.append(all(hasattr(p, "ds_id") for p in out.parameters()))
        return out
    return wrapped
models.load_model = spy(models.load_model)  # every backbone, the reward model's and the critic's too
device = common.init_distributed(0)
args = ppo.parse_args(sys.argv[1:])
ppo.RLHFEngine(args.actor, args.critic, args.reward, models.load_tokenizer(args.actor), args, 10, device)
print("SHARDED", loaded)
"""


def test_frozen_models_are_sharded_as_they_load_under_zero3(tmp_path):
    flags = ["--actor", "tiny:gpt2", "--reward", "tiny:gpt2", "--actor_zero_stage", "3", "--critic_zero_stage", "3"]
    cmd = [sys.executable, "-c", FROZEN_DRIVER, *flags, "--output_dir", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SHARDED [True, True, True, True]" in proc.stdout  # actor, reference, critic and reward backbones


def test_zero3_in_bf16_shards_the_reward_model_and_critic_with_their_head(tmp_path):
    # zero.Init casts the backbone to bf16 as it loads; an fp32 v_head beside it failed ZeRO-3's one-dtype partitions
    flags = ["--actor", "tiny:opt", "--reward", "tiny:opt", "--dtype", "bf16", "--actor_zero_stage", "3",
             "--critic_zero_stage", "3", "--per_device_generation_batch_size", "4", "--per_device_training_batch_size",
             "4", "--max_answer_seq_len", "4", "--max_steps", "1", "--data_split", "10,10,1"]  # fmt: skip
    proc = run_stage(["ppo.py", *flags, "--output_dir", str(tmp_path / "ppo")])
    assert "step 1/1" in proc.stdout and "zero actor 3 / critic 3; bf16" in proc.stdout


# 2 and 7. The hybrid engine: eval -> generate (synced under ZeRO-3 on several ranks) -> train -> score.
class Recorder(torch.nn.Module):
    """An actor engine that records its modes, generate calls and forward passes."""

    def __init__(self, model, log):
        super().__init__()
        self.module, self.log = model, log

    def train(self, mode=True):
        self.log.append("train" if mode else "eval")
        return super().train(mode)

    def generate(self, *args, **kwargs):
        self.log.append(("generate", kwargs.pop("synced_gpus", None)))  # one process: nothing to keep in step
        return self.module.generate(*args, **kwargs)

    def forward(self, **kwargs):
        self.log.append(("forward", self.training))
        return self.module(**kwargs)


def test_old_logprobs_come_from_train_mode_after_a_synced_generate(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # two ranks of ZeRO-3: generate must keep them in step
    tok, log = models.load_tokenizer("tiny:gpt2"), []
    actor = Recorder(models.load_model("tiny:gpt2", tok), log)
    ref = Recorder(models.load_model("tiny:gpt2", tok), []).eval()
    args = ppo.parse_args(["--actor", "tiny:gpt2", "--reward_fn", "checker", "--actor_zero_stage", "3",
                           "--max_answer_seq_len", "4", "--output_dir", str(tmp_path)])  # fmt: skip
    engine = types.SimpleNamespace(actor=actor, ref=ref, critic=None, reward=None, hybrid=True, tokenizer=tok,
                                   device=torch.device("cpu"), reward_stats=None, ema=None,
                                   reward_fn=lambda prompts, answers: [0.0] * len(answers))  # fmt: skip
    batch = data.prompt_batch({"ids": [data.encode_prompt(tok, "Human: sort: b a\n\nAssistant:")] * 2,
                              "instructions": ["sort: b a"] * 2}, [0, 1], tok.pad_token_id)  # fmt: skip
    ppo.PPOTrainer(engine, args).generate_experience(batch)
    at = log.index(("generate", True))
    assert log[at - 1] == "eval" and log[at + 1] == "train" and log[at + 2] == ("forward", True), log


# 8. reinforce_pp whitens over every rank's tokens on the tensors' device (it asked for cuda:0).
def test_distributed_whitening_sums_on_the_tensors_device(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # no process group: the sums are this rank's alone
    x, mask = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1, 1, 0]])
    assert torch.allclose(ppo.masked_whiten(x, mask, distributed=True), ppo.masked_whiten(x, mask), atol=1e-6)


# 10. Prompts never end in EOS, in step 3 and in step 1's eval, whatever the tokenizer's post-processor adds.
def test_step_3_prompts_never_end_in_eos_with_a_closing_post_processor(tmp_path):
    from foreign_tokenizers import build_model_folder

    folder = build_model_folder("wordpiece", str(tmp_path))  # [CLS] ... [SEP], with [SEP] the EOS
    tok = models.load_tokenizer(folder)
    args = argparse.Namespace(actor=folder, max_prompt_seq_len=256, max_answer_seq_len=16, chat_template=False,
                              data_path=["builtin:sort"], split=[2, 4, 4], seed=1234)  # fmt: skip
    train, held_out = data.build_prompts(args, tok)
    assert not any(ids[-1] == tok.eos_token_id for ids in train["ids"] + held_out["ids"])


# 11. SentencePiece's leading space: a response is tokenised as it follows the prompt, never with a lone "▁".
def llama2_tokenizer():
    """Llama-2's fast tokenizer: a normalizer that prepends "▁" and turns spaces into "▁", BPE over whole words."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")  # training: word pieces
    tok.train_from_iterator(demo_lines(), trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_a_sentencepiece_response_has_no_lone_leading_space():
    tok, prompt = llama2_tokenizer(), data.format_prompt("sort: d b a c")
    assert tok.convert_ids_to_tokens(tok(" a b", add_special_tokens=False)["input_ids"])[0] == "▁"  # alone: lone "▁"
    (row,), _ = data.encode_row(tok, prompt, [" a b c d"], 64)
    p = data.encode_prompt(tok, prompt)
    assert tok.convert_ids_to_tokens(row["input_ids"][len(p) :]) == ["▁a", "▁b", "▁c", "▁d", "</s>"]
    assert row["input_ids"] == data.encode_prompt(tok, prompt + " a b c d") + [tok.eos_token_id]  # as in context


# 12. The end of a turn: with --chat_template, responses end (and generation stops) at the template's end-of-turn token.
def test_the_chat_templates_end_of_turn_ends_responses(tmp_path, capsys):
    folder = chatml_folder(str(tmp_path))
    assert models.load_tokenizer(folder).eos_token == "<|endoftext|>"
    tok = models.load_tokenizer(folder, chat_template=True)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    assert "responses end with '<|im_end|>'" in capsys.readouterr().out
    assert models.load_tokenizer(folder, eos_token="<|im_start|>").eos_token == "<|im_start|>"  # --eos_token wins
    prompt = data.render_messages([{"role": "user", "content": "sort: b a"}], tok)
    (row,), _ = data.encode_row(tok, prompt, ["a b"], 64)
    assert row["input_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
    out = str(tmp_path / "sft")
    run_stage(["sft.py", "--model_name_or_path", folder, "--chat_template", "--max_steps", "1", "--data_split",
               "8,1,1", "--eval_max_new_tokens", "4", "--output_dir", out])  # fmt: skip
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"  # steps 2 and 3 read it from step 1's folder


# 13. PPO-ptx text differs per rank; data caches are built by every node's first rank.
def test_ptx_draws_differ_per_rank_and_repeat_per_step(monkeypatch):
    draws = {}
    for r in ("0", "1"):
        monkeypatch.setenv("RANK", r)
        draws[r] = [
            torch.randint(1000, (8,), generator=common.rank_generator(1234, step)).tolist() for step in (5, 5, 6)
        ]
    assert draws["0"][0] == draws["0"][1] != draws["0"][2] and draws["0"] != draws["1"]


def test_the_first_rank_of_each_node_builds_the_data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "2")  # node 2 of 2 GPUs each, no shared filesystem: its local rank 0 must build it
    monkeypatch.setenv("LOCAL_RANK", "0")
    tok = models.load_tokenizer("tiny:gpt2")
    rows = {part: [data.make_row("q", " a")] * 3 for part in ("train", "eval")}
    encode = lambda r: data.encode_row(tok, r["prompt"], [r["response"]], 32)[0][0]
    assert len(data.build_cached("sft", rows, tok, str(tmp_path), encode, max_seq_len=32)["train"]) == 3


# 14. Real vocabularies: log-probs, entropy and KL are computed one row at a time in fp32, never a [B, T, V] fp32 copy.
MEMORY_DRIVER = """
import resource, torch, ppo
logits = torch.randn(16, 64, 50000, dtype=torch.bfloat16)  # 100 MB; a full fp32 log-softmax would add 400 MB
labels = torch.randint(50000, (16, 64))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ppo.logprobs_from_logits(logits, labels), ppo.entropy_from_logits(logits), ppo.kl_from_logits(logits, logits)
print("GROWTH_MB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_logprobs_of_a_real_vocabulary_never_hold_a_full_fp32_copy():
    # glibc's dynamic mmap threshold keeps freed 13 MB rows on the heap, unreturned, in some runs (peak RSS grew 40 MB
    # in one run, 320 MB in the next): a fixed threshold returns each freed row, so the peak is what was held at once
    env = dict(os.environ, PYTHONPATH=ROOT, MALLOC_MMAP_THRESHOLD_="1048576")
    proc = subprocess.run([sys.executable, "-c", MEMORY_DRIVER], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split("GROWTH_MB")[1]) < 120, proc.stdout


def test_row_by_row_equals_the_whole_batch():
    logits, ref, labels = torch.randn(3, 5, 11), torch.randn(3, 5, 11), torch.randint(11, (3, 5))
    logp, ref_logp = torch.log_softmax(logits / 0.7, -1), torch.log_softmax(ref / 0.7, -1)
    assert torch.allclose(ppo.logprobs_from_logits(logits, labels, 0.7), logp.gather(-1, labels[..., None])[..., 0])
    assert torch.allclose(ppo.entropy_from_logits(logits, 0.7), -(logp.exp() * logp).sum(-1))
    assert torch.allclose(ppo.kl_from_logits(logits, ref, 0.7), (logp.exp() * (logp - ref_logp)).sum(-1))


# 15. bf16 only where the GPU has it; eval sets count each row once on every number of ranks; prompts-only step 3.
def test_auto_dtype_is_fp16_on_a_gpu_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert common.check_dtype("auto") == "fp16"


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_batches_count_every_row_once_over_the_ranks(world, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    seen, calls = [], []
    for r in range(world):
        monkeypatch.setenv("RANK", str(r))
        batches = list(data.eval_batches(list(range(5)), 2, lambda rows: rows))
        calls.append(len(batches))
        seen += [x for batch, n in batches for x in batch[:n]]
    assert sorted(seen) == list(range(5)) and len(set(calls)) == 1  # every row once; every rank forwards alike


def test_step_3_runs_on_a_prompts_only_file(tmp_path):
    prompts, scorer = tmp_path / "prompts.jsonl", tmp_path / "r.py"
    prompts.write_text("".join(json.dumps({"prompt": f"sort: {c} a"}) + "\n" for c in "bcdefghijklmnop"))
    scorer.write_text("def score(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    proc = run_stage(["ppo.py", "--actor", "tiny:gpt2", "--reward_fn", f"{scorer}:score", "--data_path", str(prompts),
                      "--data_split", "0,0,1", "--per_device_generation_batch_size", "4",
                      "--per_device_training_batch_size", "4", "--max_answer_seq_len", "4", "--max_steps", "1",
                      "--output_dir", str(tmp_path / "ppo")])  # fmt: skip
    assert "step 1/1" in proc.stdout
