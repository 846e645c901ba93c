"""Run the whole pipeline (train.py: steps 1-3) for several seeds and torch thread counts and print one row per
run plus mean / min / max: what a new user on another machine can expect, not one lucky run.

    python scripts/sweep.py --seeds 1 2 3 4 5 --threads 1 2               # the README table (10 runs)
    python scripts/sweep.py --seeds 1234 --threads 1 2                    # the default seed, 1 and 2 threads
    python scripts/sweep.py --seeds 1 2 --task reverse                    # a list task given as three local JSONL files
    python scripts/sweep.py --seeds 1 -- --step3-args "--kl_coef 0.2"     # anything after -- goes to train.py
    python scripts/sweep.py --task grid --seeds 1 2 --threads 1 --jobs 2 --steps 1   # step 1 over list_tasks.GRID

The thread count (OMP_NUM_THREADS for each stage) changes the order of float summations the way another CPU does,
so it stands in for "another machine". Runs go --jobs at a time (jobs x threads <= cores, or they slow each other
several times), each into <--output-dir>/<task>/seed<S>_threads<T>; a finished run is read back, not redone (delete
its folder to redo it), so an interrupted sweep resumes where it stopped. --steps 1 runs step 1 alone and scores its
greedy answers to step 3's held-out prompts itself (SFT, clean; loss = step 1's last logged training loss).

Columns: RM = step 2's pairwise accuracy on its held-out pairs; SFT / RLHF = greedy ground-truth accuracy on
held-out phase-3 prompts before / after step 3 (checked by the task's checker, never by the reward model);
clean = SFT accuracy on the lists where the demonstrator makes no systematic error; hacked = wrong RLHF answers the
reward model scores above the correct one; KL = exact KL to the SFT policy summed over the response; s1-s3 = seconds
per stage.
"""

import argparse
import concurrent.futures
import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
list_tasks = __import__("list_tasks")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="train.py --seed values")
    p.add_argument("--threads", nargs="+", type=int, default=[2], help="torch intra-op thread counts (OMP_NUM_THREADS)")
    p.add_argument(
        "--task",
        nargs="+",
        default=["builtin"],
        help="builtin (builtin:sort), list tasks of scripts/list_tasks.py as JSONL files (reverse@letters=16), or grid",
    )
    p.add_argument("--steps", type=int, default=3, choices=[1, 3], help="3: the whole pipeline; 1: step 1 alone")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each with --threads threads)")
    p.add_argument("--output-dir", default="sweep", help="one folder per run below this")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    args.task = [t for task in args.task for t in (list_tasks.GRID if task == "grid" else [task])]
    for task in (t for t in args.task if t != "builtin"):
        try:
            list_tasks.parse_spec(task)
        except ValueError as e:
            p.error(f"--task {e}")
    return args


def task_setup(args, spec):
    """{flags: train.py's, check, systematic, eval_prompts: (paths, split) of step 3's} for a --task: builtin:sort, or
    three JSONL files written once."""
    import builtin

    if spec == "builtin":
        return {"flags": [], "check": builtin.sort_check, "systematic": builtin.sort_systematic,
                "eval_prompts": (["builtin:sort"], [2, 4, 4])}  # fmt: skip
    folder = os.path.join(args.output_dir, "data", spec)
    files = list_tasks.write_task(spec, folder)
    flags = [
        "--step1-args",
        f"--data_path {files['demos']} --data_split 10,0,0",
        "--step2-args",
        f"--data_path {files['pairs']} --data_split 0,10,0",
        "--step3-args",
        f"--data_path {files['prompts']} --data_split 0,0,10",
    ]
    task = list_tasks.ListTask(spec)
    return {"flags": flags, "check": task.check, "systematic": task.systematic,
            "eval_prompts": ([files["prompts"]], [0, 0, 10])}  # fmt: skip


def merge_step_args(flags, extra):
    """train.py takes one --stepN-args string per step: join the task's and the user's."""
    merged, rest, i = {}, [], 0
    for seq in (flags, extra):
        i = 0
        while i < len(seq):
            if seq[i].startswith("--step") and seq[i].endswith("-args") and i + 1 < len(seq):
                merged[seq[i]] = (merged.get(seq[i], "") + " " + seq[i + 1]).strip()
                i += 2
            else:
                rest.append(seq[i])
                i += 1
    return rest + [x for k, v in merged.items() for x in (k, v)]


