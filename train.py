"""The whole pipeline in one command: step 1 (sft.py) -> step 2 (reward.py) -> step 3 (ppo.py), then a
report of what each step bought (DeepSpeed-Chat's "one-script experience").

    # the built-in demo on a tiny model, CPU, 7.5 to 9.5 minutes on 2 cores
    python train.py
    # DeepSpeed-Chat's example, on one GPU
    python train.py --actor-model facebook/opt-1.3b --reward-model facebook/opt-350m --num-gpus 1 \
        --data-path Dahoas/rm-static
    # all GPUs of this node, ZeRO-3 for both models, extra flags for one step
    python train.py --deployment-type single_node --actor-zero-stage 3 --reward-zero-stage 3 \
        --step3-args "--kl_coef 0.05"

Each step writes --output-dir/step1_sft, step2_reward, step3_ppo (with its training.log). A step whose
folder is complete (metrics.json present) is skipped on re-run unless --force; an interrupted step 3
resumes from its latest checkpoint. The report is printed and written to --output-dir/report.md with
PNG plots beside it (when matplotlib is installed).
"""

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time

import builtin

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = {1: ("sft.py", "step1_sft"), 2: ("reward.py", "step2_reward"), 3: ("ppo.py", "step3_ppo")}
DPO = ("dpo.py", "dpo")  # --algo dpo: step 3 is dpo.py on step 2's pairs, and no reward model is trained


def stage(i, args):
    """(script, folder) of step i."""
    return DPO if i == 3 and args.algo == "dpo" else STEPS[i]


EVAL_INTERVAL = 50  # step-3 held-out evals every N steps: the report's accuracy curve (--step3-args overrides)


def parse_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description="Run steps 1-3 and report", formatter_class=fmt)
    a = p.add_argument
    a("--actor-model", default="tiny:gpt2", help="step-1 base model (hub name, folder or tiny:<type>)")
    a("--reward-model", default=None, help="step-2 base model (default: the step-1 output)")
    a("--data-path", nargs="+", default=["builtin:sort"], help="datasets for all three steps")
    a("--step", nargs="+", type=int, default=[1, 2, 3], choices=[1, 2, 3], help="which steps to run")
    a("--algo", default="ppo", choices=["ppo", "dpo"], help="step 3: PPO (ppo.py) or DPO (dpo.py, no step 2)")
    a("--reward-fn", default=None, help="step 3 rewards by a function (checker, or file.py:fn), not step 2's model")
    a("--advantage-estimator", default=None, help="step 3's estimator: gae, grpo, dr_grpo, rloo, reinforce_pp")
    a("--n-samples-per-prompt", type=int, default=None, help="step 3's responses per prompt (the group)")
    a("--deployment-type", default=None, choices=["single_gpu", "single_node", "multi_node"], help="GPU launch")
    a("--num-gpus", type=int, default=None, help="GPUs per node (overrides --deployment-type); 0 runs on CPU")
    a("--actor-zero-stage", type=int, default=None, help="ZeRO stage of steps 1 and 3's actor (default: each step's)")
    a("--reward-zero-stage", type=int, default=None, help="ZeRO stage of step 2 and 3's critic (default: each step's)")
    a("--output-dir", default="output", help="where the step folders and the report go")
    a("--seed", type=int, default=1234, help="seed for all steps (the data split must agree across them)")
    a("--chat-template", action="store_true", help="all steps render prompts with the tokenizer's chat template")
    a("--recipe", default="auto", choices=["auto", "demo", "none"], help="auto: the demo's for a tiny:<family> actor")
    a("--checkpoint-interval", type=int, default=25, help="step 3 saves a resumable checkpoint every N PPO steps")
    for i in (1, 2, 3):
        a(f"--step{i}-args", default="", help=f"extra flags for step {i}'s script, as one quoted string")
    a("--force", action="store_true", help="redo steps whose output is already complete")
    args = p.parse_args(argv)
    for flag in ("actor_zero_stage", "reward_zero_stage"):
        if getattr(args, flag) is not None and getattr(args, flag) not in (0, 1, 2, 3):
            p.error(f"--{flag.replace('_', '-')} must be 0, 1, 2 or 3")
    if args.reward_fn or args.algo == "dpo":  # no reward model to train
        args.step = [s for s in args.step if s != 2]
    if args.recipe == "auto":  # the stages' own defaults are for real pretrained models
        tiny = args.actor_model.startswith("tiny:") and args.actor_model[5:] in builtin.TINY_FAMILIES
        args.recipe = "demo" if tiny else "none"
    return args


