"""Every --data_path source, read from a local copy laid out as its hub repository, through its adapter."""

import json
import os
import sys

import pytest

import builtin
import data
import models
import sources
from common import UserError
from conftest import ROOT, assert_one_line_error, run_stage
from hub_copies import COPIES, N, expected, write_copy, write_records

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
TEMPLATE += "{% if add_generation_prompt %}<assistant>{% endif %}"


def _triples(rows):
    return {(r["prompt"], r["chosen"], r["rejected"]) for part in ("train", "eval") for r in rows[part]}


@pytest.mark.parametrize("name", sorted(COPIES))
def test_local_copy_gives_the_exact_rows(name, tmp_path):
    folder = write_copy(name, str(tmp_path))
    assert sources.resolve_source(folder) == name
    rows = data.load_source(folder)
    assert rows["train"] and rows["eval"]
    assert _triples(rows) == expected(name)


def test_every_registered_source_has_a_local_copy_test():
    assert set(sources.SOURCES) - set(COPIES) == {"builtin:sort", "local/jsonfile", sources.FILE_SOURCE}


def test_prompt_template_is_the_single_turn_form_of_dialogues():
    assert data.format_prompt("hi") == data.render_prompt(data.dialogue("hi")) == "Human: hi\n\nAssistant:"
    two = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert data.dialogue(two) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert data.render_prompt(data.dialogue(two)) == two.lstrip()
    assert data.dialogue("Be brief. USER: x ASSISTANT:") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "x"},
    ]


@pytest.mark.parametrize("prompt", ["Question 3?", " Human: Question 3? Assistant:"])
def test_local_jsonfile_reads_the_working_directory(prompt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": prompt, "chosen": "Yes.", "rejected": "No."}] * 5
    for name in ("train", "eval"):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"{name}.json").write_text(json.dumps(rows))  # DeepSpeed-Chat's: one JSON list per file
    out = data.load_source("local/jsonfile")
    assert len(out["train"]) == len(out["eval"]) == 5
    assert _triples(out) == {("Human: Question 3?\n\nAssistant:", " Yes.", " No.")}


@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet", "jsonl.gz"])
def test_generic_file_with_prompt_response_or_pairs(ext, tmp_path):
    pairs = [{"prompt": f"Q{i}", "chosen": f"A{i}", "rejected": f"B{i}"} for i in range(20)]
    sft = [{"prompt": f"Q{i}", "response": f"A{i}"} for i in range(20)]
    for name, recs in (("pairs", pairs), ("sft", sft)):
        path = str(tmp_path / f"{name}.{ext}")
        write_records(path, recs)
        rows = data.load_source(path)
        assert (len(rows["train"]), len(rows["eval"])) == (18, 2)  # one file = a train split, divided 9:1
        want = {(f"Human: Q{i}\n\nAssistant:", f" A{i}", f" B{i}" if name == "pairs" else None) for i in range(20)}
        assert _triples(rows) == want


def test_train_only_source_is_divided_9_to_1_the_same_way_every_time(tmp_path):
    path = str(tmp_path / "x.jsonl")
    write_records(path, [{"prompt": f"Q{i}", "response": f"A{i}"} for i in range(50)])
    a, b = data.load_source(path), data.load_source(path)
    assert (len(a["train"]), len(a["eval"])) == (45, 5)
    assert a == b
    assert not {r["prompt"] for r in a["train"]} & {r["prompt"] for r in a["eval"]}


def test_blending_two_sources_adds_their_phase_rows(tmp_path):
    hh = write_copy("Anthropic/hh-rlhf", str(tmp_path))
    gptj = write_copy("Dahoas/synthetic-instruct-gptj-pairwise", str(tmp_path))
    split = [1, 1, 0]
    one = [data.phase_rows([p], split, 2, seed=3, need="pairs") for p in (hh, gptj)]
    both = data.phase_rows([hh, gptj], split, 2, seed=3, need="pairs")
    for part in ("train", "eval"):
        assert both[part] == one[0][part] + one[1][part]
        assert {r["prompt"] for r in one[0][part]} <= {r["prompt"] for r in both[part]}


