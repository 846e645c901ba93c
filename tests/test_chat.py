"""chat.py: one-shot prompts, an interactive dialogue over stdin (history, clear, quit, EOF), side-by-side answers with
reward scores, the prompt format read from args.json, and its one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

import chat
import data
import models
from conftest import ROOT, assert_one_line_error, run_stage


def _chat(args, stdin=""):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.join(ROOT, "chat.py"), *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, timeout=300)


def test_prompts_are_answered_without_a_terminal(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("sort: c a b\n\nsort: e d\n")
    proc = _chat(
        ["--path", "tiny:gpt2", "--prompt", "sort: b a", "--prompts_file", str(prompts), "--max_new_tokens", "4"]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    humans = [x for x in proc.stdout.splitlines() if x.startswith("Human: ")]
    assert humans == ["Human: sort: b a", "Human: sort: c a b", "Human: sort: e d"]
    assert sum(x.startswith("Assistant:") for x in proc.stdout.splitlines()) == 3


def test_interactive_dialogue_over_stdin_clears_and_quits():
    proc = _chat(
        ["--path", "tiny:gpt2", "--max_new_tokens", "4"], "sort: b a\nsort: c b\nclear\nsort: d c\nquit\nsort: x\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sum(x.startswith("Assistant:") for x in proc.stdout.splitlines()) == 3
    assert "(history cleared)" in proc.stdout
    assert "sort: x" not in proc.stdout  # nothing after quit
    eof = _chat(["--path", "tiny:gpt2", "--max_new_tokens", "4"], "sort: b a\n")  # Ctrl-D ends as well
    assert eof.returncode == 0 and sum(x.startswith("Assistant:") for x in eof.stdout.splitlines()) == 1


def test_each_turn_sees_the_whole_dialogue_in_the_training_format():
    seen = []

    class Stub:
        def answer(self, messages):
            seen.append(data.render_messages(messages))
            return f"answer {len(seen)}", []

    chat.talk(Stub(), ["sort: b a", "sort: c b", "clear", "sort: d c", "quit", "sort: never"])
    assert seen == [
        "Human: sort: b a\n\nAssistant:",
        "Human: sort: b a\n\nAssistant: answer 1\n\nHuman: sort: c b\n\nAssistant:",
        "Human: sort: d c\n\nAssistant:",
    ]


def test_compare_puts_answers_side_by_side_with_reward_scores(tmp_path):
    rm, tok = str(tmp_path / "rm"), models.load_tokenizer("tiny:gpt2")
    models.save_reward_model(models.load_reward_model("tiny:gpt2", tok)[0], tok, rm, {})  # one v_head for all
    proc = _chat(["--compare", "tiny:gpt2", "tiny:llama", "tiny:gpt2", "--reward", rm, "--prompt", "sort: b a",
                  "--prompt", "sort: c a b", "--max_new_tokens", "4"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout[proc.stdout.index("prompt: ") :]  # (loading may log a line before)
    blocks = [b.splitlines() for b in out.strip().split("\n\n")]
    assert [b[0] for b in blocks] == ["prompt: sort: b a", "prompt: sort: c a b"]
    args = chat.parse_args(["--compare", "tiny:gpt2", "tiny:llama", "--reward", rm, "--max_new_tokens", "4"])
    scorer, cpu = chat.Scorer(rm, args, torch.device("cpu")), torch.device("cpu")
    chatters = [chat.Chatter(path, args, cpu) for path in ("tiny:gpt2", "tiny:llama")]
    for block, prompt in zip(blocks, ("sort: b a", "sort: c a b")):
        rows = [line.split("->")[1] for line in block[1:]]
        assert len(rows) == 3 and rows[0] == rows[2]  # the same model answers and scores the same (greedy)
        for row, model in zip(rows, chatters):  # each score is the reward model's, of that answer, here recomputed
            messages = [{"role": "user", "content": prompt}]
            text, ended = model.answer(messages)
            assert row.strip() == f"{text!r}   score {scorer(messages, text, ended).item():+.3f}"


def test_prompt_format_comes_from_args_json(tmp_path):
    assert not chat.uses_chat_template(str(tmp_path), forced=False)
    (tmp_path / "args.json").write_text(json.dumps({"chat_template": True}))
    assert chat.uses_chat_template(str(tmp_path), forced=False)


def test_bad_input_is_one_line(tmp_path):
    assert_one_line_error(run_stage(["chat.py"], check=False), "--path or --compare: give exactly one")
    proc = run_stage(["chat.py", "--path", "tiny:gpt2", "--prompts_file", str(tmp_path / "none.txt")], check=False)
    assert_one_line_error(proc, "--prompts_file", "no such file")
    proc = run_stage(["chat.py", "--path", "tiny:gpt2", "--chat_template", "--prompt", "hi"], check=False)
    assert_one_line_error(proc, "--chat_template: the tokenizer of", "has no chat template")


def test_scores_are_read_at_the_eos_with_the_reward_models_own_tokenizer(tmp_path, capsys):
    from foreign_tokenizers import build_model_folder

    folder, out = build_model_folder("sentencepiece", str(tmp_path)), str(tmp_path / "rm")  # not the byte tokenizer
    tok = models.load_tokenizer(folder)
    model, _ = models.load_reward_model(folder, tok)
    torch.nn.init.normal_(model.v_head.weight)
    models.save_reward_model(model, tok, out, {})
    args = chat.parse_args(["--compare", "tiny:gpt2", "--reward", out, "--prompt", "sort: b a"])

    class Stub:  # an answering model with the byte tokenizer, whose answer ended with its EOS, then one that did not
        path, ended = "stub", [True, False]

        def answer(self, messages):
            return "a b", self.ended.pop(0)

    stub = Stub()
    chat.compare([stub, stub], ["sort: b a"], chat.Scorer(out, args, torch.device("cpu")))
    printed = [float(x.split("score ")[1]) for x in capsys.readouterr().out.splitlines() if "score " in x]
    ids = tok(data.format_prompt("sort: b a") + " a b")["input_ids"]
    with torch.no_grad():
        score = lambda ids: model.eval().score(torch.tensor([ids]), torch.ones(1, len(ids))).item()
        assert printed == pytest.approx([score(ids + [tok.eos_token_id]), score(ids)], abs=1e-3)  # as step 3 reads it