def read_jsonl(path):
    return [json.loads(line) for line in open(path)] if os.path.isfile(path) else []


def summarise(folder, setup):
    """One row of figures from a finished run's folder (None when it has not finished)."""
    checker, systematic = setup["check"], setup["systematic"]
    step = {i: os.path.join(folder, name) for i, name in ((1, "step1_sft"), (2, "step2_reward"), (3, "step3_ppo"))}
    if not os.path.isfile(os.path.join(step[3], "metrics.json")):
        return None
    m2, m3 = (json.load(open(os.path.join(step[i], "metrics.json"))) for i in (2, 3))
    before, after = (
        read_jsonl(os.path.join(step[3], f)) for f in ("eval_generations_start.jsonl", "eval_generations.jsonl")
    )
    right = lambda rows: [checker(r["prompt"], r["response"]) for r in rows]
    sft, rlhf = right(before), right(after)
    clean = [ok for r, ok in zip(before, sft) if not systematic(r["prompt"])]
    times = (
        json.load(open(os.path.join(folder, "seconds.json")))
        if os.path.isfile(os.path.join(folder, "seconds.json"))
        else {}
    )
    row = {
        "rm": m2["eval_accuracy"],
        "sft": sum(sft) / len(sft),
        "rlhf": sum(rlhf) / len(rlhf),
        "clean": sum(clean) / max(len(clean), 1),
        "kl": m3["eval_kl"],
        "eos": m3["eval_eos_rate"],
        "hacked": sum(not ok and r["score"] > r["reference_score"] for r, ok in zip(after, rlhf)) / len(after)
        if all("reference_score" in r for r in after)
        else None,  # step 3 scores the reference answer only for data with a checker (not local JSONL files)
        "s1": times.get("1"),
        "s2": times.get("2"),
        "s3": times.get("3"),
    }
    row["gain"] = 100 * (row["rlhf"] - row["sft"])
    return row


COLUMNS = [
    ("rm", "RM acc", "{:.3f}"),
    ("sft", "SFT", "{:.1%}"),
    ("rlhf", "RLHF", "{:.1%}"),
    ("gain", "gain", "{:+.1f}"),
    ("clean", "SFT clean", "{:.1%}"),
    ("hacked", "hacked", "{:.1%}"),
    ("kl", "KL", "{:.2f}"),
    ("eos", "EOS", "{:.2f}"),
    ("s1", "s1", "{:.0f}"),
    ("s2", "s2", "{:.0f}"),
    ("s3", "s3", "{:.0f}"),
]


