"""What the critic and the reward model buy: step 3 with each advantage estimator, from one step-1 output, on
builtin:sort, for several seeds; one table of held-out accuracy before/after, KL, EOS rate, response length, samples/s
and wall time (mean, min, max over the seeds).

    python train.py                                  # the step-1 and step-2 outputs it starts from (./output)
    python scripts/compare.py --seeds 1 2 3          # 6 runs per seed (~25 min per seed on 2 CPU cores)
    python scripts/compare.py --seeds 1 --runs grpo rloo -- --actor_learning_rate 2e-4   # after --: to every run

Every run generates the same number of responses (--max_steps x 64), so the columns compare equal sampling budgets:
the group estimators sample 4 responses to each of 16 prompts per step where gae samples one to each of 64.
Finished runs are read back, not redone (delete a run's folder to redo it). dpo.py's runs, when present, join the
table: <output-dir>/dpo_seed<S> (plain DPO) and dpo_rpo_seed<S> (with --rpo_alpha 1), e.g.

    python dpo.py --model_name_or_path output/step1_sft --learning_rate 1e-4 --per_device_train_batch_size 16 \
        --per_device_eval_batch_size 32 --seed 1 --rpo_alpha 1 --output_dir compare/dpo_rpo_seed1
"""

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
builtin = importlib.import_module("builtin")  # the demo's recipe: ppo.py's own defaults are for real models
GROUP = ["--reward_fn", "checker", "--per_device_generation_batch_size", "16", "--n_samples_per_prompt", "4"]
RUNS = {  # name -> ppo.py flags (besides --actor and the budget)
    "gae + reward model": ["--reward", "{reward}"],
    "gae + checker": ["--reward_fn", "checker"],
    "grpo": [*GROUP, "--advantage_estimator", "grpo"],
    "dr_grpo": [*GROUP, "--advantage_estimator", "dr_grpo"],
    "rloo": [*GROUP, "--advantage_estimator", "rloo"],
    "reinforce_pp": ["--reward_fn", "checker", "--advantage_estimator", "reinforce_pp"],
    # what the field added since DeepSpeed-Chat (README, "Beyond DeepSpeed-Chat"), each on GRPO
    "grpo + clip-higher": [*GROUP, "--advantage_estimator", "grpo", "--cliprange_high", "0.28"],
    "grpo + dynamic sampling": [*GROUP, "--advantage_estimator", "grpo", "--dynamic_sampling"],
    "grpo + overlong shaping": [*GROUP, "--advantage_estimator", "grpo", "--overlong_buffer_len", "16"],
    "grpo + TIS": [*GROUP, "--advantage_estimator", "grpo", "--tis_cap", "2"],
    "gspo": [*GROUP, "--advantage_estimator", "grpo", "--importance_sampling_level", "sequence", "--cliprange", "3e-4",
             "--cliprange_high", "4e-4"],
}  # fmt: skip


DPO_RUNS = {"dpo (pairs, no sampling)": "dpo_seed", "dpo + chosen NLL (--rpo_alpha 1)": "dpo_rpo_seed"}  # folders


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sft", default="output/step1_sft", help="step-1 output every run starts from")
    p.add_argument("--reward", default="output/step2_reward", help="step-2 output (the reward-model run)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="ppo.py --seed values")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="which estimators")
    p.add_argument("--max_steps", type=int, default=187, help="PPO steps per run (x 64 responses each)")
    p.add_argument("--output-dir", default="compare", help="one folder per run below this")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.extra = argv[cut + 1 :]
    return args


def summarise(folder):
    """One row from a finished run (None when unfinished)."""
    path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(path):
        return None
    m = json.load(open(path))
    log = [line.split(",") for line in open(os.path.join(folder, "log.csv")).read().splitlines()[1:]]
    speed = [float(v) for _, k, v in log if k == "samples_per_s"]
    extra = [float(v) for _, k, v in log if k == "extra_batches"]  # dynamic sampling's extra generation batches
    return {"before": m["eval_accuracy_start"], "after": m["eval_accuracy"], "kl": m["eval_kl"],
            "eos": m["eval_eos_rate"], "length": m["eval_response_length"], "samples_per_s": statistics.mean(speed),
            "seconds": m["train_seconds"], "extra_gen": statistics.mean(extra) if extra else 0.0}  # fmt: skip


COLUMNS = [("before", "{:.1%}"), ("after", "{:.1%}"), ("gain", "{:+.1f}"), ("kl", "{:.2f}"), ("eos", "{:.2f}"),
           ("length", "{:.1f}"), ("samples_per_s", "{:.1f}"), ("seconds", "{:.0f}"),
           ("extra_gen", "{:.2f}")]  # fmt: skip


def table(results):
    """Markdown: one row per run kind, each cell mean [min, max] over seeds."""
    lines = ["| run | " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 1)]
    for name, rows in results.items():
        cells = []
        for key, fmt in COLUMNS:
            vals = [r[key] for r in rows]
            cells.append(f"{fmt.format(statistics.mean(vals))} [{fmt.format(min(vals))}, {fmt.format(max(vals))}]")
        lines.append(f"| {name} ({len(rows)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    results = {}
    for name in args.runs:
        for seed in args.seeds:
            folder = os.path.join(args.output_dir, f"{name.replace(' + ', '_').replace(' ', '_')}_seed{seed}")
            if summarise(folder) is None:
                flags = [f.format(reward=args.reward) for f in RUNS[name]]
                demo = builtin.DEMO_RECIPE["ppo.py"].split()  # ppo.py's own defaults are for real models
                cmd = [
                    sys.executable,
                    os.path.join(ROOT, "ppo.py"),
                    *demo,
                    "--actor",
                    args.sft,
                    *flags,
                    "--seed",
                    str(seed),
                ]
                cmd += ["--max_steps", str(args.max_steps), "--output_dir", folder, *args.extra]
                print(f"[compare] {name}, seed {seed}: {' '.join(cmd)}", flush=True)
                t0 = time.time()
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, "compare.log"), "w") as log:
                    if subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT) != 0:
                        sys.exit(f"[compare] {name}, seed {seed} failed; see {os.path.join(folder, 'compare.log')}")
                print(f"[compare] done in {time.time() - t0:.0f}s", flush=True)
            row = summarise(folder)
            row["gain"] = 100 * (row["after"] - row["before"])
            results.setdefault(name, []).append(row)
    for name, prefix in DPO_RUNS.items():  # dpo.py's runs, when they exist (scripts/compare.py does not start them)
        for seed in args.seeds:
            row = summarise(os.path.join(args.output_dir, f"{prefix}{seed}"))
            if row is not None:
                results.setdefault(name, []).append({**row, "gain": 100 * (row["after"] - row["before"])})
    out = table(results)
    print("\n" + out)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(out + "\n")


if __name__ == "__main__":
    main()
