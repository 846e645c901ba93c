"""chat.py: one-shot prompts, an interactive dialogue over stdin (history, clear, quit, EOF), side-by-side answers with
reward scores, the prompt format read from args.json, and its one-line errors."""

import json
import os
import subprocess
import sys

import chat
import data
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


def test_compare_puts_answers_side_by_side_with_reward_scores():
    proc = _chat(["--compare", "tiny:gpt2", "tiny:llama", "tiny:gpt2", "--reward", "tiny:gpt2", "--prompt",
                  "sort: b a", "--prompt", "sort: c a b", "--max_new_tokens", "4"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout[proc.stdout.index("prompt: ") :]  # (loading may log a line before)
    blocks = [b.splitlines() for b in out.strip().split("\n\n")]
    assert [b[0] for b in blocks] == ["prompt: sort: b a", "prompt: sort: c a b"]
    for block in blocks:
        rows = [line.split("->")[1] for line in block[1:]]
        assert len(rows) == 3 and all("score " in r for r in rows)
        assert rows[0] == rows[2]  # the same model answers and scores the same (greedy)


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
