"""Step 3 under every actor x critic ZeRO combination, two ranks, with and without every memory/option
flag at once, on tiny models; prints a pass/fail table.

    python scripts/zero_matrix.py                 # 9 stage pairs x 2 option sets (~10 min on 2 CPU cores)
    python scripts/zero_matrix.py --quick         # the representative subset CI runs
    python scripts/zero_matrix.py --num_gpus 2    # on a GPU machine (default: 2 ranks, on CPU where there is no GPU)

"all options" = --offload --offload_reference_model --offload_reward_model, LoRA on actor and critic with
--only_optimize_lora, --enable_ema, gradient checkpointing on both, and PPO-ptx. A combination DeepSpeed
cannot run must be refused up front with a one-line reason (`--offload` with a ZeRO-0 model): the table
counts that as a pass.
"""

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--actor",
    "tiny:gpt2",
    "--reward",
    "tiny:gpt2",
    "--per_device_generation_batch_size",
    "8",
    "--per_device_training_batch_size",
    "4",
    "--max_answer_seq_len",
    "8",
    "--data_split",
    "8,1,1",
    "--max_steps",
    "2",
]
OPTIONS = {
    "plain": [],
    "all options": [
        "--offload",
        "--offload_reference_model",
        "--offload_reward_model",
        "--actor_lora_dim",
        "4",
        "--critic_lora_dim",
        "4",
        "--only_optimize_lora",
        "--enable_ema",
        "--actor_gradient_checkpointing",
        "--critic_gradient_checkpointing",
        "--unsupervised_dataset_name",
        "builtin:sort",
        "--unsup_coef",
        "0.5",
    ],
}
QUICK = [(3, 2, "all options"), (0, 3, "all options")]


def combinations(quick):
    if quick:
        return QUICK
    return [(a, c, o) for a in (0, 2, 3) for c in (0, 2, 3) for o in OPTIONS]


def expected_refusal(actor, critic, option):
    """The reason a combination must be refused, or None when it must run."""
    if "--offload" in OPTIONS[option] and 0 in (actor, critic):
        return "--offload with --actor_zero_stage 0" if actor == 0 else "--offload with --critic_zero_stage 0"
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(actor, critic, option, num_gpus, workdir, timeout):
    """(ok, detail, seconds) of one combination."""
    out = os.path.join(workdir, f"a{actor}_c{critic}_{option.replace(' ', '_')}")
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [
        launcher,
        "--num_gpus",
        str(num_gpus),
        "--master_port",
        str(free_port()),
        os.path.join(ROOT, "ppo.py"),
        *TINY,
        "--actor_zero_stage",
        str(actor),
        "--critic_zero_stage",
        str(critic),
        *OPTIONS[option],
        "--output_dir",
        out,
    ]
    t0 = time.time()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=ROOT)
        )
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout}s", time.time() - t0
    seconds = time.time() - t0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    refusal = expected_refusal(actor, critic, option)
    if refusal is not None:
        ok = proc.returncode == 2 and len(errors) >= 1 and refusal in errors[0] and "Traceback" not in proc.stderr
        return ok, f"refused: {errors[0][7:] if errors else proc.stderr[-300:]}", seconds
    if proc.returncode != 0:
        tail = (errors[0] if errors else (proc.stderr.strip().splitlines() or ["?"])[-1])[:160]
        return False, f"exit {proc.returncode}: {tail}", seconds
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    saved = all(
        os.path.isfile(os.path.join(out, d, "config.json"))
        for d in ["actor", "critic"] + (["actor_ema"] if "--enable_ema" in OPTIONS[option] else [])
    )
    ok = saved and math.isfinite(metrics["eval_kl"]) and metrics["skipped_updates"] == 0
    return (
        ok,
        f"eval_kl {metrics['eval_kl']:.4f}, eval_reward {metrics['eval_reward']:+.3f}"
        + ("" if saved else ", missing folders"),
        seconds,
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    p.add_argument("--num_gpus", type=int, default=2, help="ranks per run (deepspeed --num_gpus)")
    p.add_argument("--timeout", type=int, default=600, help="seconds allowed per combination")
    p.add_argument("--workdir", default=None, help="where the runs write (default: a temporary folder)")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="zero_matrix_")
    rows = []
    print(
        "| actor ZeRO | critic ZeRO | options | result | seconds | detail |\n| --- | --- | --- | --- | --- | --- |",
        flush=True,
    )
    for actor, critic, option in combinations(args.quick):
        ok, detail, seconds = run(actor, critic, option, args.num_gpus, workdir, args.timeout)
        rows.append(ok)
        print(f"| {actor} | {critic} | {option} | {'pass' if ok else 'FAIL'} | {seconds:.0f} | {detail} |", flush=True)
    print(f"\n{sum(rows)}/{len(rows)} passed ({args.num_gpus} ranks each; outputs in {workdir})")
    return 0 if all(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
