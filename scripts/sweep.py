"""Run the whole pipeline (train.py: steps 1-3) for several seeds and torch thread counts and print one row per
run plus mean / min / max: what a new user on another machine can expect, not one lucky run.

    python scripts/sweep.py --seeds 1 2 3 4 5 --threads 1 2               # the README table (10 runs)
    python scripts/sweep.py --seeds 1234 --threads 1 2                    # the default seed, 1 and 2 threads
    python scripts/sweep.py --seeds 1 2 --task reverse                    # a list task given as three local JSONL files
    python scripts/sweep.py --seeds 1 -- --step3-args "--kl_coef 0.2"     # anything after -- goes to train.py

The thread count (OMP_NUM_THREADS for each stage) changes the order of float summations the way another CPU does,
so it stands in for "another machine". Runs go in sequence, each into <--output-dir>/seed<S>_threads<T>; a finished
run is read back, not redone (delete its folder to redo it), so an interrupted sweep resumes where it stopped.

Columns: RM = step 2's pairwise accuracy on its held-out pairs; SFT / RLHF = greedy ground-truth accuracy on
held-out phase-3 prompts before / after step 3 (checked by the task's checker, never by the reward model);
clean = SFT accuracy on the lists where the demonstrator makes no systematic error; hacked = wrong RLHF answers the
reward model scores above the correct one; KL = exact KL to the SFT policy summed over the response; s1-s3 = seconds
per stage.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="train.py --seed values")
    p.add_argument("--threads", nargs="+", type=int, default=[2], help="torch intra-op thread counts (OMP_NUM_THREADS)")
    p.add_argument(
        "--task",
        default="sort",
        help="sort (builtin:sort) or a list task of scripts/list_tasks.py given as JSONL files",
    )
    p.add_argument("--output-dir", default="sweep", help="one folder per run below this")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    return args


def task_setup(args):
    """(train.py flags, checker, systematic) for --task: builtin:sort, or three JSONL files written once."""
    import builtin

    if args.task == "sort":
        return [], builtin.sort_check, lambda prompt: builtin.sort_systematic(prompt)
    import list_tasks

    folder = os.path.join(args.output_dir, f"data_{args.task}")
    files = list_tasks.write_task(args.task, folder)
    flags = [
        "--step1-args",
        f"--data_path {files['demos']} --data_split 10,0,0",
        "--step2-args",
        f"--data_path {files['pairs']} --data_split 0,10,0",
        "--step3-args",
        f"--data_path {files['prompts']} --data_split 0,0,10",
    ]
    task = list_tasks.TASKS[args.task]
    return flags, task.check, task.systematic


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


def summarise(folder, checker, systematic):
    """One row of figures from a finished run's folder (None when it has not finished)."""
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


def table(rows):
    """Markdown table: one row per run, then mean / min / max of every column."""
    fmt = lambda key, f, v: "n/a" if v is None else f.format(v)
    lines = ["| run | " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 1)]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(fmt(k, f, r[k]) for k, _, f in COLUMNS) + " |")
    for label, agg in (("mean", statistics.mean), ("min", min), ("max", max)):
        vals = [
            agg([r[k] for _, r in rows if r[k] is not None]) if any(r[k] is not None for _, r in rows) else None
            for k, _, _ in COLUMNS
        ]
        lines.append(f"| **{label}** | " + " | ".join(fmt(k, f, v) for (k, _, f), v in zip(COLUMNS, vals)) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    os.makedirs(args.output_dir, exist_ok=True)
    flags, checker, systematic = task_setup(args)
    rows = []
    for seed in args.seeds:
        for threads in args.threads:
            name = f"seed{seed}_threads{threads}"
            folder = os.path.join(args.output_dir, name)
            row = summarise(folder, checker, systematic)
            if row is None:
                cmd = [
                    sys.executable,
                    os.path.join(ROOT, "train.py"),
                    "--seed",
                    str(seed),
                    "--output-dir",
                    folder,
                    *merge_step_args(flags, args.extra),
                ]
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
                print(f"[sweep] {name}: {' '.join(cmd)}", flush=True)
                t0 = time.time()
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, "sweep.log"), "w") as log:
                    code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                if code != 0:
                    sys.exit(f"[sweep] {name} failed (exit {code}); see {os.path.join(folder, 'sweep.log')}")
                print(f"[sweep] {name} done in {time.time() - t0:.0f}s", flush=True)
                row = summarise(folder, checker, systematic)
            rows.append((name, row))
            print(table(rows[-1:]).splitlines()[2], flush=True)
    out = table(rows)
    print("\n" + out)
    with open(os.path.join(args.output_dir, f"table_{args.task}.md"), "w") as f:
        f.write(out + "\n")


if __name__ == "__main__":
    main()
