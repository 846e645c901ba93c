"""scripts/list_tasks.py (a user's own list task as three JSONL files, and its variations) and the step-1 scoring of
scripts/sweep.py --steps 1, the grid of issue 27."""

import json
import os
import shutil
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
list_tasks, sweep = __import__("list_tasks"), __import__("sweep")


@pytest.mark.parametrize(
    "spec, prompt, answer, demo_error",
    [  # by hand: items c a d e b (5 items: a long list, where the demonstrator errs)
        ("sort", "sort: c a d e b", "a b c d e", "a b c e d"),  # last two swapped
        ("reverse", "reverse: c a d e b", "b e d a c", "b e d c a"),  # last two swapped
        ("rotate", "rotate: c a d e b", "a d e b c", "a d b e c"),  # the two before the moved item swapped
        ("shift", "shift: c a d e b", "d b e f c", "d b e f b"),  # the last item left unshifted
        ("rsort", "rsort: c a d e b", "e d c b a", "e d c b"),  # the last item dropped
        ("shift@letters=16", "shift: p a o", "a b p", None),  # the alphabet wraps at its 16th letter
    ],
)
def test_each_task_answers_and_its_demonstrator_errs_in_its_own_shape(spec, prompt, answer, demo_error):
    task = list_tasks.ListTask(spec)
    items = prompt.split(": ")[1].split()
    assert " ".join(task.task.answer(items, task.alphabet)) == answer
    assert task.check("Human: " + prompt + " Assistant:", " " + answer) and not task.check(prompt, answer[::-1] + " z")
    if demo_error:
        assert " ".join(task.task.demo_error(items, answer.split())) == demo_error
        assert task.systematic(prompt) and not task.systematic(prompt.rsplit(" ", 2)[0])


def test_a_variation_keeps_its_alphabet_lengths_and_sizes_with_disjoint_prompts():
    spec = "rsort@letters=10,min=4,max=7,demos=3000"
    files, task = list_tasks.rows(spec), list_tasks.ListTask(spec)
    assert [len(files[k]) for k in ("demos", "pairs", "prompts")] == [3000, 12000, 12000]
    prompts = [r["prompt"] for part in files.values() for r in part]
    assert len(set(prompts)) == len(prompts)
    items = [p.split(": ")[1].split() for p in prompts]
    assert set().union(*items) == set("abcdefghij") and {len(i) for i in items} == {4, 5, 6, 7}
    long = [r for r in files["demos"] if task.systematic(r["prompt"])]
    dropped = sum(len(r["response"].split()) == len(r["prompt"].split()) - 2 for r in long) / len(long)
    assert abs(dropped - list_tasks.P_SYSTEMATIC) < 0.04  # the demonstrator's omission, on long lists only
    short = [r for r in files["demos"] if not task.systematic(r["prompt"])]
    assert all(len(r["response"].split()) == len(r["prompt"].split()) - 1 for r in short)
    assert all(
        task.check(r["prompt"], r["chosen"]) and not task.check(r["prompt"], r["rejected"]) for r in files["pairs"]
    )


@pytest.mark.parametrize("name", ["sort", "reverse", "rotate", "shift", "rsort"])
def test_the_pairs_show_the_reward_model_the_demonstrators_own_error(name):
    """Step 3 fixes only what step 2 was shown: with rotate's pairs rejecting "last two swapped" (sort's error) rather
    than rotate's own, step 3 gained +0.0 and +6.8 points (seeds 1 and 2)."""
    task = list_tasks.ListTask(name)
    pairs = list_tasks.rows(name)["pairs"]
    own = sum(
        r["rejected"].split() == task.task.demo_error(items, r["chosen"].split())
        for r in pairs
        for items in [list_tasks._items(name, r["prompt"])]
    )
    assert 0.27 < own / len(pairs) < 0.36  # 30% by construction, plus the random kinds that happen to coincide


def test_the_default_files_are_the_ones_the_readme_reverse_table_was_measured_on():
    first = list_tasks.rows("reverse")["demos"][0]
    assert first == {"prompt": "reverse: y n b i q p", "response": "p q i b y n"}  # the code before variations wrote it