def test_need_pairs_keeps_only_rows_with_a_rejected_response(tmp_path):
    miracl = write_copy("Cohere/miracl-zh-queries-22-12", str(tmp_path))
    rows = data.phase_rows([miracl], [1, 0, 0], 1, seed=1, need="pairs")
    assert len(rows["train"]) == N // 2 and all(r["rejected"] for r in rows["train"])
    sft_only = write_copy("wangrui6/Zhihu-KOL", str(tmp_path))
    with pytest.raises(UserError, match="Zhihu-KOL: its phase-1 train rows have no chosen/rejected pairs"):
        data.phase_rows([sft_only], [1, 0, 0], 1, seed=1, need="pairs")


def test_missing_column_and_empty_data_name_the_path(tmp_path):
    path = str(tmp_path / "bad.jsonl")
    write_records(path, [{"question": "Q", "chosen": "A"}] * 5)
    with pytest.raises(UserError, match=r"--data_path .*bad.jsonl: missing column\(s\) prompt"):
        data.load_source(path)
    write_records(path, [{"prompt": "  ", "response": "A"}] * 5)
    with pytest.raises(UserError, match=r"bad.jsonl: no usable train rows"):
        data.load_source(path)


def test_hub_name_offline_says_how_to_use_a_local_copy(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", True
    )  # as HF_HUB_OFFLINE=1 does, without the network wait
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        UserError,
        match="Hub is unreachable; download the dataset repository and pass its folder, e.g. /data/stanfordnlp/SHP",
    ):
        data.load_source("stanfordnlp/SHP")


def test_cache_rebuilds_when_a_file_or_the_eos_changes(tmp_path):
    tok = models.load_tokenizer("tiny:gpt2")
    path = str(tmp_path / "x.jsonl")
    cache = str(tmp_path / "cache")
    encode = lambda r: data.encode_row(tok, r["prompt"], [r["response"]], 64)[0][0]

    def build(tokenizer):
        rows = data.phase_rows([path], [1, 0, 0], 1, seed=1)
        data.build_cached("sft", rows, tokenizer, cache, encode, max_seq_len=64)
        return sorted(os.listdir(cache))

    write_records(path, [{"prompt": f"Q{i}", "response": f"A{i}"} for i in range(20)])
    first = build(tok)
    assert build(tok) == first and len(first) == 1  # same content: reused
    write_records(path, [{"prompt": f"Q{i}", "response": f"B{i}"} for i in range(20)])
    second = build(tok)
    assert len(second) == 2  # edited file: rebuilt
    tok.eos_token = "<|pad|>"
    assert len(build(tok)) == 3  # other EOS: rebuilt


def test_chat_template_renders_all_turns_and_strips_response_space():
    tok = models.load_tokenizer("tiny:gpt2")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    row = data.make_row("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", " d", " e")
    (out,) = data.apply_chat_template([row], tok)
    assert out["prompt"] == "<user>a\n<assistant>b\n<user>c\n<assistant>"
    assert (out["chosen"], out["rejected"], out["response"]) == ("d", "e", "d")
    assert builtin.sort_check(
        data.apply_chat_template([data.make_row("sort: c a b", "a b c")], tok)[0]["prompt"], "a b c"
    )


def test_phase_rows_render_with_the_chat_template_when_asked(tmp_path):
    tok = models.load_tokenizer("tiny:gpt2")
    tok.chat_template = TEMPLATE
    path = str(tmp_path / "x.jsonl")
    write_records(path, [{"prompt": "Q", "response": "A"}] * 10)
    assert {r["prompt"] for r in data.phase_rows([path], [1, 0, 0], 1, seed=1)["train"]} == {"Human: Q\n\nAssistant:"}
    assert {r["prompt"] for r in data.phase_rows([path], [1, 0, 0], 1, seed=1, chat_tokenizer=tok)["train"]} == {
        "<user>Q<assistant>"
    }


