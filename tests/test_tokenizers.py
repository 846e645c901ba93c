"""Tokenizers that are not ours (tests/foreign_tokenizers.py): the prompt/response encoding keeps the conventions (no
EOS inside a prompt, EOS closing every response), the checker judges their decoded answers, and each passes
SFT -> reward -> PPO for a few steps."""

import json
import os

import pytest
import torch
from foreign_tokenizers import KINDS, build_model_folder, chatml_folder

import builtin
import data
import models
from conftest import DEMO, run_stage, write_sort_rows


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tokenizers"))
    return {kind: build_model_folder(kind, root) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_encoding_conventions_and_the_checker_hold(kind, folders):
    tok = models.load_tokenizer(folders[kind])
    assert tok.pad_token_id != tok.eos_token_id  # a distinct PAD is added where the tokenizer has none or shares EOS
    prompt = data.format_prompt("sort: d b a c")
    ids = data.encode_prompt(tok, prompt)
    assert ids[-1] != tok.eos_token_id  # BERT's post-processor closes every text with [SEP], here the EOS
    (pair,), _ = data.encode_row(tok, prompt, [" a b c d"], 512)
    labelled = [t for t, lab in zip(pair["input_ids"], pair["labels"]) if lab != data.IGNORE_INDEX]
    assert pair["input_ids"][: len(ids)] == ids and labelled[-1] == tok.eos_token_id
    for answer, right in ((" a b c d", True), (" a b d c", False)):  # as a stage decodes a generated answer
        generated = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
        text = data.decode_answer(tok, generated)
        assert builtin.sort_check(prompt, text) is right, (kind, text)


@pytest.mark.parametrize("kind", KINDS)
def test_sft_reward_ppo_run_with_a_foreign_tokenizer(kind, folders, tmp_path):
    sft, rm, ppo = (str(tmp_path / x) for x in ("sft", "rm", "ppo"))
    few = ["--learning_rate", "1e-3", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16"]
    run_stage(["sft.py", "--model_name_or_path", folders[kind], *few, "--max_steps", "6", "--eval_max_new_tokens",
               "8", "--output_dir", sft])  # fmt: skip
    m = json.load(open(os.path.join(sft, "metrics.json")))
    assert m["eval_perplexity"] < m["eval_perplexity_start"]
    run_stage(["reward.py", "--model_name_or_path", sft, *few, "--max_steps", "6", "--output_dir", rm])
    flags = [
        *DEMO["ppo.py"],
        "--per_device_generation_batch_size",
        "8",
        "--per_device_training_batch_size",
        "4",
        "--max_steps",
        "2",
    ]
    proc = run_stage(
        ["ppo.py", "--actor", sft, "--reward", rm, *flags, "--max_answer_seq_len", "8", "--output_dir", ppo]
    )
    assert "step 2/2" in proc.stdout
    rows = [json.loads(x) for x in open(os.path.join(ppo, "eval_generations.jsonl"))]
    assert rows and all(r["correct"] == builtin.sort_check(r["prompt"], r["response"]) for r in rows)


def test_a_chat_template_through_all_three_steps_and_chat(tmp_path):
    import chat

    folder, rows = chatml_folder(str(tmp_path)), write_sort_rows(str(tmp_path / "sort.jsonl"))
    sft, rm, ppo = (str(tmp_path / x) for x in ("sft", "rm", "ppo"))
    both = ["--chat_template", "--data_path", rows, "--data_split", "1,1,1", "--max_steps", "2"]
    run_stage(["sft.py", "--model_name_or_path", folder, *both, *DEMO["sft.py"], "--output_dir", sft])
    run_stage(["reward.py", "--model_name_or_path", sft, *both, *DEMO["reward.py"], "--output_dir", rm])
    sizes = ["--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4", "--max_answer_seq_len"]
    run_stage(["ppo.py", "--actor", sft, "--reward", rm, *both, *DEMO["ppo.py"], *sizes, "6", "--output_dir", ppo])
    for out in (sft, rm, ppo):
        assert json.load(open(os.path.join(out, "args.json")))["chat_template"] is True
    records = [json.loads(x) for x in open(os.path.join(ppo, "eval_generations.jsonl"))]
    assert records and all(r["prompt"].startswith("<|im_start|>user\nsort: ") for r in records)
    args = chat.parse_args(["--path", os.path.join(ppo, "actor"), "--max_new_tokens", "4"])
    talker = chat.Chatter(args.path, args, torch.device("cpu"))  # the format comes from the folder's args.json
    assert talker.chat is not None and talker.tokenizer.eos_token == "<|im_end|>"
    assert isinstance(talker.answer([{"role": "user", "content": "sort: b a"}])[0], str)