def table(rows, columns=COLUMNS):
    """Markdown table: one row per run, then mean / min / max of every column."""
    fmt = lambda key, f, v: "n/a" if v is None else f.format(v)
    lines = ["| run | " + " | ".join(c[1] for c in columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(fmt(k, f, r[k]) for k, _, f in columns) + " |")
    for label, agg in (("mean", statistics.mean), ("min", min), ("max", max)):
        vals = [
            agg([r[k] for _, r in rows if r[k] is not None]) if any(r[k] is not None for _, r in rows) else None
            for k, _, _ in columns
        ]
        lines.append(f"| **{label}** | " + " | ".join(fmt(k, f, v) for (k, _, f), v in zip(columns, vals)) + " |")
    return "\n".join(lines)


def step1_summary(folder, setup, threads):
    """Step 1's row of a finished --steps 1 run (None when unfinished): its greedy answers to the held-out prompts that
    step 3 evaluates on, scored by the task's checker; kept in step1_scores.json."""
    import torch

    import common
    import data
    import models
    import sft

    sft_dir, cached = os.path.join(folder, "step1_sft"), os.path.join(folder, "step1_scores.json")
    if not os.path.isfile(os.path.join(sft_dir, "metrics.json")):
        return None
    if not os.path.isfile(cached):
        torch.set_num_threads(threads)
        tokenizer = models.load_tokenizer(sft_dir)
        model = models.load_model(sft_dir, tokenizer).eval()
        seed = json.load(open(os.path.join(sft_dir, "args.json")))["seed"]
        prompts = [r["prompt"] for r in data.phase_rows(*setup["eval_prompts"], 3, seed, need="prompt")["eval"]]
        ids = [data.encode_prompt(tokenizer, p) for p in prompts]
        answers = sft.greedy_generate(model, tokenizer, ids, 64, 32, "cpu", False)
        right = [setup["check"](p, answers[i]) for i, p in enumerate(prompts)]
        clean = [ok for p, ok in zip(prompts, right) if not setup["systematic"](p)]
        log = csv.DictReader(open(os.path.join(sft_dir, "log.csv")))
        losses = [float(r["value"]) for r in log if r["name"] == "loss"]
        metrics = json.load(open(os.path.join(sft_dir, "metrics.json")))
        row = {"sft": sum(right) / len(right), "clean": sum(clean) / max(len(clean), 1), "n_clean": len(clean),
               "loss": losses[-1], "ppl": metrics["eval_perplexity"], "s1": metrics["train_seconds"]}  # fmt: skip
        common.write_json(cached, row)  # whole or not at all: a resumed sweep never reads half a file
    return json.load(open(cached))


COLUMNS_STEP1 = [
    ("sft", "SFT", "{:.1%}"),
    ("clean", "SFT clean", "{:.1%}"),
    ("n_clean", "clean n", "{:.0f}"),
    ("loss", "loss", "{:.3f}"),
    ("ppl", "eval ppl", "{:.3f}"),
    ("s1", "s1", "{:.0f}"),
]


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    columns = COLUMNS if args.steps == 3 else COLUMNS_STEP1
    setups = {task: task_setup(args, task) for task in args.task}
    runs = [(task, seed, threads) for task in args.task for seed in args.seeds for threads in args.threads]
    where = lambda task, seed, threads: os.path.join(
        args.output_dir, *([] if task == "builtin" else [task]), f"seed{seed}_threads{threads}"
    )

    def result(task, seed, threads):  # the run's row, running it first unless it has finished
        folder, setup = where(task, seed, threads), setups[task]

        def score():
            with scoring:
                return summarise(folder, setup) if args.steps == 3 else step1_summary(folder, setup, threads)

        if score() is None:
            steps = [] if args.steps == 3 else ["--step", "1"]
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--seed", str(seed), "--output-dir", folder, *steps]
            cmd += merge_step_args(setup["flags"], args.extra)
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            print(f"[sweep] {folder}: {' '.join(cmd)}", flush=True)
            t0 = time.time()
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "sweep.log"), "w") as log:
                code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            if code != 0:
                raise SystemExit(f"[sweep] {folder} failed (exit {code}); see {os.path.join(folder, 'sweep.log')}")
            print(f"[sweep] {folder} done in {time.time() - t0:.0f}s", flush=True)
        row = score()
        print(table([(folder, row)], columns).splitlines()[2], flush=True)
        return row

    scoring = threading.Lock()  # one run is scored at a time: threads importing transformers at once can deadlock
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda run: result(*run), runs))
    for task in args.task:
        mine = [(f"seed{s}_threads{t}", row) for (k, s, t), row in zip(runs, rows) if k == task]
        out = table(mine, columns)
        print(f"\n{task}\n{out}")
        with open(os.path.join(args.output_dir, f"table_{task}.md"), "w") as f:
            f.write(out + "\n")
    if len(args.task) > 1:
        out = grid_table(args.task, runs, rows, columns)
        print(f"\nworst run of each task (min; max for loss and KL)\n{out}")
        with open(os.path.join(args.output_dir, "table_grid.md"), "w") as f:
            f.write(out + "\n")


def grid_table(tasks, runs, rows, columns):
    """One row per task: each column's worst value over its runs (the lowest, the highest loss / KL / seconds)."""
    worst = lambda key, values: max(values) if key in ("loss", "ppl", "kl", "s1", "s2", "s3") else min(values)
    lines = ["| task | " + " | ".join(c[1] for c in columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for task in tasks:
        mine = [row for (k, _, _), row in zip(runs, rows) if k == task]
        cells = []
        for key, _, f in columns:
            values = [r[key] for r in mine if r[key] is not None]
            cells.append(f.format(worst(key, values)) if values else "n/a")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