def launcher(args):
    """The command prefix that starts a stage: plain python on CPU, the deepspeed launcher on GPUs."""
    gpus = args.num_gpus
    if gpus is None and args.deployment_type is None:
        gpus = 1 if _cuda_count() else 0
    if gpus == 0:
        return [sys.executable]
    if args.deployment_type == "multi_node" and args.num_gpus is None:
        return ["deepspeed"]
    if gpus is None:
        gpus = 1 if args.deployment_type == "single_gpu" else _cuda_count()
    return ["deepspeed", "--num_gpus", str(gpus)]


def _cuda_count():
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def step_command(i, args):
    out = lambda j: os.path.join(args.output_dir, stage(j, args)[1])
    common = ["--data_path", *args.data_path, "--seed", str(args.seed), "--output_dir", out(i)]
    common += ["--chat_template"] if args.chat_template else []
    if i == 1:
        cmd = ["--model_name_or_path", args.actor_model]
        cmd += ["--zero_stage", str(args.actor_zero_stage)] if args.actor_zero_stage is not None else []
    elif i == 2:
        cmd = ["--model_name_or_path", args.reward_model or out(1)]
        cmd += ["--zero_stage", str(args.reward_zero_stage)] if args.reward_zero_stage is not None else []
    elif args.algo == "dpo":
        cmd = ["--model_name_or_path", out(1), "--eval_interval", str(EVAL_INTERVAL * 4)]
        cmd += ["--rpo_alpha", "1"]  # plain DPO unlearns the demo's chosen answers (README, DPO); --step3-args override
        cmd += ["--zero_stage", str(args.actor_zero_stage)] if args.actor_zero_stage is not None else []
    else:
        cmd = ["--actor", out(1), *(["--reward_fn", args.reward_fn] if args.reward_fn else ["--reward", out(2)])]
        cmd += ["--checkpoint_interval", str(args.checkpoint_interval), "--eval_interval", str(EVAL_INTERVAL)]
        cmd += ["--advantage_estimator", args.advantage_estimator] if args.advantage_estimator else []
        cmd += ["--n_samples_per_prompt", str(args.n_samples_per_prompt)] if args.n_samples_per_prompt else []
        cmd += ["--actor_zero_stage", str(args.actor_zero_stage)] if args.actor_zero_stage is not None else []
        cmd += ["--critic_zero_stage", str(args.reward_zero_stage)] if args.reward_zero_stage is not None else []
        if not args.force and os.path.isfile(os.path.join(out(3), "checkpoints", "latest")):
            cmd.append("--resume")
    recipe = builtin.DEMO_RECIPE[stage(i, args)[0]].split() if args.recipe == "demo" else []  # the user's flags win
    return [os.path.join(HERE, stage(i, args)[0])] + recipe + cmd + common + shlex.split(getattr(args, f"step{i}_args"))