def test_chat_template_flag_without_a_template_is_refused(tmp_path):
    proc = run_stage(
        ["sft.py", "--model_name_or_path", "tiny:gpt2", "--chat_template", "--output_dir", str(tmp_path / "o")],
        check=False,
    )
    assert_one_line_error(proc, "--chat_template", "has no chat template")


def test_sft_trains_two_steps_on_every_source(tmp_path):
    """`sft.py --data_path <local copy> --max_steps 2` for every source, in one process to keep it fast."""
    folders = [write_copy(name, str(tmp_path / "hub")) for name in sorted(COPIES)]
    (tmp_path / "data").mkdir()
    for name in ("train", "eval"):
        (tmp_path / "data" / f"{name}.json").write_text(
            json.dumps([{"prompt": f"Q{i}", "chosen": "A", "rejected": "B"} for i in range(10)])
        )
    script = (
        "import json, os, sys, sft\n"
        "for i, path in enumerate(sys.argv[1:]):\n"
        "    out = f'out{i}'\n"
        "    sft.main(['--model_name_or_path', 'tiny:gpt2', '--data_path', path, '--data_split', '1,0,0',\n"
        "              '--learning_rate', '1e-3',\n"
        "              '--max_steps', '2',\n"
        "              '--per_device_train_batch_size', '2', '--eval_max_new_tokens', '4', '--output_dir', out])\n"
        "    m = json.load(open(os.path.join(out, 'metrics.json')))\n"
        "    print('TRAINED', path, m['eval_perplexity'] < m['eval_perplexity_start'])\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", script, *folders, "local/jsonfile"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("TRAINED")]
    assert trained == [
        [p, "True"] for p in folders + ["local/jsonfile"]
    ]  # each loaded, trained, and its eval perplexity fell


def test_chat_template_is_used_and_must_agree_across_steps(tmp_path):
    import shutil

    model = str(tmp_path / "chat-model")
    shutil.copytree(builtin.tiny_model_path("gpt2"), model)
    tok = models.load_tokenizer(model)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model)
    sft_out = str(tmp_path / "sft")
    proc = run_stage(
        [
            "sft.py",
            "--model_name_or_path",
            model,
            "--chat_template",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--eval_max_new_tokens",
            "4",
            "--output_dir",
            sft_out,
        ]
    )
    assert "eval end" in proc.stdout
    samples = json.load(open(os.path.join(sft_out, "args.json")))
    assert samples["chat_template"] is True
    proc = run_stage(["reward.py", "--model_name_or_path", sft_out, "--output_dir", str(tmp_path / "rm")], check=False)
    assert_one_line_error(proc, "--chat_template: --model_name_or_path", "was trained with it")
    proc = run_stage(
        ["ppo.py", "--actor", sft_out, "--reward", sft_out, "--output_dir", str(tmp_path / "ppo")], check=False
    )
    assert_one_line_error(proc, "--chat_template: --actor", "was trained with it")


def test_a_folder_of_split_named_files_keeps_its_own_held_out_rows(tmp_path):
    folder = tmp_path / "reviews"
    folder.mkdir()
    write_records(str(folder / "train.jsonl"), [{"prompt": f"Q{i}", "response": f"A{i}"} for i in range(8)])
    write_records(str(folder / "test.jsonl"), [{"prompt": f"held-out {i}", "response": "B"} for i in range(3)])
    assert sources.resolve_source(str(folder)) == sources.FILE_SOURCE
    rows = data.load_source(str(folder))
    assert len(rows["train"]) == 8 and {r["prompt"] for r in rows["eval"]} == {
        f"Human: held-out {i}\n\nAssistant:" for i in range(3)
    }  # the test file is the eval split, never divided 9:1 from the train file