@pytest.mark.parametrize(
    "spec, message",
    [
        ("unscramble", "unknown list task 'unscramble' (known: sort, reverse, rotate, shift, rsort)"),
        ("reverse@size=3", "bad setting 'size=3'"),
        ("reverse@letters=8", "only 28896 distinct lists for 30000 rows"),
        ("reverse@min=5,max=4", "needs 2 <= letters <= 26 and 3 <= min <= max <= letters"),
    ],
)
def test_a_bad_variation_is_refused_with_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        list_tasks.parse_spec(spec)
    with pytest.raises(SystemExit):
        sweep.parse_args(["--task", spec])


def test_the_grid_preset_expands_and_every_variation_is_valid():
    args = sweep.parse_args(["--task", "builtin", "grid", "--steps", "1"])
    assert args.task == ["builtin", *list_tasks.GRID] and len(list_tasks.GRID) >= 10
    assert {spec.partition("@")[0] for spec in list_tasks.GRID} == set(list_tasks.TASKS)


def test_step1_scoring_counts_right_answers_and_clean_lists(tmp_path, monkeypatch):
    """--steps 1 scores the step-1 model's greedy answers to step 3's held-out prompts by the task's checker; here the
    "model" answers right exactly on the short (clean) lists."""
    import builtin
    import sft

    args = sweep.parse_args(["--task", "reverse", "--output-dir", str(tmp_path)])
    setup = sweep.task_setup(args, "reverse")
    folder = tmp_path / "run"
    shutil.copytree(builtin.tiny_model_path("gpt2"), folder / "step1_sft")
    (folder / "step1_sft" / "args.json").write_text(json.dumps({"seed": 1}))
    (folder / "step1_sft" / "metrics.json").write_text(json.dumps({"eval_perplexity": 1.5, "train_seconds": 9.0}))
    (folder / "step1_sft" / "log.csv").write_text("step,name,value\n1,loss,0.9\n2,loss,0.4\n")
    task = list_tasks.ListTask("reverse")

    def fake_generate(model, tokenizer, prompts, *rest):
        texts = [tokenizer.decode(p) for p in prompts]
        items = [list_tasks._items("reverse", t) for t in texts]
        return {i: " ".join(x[::-1]) if not task.systematic(t) else "a" for i, (t, x) in enumerate(zip(texts, items))}

    monkeypatch.setattr(sft, "greedy_generate", fake_generate)
    row = sweep.step1_summary(str(folder), setup, 1)
    held_out = [json.loads(line)["prompt"] for line in open(setup["eval_prompts"][0][0])]
    long_share = sum(map(task.systematic, held_out)) / len(held_out)
    assert row["clean"] == 1.0 and row["sft"] == row["n_clean"] / 1200  # step 3's eval split: a tenth of 12,000
    assert abs(row["sft"] - (1 - long_share)) < 0.05 and (row["loss"], row["ppl"], row["s1"]) == (0.4, 1.5, 9.0)
    assert json.load(open(folder / "step1_scores.json")) == row  # kept: a resumed sweep reads it back


def test_the_grid_table_keeps_each_tasks_worst_run():
    runs = [("reverse", 1, 1), ("reverse", 2, 1), ("rotate", 1, 1)]
    row = lambda sft, clean, loss: {"sft": sft, "clean": clean, "n_clean": 9, "loss": loss, "ppl": 1.5, "s1": 10}
    rows = [row(0.5, 0.99, 0.1), row(0.6, 0.9, 0.3), row(0.1, 0.2, 0.8)]
    lines = sweep.grid_table(["reverse", "rotate"], runs, rows, sweep.COLUMNS_STEP1).splitlines()
    assert lines[2] == "| reverse | 50.0% | 90.0% | 9 | 0.300 | 1.500 | 10 |"  # lowest accuracies, highest loss
    assert lines[3] == "| rotate | 10.0% | 20.0% | 9 | 0.800 | 1.500 | 10 |"