def run_step(i, args):
    """Run step i, echoing its output and saving it to <step folder>/training.log. Returns seconds."""
    folder = os.path.join(args.output_dir, stage(i, args)[1])
    cmd = launcher(args) + step_command(i, args)
    os.makedirs(folder, exist_ok=True)
    print(f"[train] step {i} ({stage(i, args)[0]}): {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.time()
    with open(os.path.join(folder, "training.log"), "a") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=os.getcwd(),
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        for line in proc.stdout:
            log.write(line)
            if not _noise(line):
                sys.stdout.write(line)
                sys.stdout.flush()
        code = proc.wait()
    seconds = time.time() - t0
    if code != 0:
        log = os.path.join(folder, "training.log")
        sys.exit(f"[train] step {i} failed (exit {code}) after {seconds:.0f}s; its log: {log}")
    print(f"[train] step {i} done in {seconds:.0f}s", flush=True)
    return seconds


def _noise(line):
    """Library chatter kept in training.log but not echoed."""
    return (
        line.startswith(("[20", "[transformers]"))
        or not line.strip()
        or "warn" in line.lower()
        or any(bar in line for bar in ("Loading weights", "Writing model shards", "Saving the dataset"))
    )


def complete(i, args):
    return os.path.isfile(os.path.join(args.output_dir, stage(i, args)[1], "metrics.json"))


# --------------------------------------------------------------------------------------------
# The report.
def read_metrics(args, i):
    path = os.path.join(args.output_dir, stage(i, args)[1], "metrics.json")
    return json.load(open(path)) if os.path.isfile(path) else None


def read_log(args, i):
    """{name: [(step, value), ...]} from a step's log.csv."""
    path = os.path.join(args.output_dir, stage(i, args)[1], "log.csv")
    series = {}
    if os.path.isfile(path):
        for row in csv.DictReader(open(path)):
            series.setdefault(row["name"], []).append((int(row["step"]), float(row["value"])))
    return series


def read_jsonl(path):
    return [json.loads(line) for line in open(path)] if os.path.isfile(path) else []


def plots(args):
    """PNG plots of the training curves; returns their file names (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    panels = [
        (3, ["reward", "kl", "loss", "eval_accuracy"], f"step3_{args.algo}.png", f"Step 3: {args.algo.upper()}"),
        (1, ["loss"], "step1_loss.png", "Step 1: SFT loss"),
        (2, ["loss"], "step2_loss.png", "Step 2: reward-model loss"),
    ]
    for i, names, fname, title in panels:
        series = read_log(args, i)
        names = [n for n in names if n in series]
        if not names:
            continue
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
        for ax, name in zip(axes[0], names):
            xs, ys = zip(*series[name])
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None)
            ax.set_title(name)
            ax.set_xlabel("step")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(os.path.join(args.output_dir, fname), dpi=90)
        plt.close(fig)
        made.append(fname)
    return made


def _fmt(x):
    return "n/a" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def _row(name, m, key):
    return f"| {name} | {_fmt(m.get(key + '_start'))} | {_fmt(m.get(key))} |"


def build_report(args, seconds):
    lines, algo = ["# RLHF pipeline report", ""], "DPO" if args.algo == "dpo" else "RLHF"
    m1, m2, m3 = (read_metrics(args, i) or {} for i in (1, 2, 3))
    if m3.get("eval_accuracy") is not None:
        before, after = 100 * m3["eval_accuracy_start"], 100 * m3["eval_accuracy"]
        gain = f"SFT {before:.1f}% -> {algo} {after:.1f}% ({after - before:+.1f} points)"
        lines += [f"**Held-out ground-truth accuracy: {gain}**"]
    step3 = os.path.join(args.output_dir, stage(3, args)[1], "args.json")
    if os.path.isfile(step3) and args.algo == "ppo":  # what step 3 optimised, and against what
        a3 = json.load(open(step3))
        reward = f"`--reward_fn {a3['reward_fn']}`" if a3.get("reward_fn") else f"the reward model `{a3['reward']}`"
        est, k = a3.get("advantage_estimator", "gae"), a3.get("n_samples_per_prompt", 1)
        lines += ["", f"Step 3: estimator `{est}` ({k} response(s) per prompt), rewards from {reward}."]
    lines += ["", "| step | seconds |", "| --- | --- |"]
    skipped = lambda i: " (skipped: already complete)" if seconds[i] == 0 else ""
    lines += [f"| {i} {stage(i, args)[0]} | {seconds[i]:.0f}{skipped(i)} |" for i in sorted(seconds)]
    lines += ["", "| metric | before | after |", "| --- | --- | --- |"]
    rows = [(1, m1, "eval perplexity", "eval_perplexity"), (1, m1, "eval accuracy (greedy)", "eval_accuracy")]
    rows += [(2, m2, "pairwise accuracy", "eval_accuracy"), (2, m2, "chosen score", "eval_chosen_score")]
    rows += [(2, m2, "rejected score", "eval_rejected_score")]
    kinds = sorted(k[14:] for k in m2 if k.startswith("eval_accuracy_") and not k.endswith("_start"))  # per kind
    rows += [
        (2, m2, f"pairwise accuracy, rejected = {kind.replace('_', ' ')}", f"eval_accuracy_{kind}") for kind in kinds
    ]
    rows += [(3, m3, "reward-model score", "eval_reward"), (3, m3, "implicit reward accuracy", "eval_reward_accuracy")]
    rows += [(3, m3, "implicit reward margin", "eval_margin"), (3, m3, "KL to reference", "eval_kl")]
    rows += [(3, m3, "accuracy (greedy)", "eval_accuracy"), (3, m3, "response length", "eval_response_length")]
    lines += [_row(f"step {i}: {name}", m, key) for i, m, name, key in rows if key in m]
    folder = os.path.join(args.output_dir, stage(3, args)[1])
    before, after = (read_jsonl(os.path.join(folder, f"eval_generations{s}.jsonl")) for s in ("_start", ""))
    if before and after:
        pairs = list(zip(before, after))
        changed = [p for p in pairs if p[0]["response"] != p[1]["response"]]
        mark = lambda r: "" if "correct" not in r else (" ✓" if r["correct"] else " ✗")
        cell = lambda r: f"`{r['response']}`" + (f" {r['score']:+.2f}" if "score" in r else "") + mark(r)
        lines += ["", f"Held-out prompts, SFT answer vs {algo} answer (reward-model score):", ""]
        lines += [f"| prompt | SFT | {algo} |", "| --- | --- | --- |"]
        for b, a in (changed + [p for p in pairs if p not in changed])[:6]:
            lines.append(f"| `{b['prompt'].replace(chr(10), ' ').strip()[-60:]}` | {cell(b)} | {cell(a)} |")
    if after and "reference_score" in after[0]:
        hacked = [r for r in after if r.get("correct") is False and r["score"] > r["reference_score"]]
        end = ":" if hacked else "."
        lines += [
            "",
            f"Reward hacking: {len(hacked)} of {len(after)} RLHF answers are wrong yet scored above the correct",
        ]
        lines[-1] += f" answer by the reward model{end}"
        for r in hacked[:2]:
            prompt, ref = r["prompt"].replace("\n", " ").strip()[-60:], r["reference_score"]
            lines.append(f"- `{prompt}` -> `{r['response']}` scored {r['score']:+.2f}, the correct answer {ref:+.2f}")
    made = plots(args)
    lines += [""] + ([f"![{f}]({f})" for f in made] or ["(plots skipped: `pip install matplotlib` to draw them)"])
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    seconds, t0 = {}, time.time()
    if args.recipe == "demo":
        print(
            "[train] recipe: the demo's (builtin.DEMO_RECIPE, for a 0.5M-parameter model); --recipe none for the "
            "stages' defaults, which are for real pretrained models",
            flush=True,
        )
    for i in sorted(set(args.step)):
        if complete(i, args) and not args.force:
            print(f"[train] step {i} ({stage(i, args)[0]}): {os.path.join(args.output_dir, stage(i, args)[1])}", end="")
            print(" is complete, skipped (--force redoes it)")
            seconds[i] = 0.0
            continue
        seconds[i] = run_step(i, args)
        timing = os.path.join(args.output_dir, "seconds.json")  # wall time of each step that ran (scripts/sweep.py)
        done = json.load(open(timing)) if os.path.isfile(timing) else {}
        with open(timing, "w") as f:
            json.dump({**done, str(i): round(seconds[i], 1)}, f)
    report = build_report(args, seconds)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(report)
    print(
        f"\n{report}\n[train] all done in {time.time() - t0:.0f}s; report: {os.path.join(args.output_dir, 'report.md')}"
    )


if __name__ == "__main__":
    main()
