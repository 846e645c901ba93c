"""Step-3 throughput: ppo.py's own PPOTrainer and engines on synthetic prompts, against a bare PyTorch loop doing the
same work (the same models, batch, generate call and losses; plain modules and torch.optim.AdamW, no DeepSpeed).

One step = generate `--batch` answers of exactly `--answer_len` tokens (min_new_tokens: runs compare equal work, as
DeepSpeed-Chat's benchmarks generate full answers) to prompts of `--prompt_len` random tokens; score them (actor,
reference, critic and reward forward passes); one PPO epoch over the rollout in micro-batches of `--micro_batch`
(actor and critic backward + optimizer step). Rank 0 appends one JSON line per configuration to --results.

    python scripts/bench.py --quick                                       # tiny models, one step: the CI check
    python scripts/bench.py --actor tiny:opt@hidden=256,layers=4,heads=4,ffn=1024 --answer_len 128
    deepspeed --num_gpus 2 scripts/bench.py --actor_zero_stage 3 --critic_zero_stage 3 --no_bare ...   # CPU, 2 ranks
    deepspeed --num_gpus 1 scripts/bench.py --actor tiny:opt-1.3b --critic tiny:opt-350m --prompt_len 256 \\
        --answer_len 256 --batch 16 --micro_batch 16 --dtype bf16 --actor_zero_stage 2 --critic_zero_stage 2 \\
        --enable_hybrid_engine                                            # DeepSpeed-Chat's single-GPU setting
"""

import argparse
import contextlib
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
common, models, ppo = (importlib.import_module(m) for m in ("common", "models", "ppo"))  # the repository's

QUICK = ["--actor", "tiny:gpt2", "--critic", "tiny:gpt2", "--prompt_len", "8", "--answer_len", "8", "--batch", "4",
         "--micro_batch", "2", "--steps", "1"]  # fmt: skip
FIELDS = ["device", "commit", "actor_params", "critic_params", "prompt_len", "answer_len", "batch",
          "actor_zero_stage", "critic_zero_stage", "ranks", "gen_s", "score_s", "train_s", "samples_per_s",
          "tokens_per_s", "peak_mem_mb", "bare_samples_per_s", "overhead_ratio"]  # fmt: skip


GRID_SIZES = {  # OPT shapes of about 1M, 10M and 50M parameters (with the 264-token byte vocabulary)
    "1M": "tiny:opt@hidden=128,layers=5,heads=4,ffn=512,positions=512",
    "10M": "tiny:opt@hidden=384,layers=6,heads=6,ffn=1536,positions=512",
    "50M": "tiny:opt@hidden=640,layers=10,heads=10,ffn=2560,positions=512",
}
GRID_LENGTHS = (32, 128, 256)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="step-3 throughput, ours vs bare PyTorch")
    g = p.add_argument
    g("--actor", default="tiny:opt@hidden=256,layers=4,heads=4,ffn=1024", help="actor (and reference) model")
    g("--critic", default=None, help="critic (and reward) model (default: the actor's shape)")
    g("--prompt_len", type=int, default=64, help="prompt tokens")
    g("--answer_len", type=int, default=128, help="generated tokens per answer (forced: min_new_tokens)")
    g("--batch", type=int, default=8, help="prompts per rollout per rank")
    g("--micro_batch", type=int, default=8, help="sequences per training micro-batch per rank")
    g("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    g("--actor_zero_stage", type=int, default=0, help="actor ZeRO stage (the reference follows it)")
    g("--critic_zero_stage", type=int, default=0, help="critic ZeRO stage (the reward model follows it)")
    g("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on a GPU, else fp32")
    g("--enable_hybrid_engine", action="store_true", help="DeepSpeed's hybrid engine for generation")
    g("--offload_reference_model", action="store_true", help="the reference's parameters on the CPU (ZeRO-3)")
    g("--no_bare", action="store_true", help="skip the bare-PyTorch reference (it runs on one rank only)")
    g("--results", default=os.path.join(ROOT, "bench", "results.jsonl"), help="JSON lines appended here")
    g("--quick", action="store_true", help="tiny models, one step: checks the script, not the speed")
    g("--grid", action="store_true", help="README's tables: GRID_SIZES x GRID_LENGTHS, and ZeRO-3 on 2 ranks at 10M")
    g("--seed", type=int, default=1234, help="prompts and sampling")
    g("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = p.parse_args(argv)
    if args.quick:
        args = p.parse_args(QUICK + (argv if argv is not None else sys.argv[1:]))
    args.critic = args.critic or args.actor
    return args


def ppo_args(args, output_dir):
    """ppo.py's own arguments for this configuration (every other flag at its default)."""
    flags = ["--actor", args.actor, "--critic", args.critic, "--reward", args.critic, "--output_dir", output_dir]
    flags += ["--per_device_generation_batch_size", str(args.batch), "--per_device_training_batch_size"]
    flags += [str(args.micro_batch), "--max_prompt_seq_len", str(args.prompt_len), "--max_answer_seq_len"]
    flags += [str(args.answer_len), "--actor_zero_stage", str(args.actor_zero_stage), "--critic_zero_stage"]
    flags += [str(args.critic_zero_stage), "--dtype", args.dtype, "--seed", str(args.seed)]
    flags += [f"--{k}" for k in ("enable_hybrid_engine", "offload_reference_model") if getattr(args, k)]
    return ppo.parse_args(flags)


def synthetic_prompts(tokenizer, n, length, seed):
    """n prompts of `length` random tokens, none of them special: {input_ids, attention_mask, instructions}."""
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(len(allowed), (n, length), generator=g)]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "instructions": [""] * n}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def ours(args, device):
    """Seconds per phase per step with ppo.py's PPOTrainer and DeepSpeed engines: (gen, score, train), params."""
    with tempfile.TemporaryDirectory() as tmp:
        a = ppo_args(args, tmp)
        tokenizer = models.load_tokenizer(a.actor, "--actor")
        engine = ppo.RLHFEngine(a.actor, a.critic, a.reward, tokenizer, a, 1000, device)
        trainer = ppo.PPOTrainer(engine, a)
        trainer.generate_kwargs = {"min_new_tokens": args.answer_len}  # full-length answers: equal work per run
        times = []
        for step in range(args.steps + 1):  # step 0 warms up (allocations, kernels, the first all-gathers)
            batch = synthetic_prompts(tokenizer, args.batch, args.prompt_len, args.seed + 1000 * common.rank() + step)
            sync(device)
            t0 = time.time()
            exp = trainer.generate_experience(batch)
            gen_seconds = exp.pop("gen_seconds")  # sampling alone; the rest of generate_experience is scoring
            sync(device)
            t1 = time.time()
            exp["advantages"], exp["returns"] = ppo.advantages_and_returns(
                exp["rewards"], exp["values"], exp["mask"], a
            )
            for idx in torch.randperm(args.batch).view(-1, args.micro_batch):
                trainer.train_rlhf({k: v[idx] for k, v in exp.items()})
            sync(device)
            assert exp["mask"].sum(1).eq(args.answer_len).all(), "answers were not forced to full length"
            if step > 0:
                times.append((gen_seconds, t1 - t0 - gen_seconds, time.time() - t1))
        params = [sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in e.module.parameters())
                  for e in (engine.actor, engine.critic)]  # fmt: skip
    return [sum(t[i] for t in times) / len(times) for i in range(3)], params, engine.hybrid


def bare(args, device):
    """The same work without DeepSpeed: plain modules, torch.optim.AdamW, our loss functions. (gen, score, train)."""
    a = ppo_args(args, tempfile.mkdtemp())
    tokenizer = models.load_tokenizer(a.actor, "--actor")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.dtype, torch.float32)
    load = lambda: models.load_model(a.actor, tokenizer).to(device, dtype)  # what ours loads, as a plain module
    actor, ref = load(), load().requires_grad_(False)
    critic = models.load_reward_model(a.critic, tokenizer)[0].to(device, dtype)
    reward = models.load_reward_model(a.reward, tokenizer)[0].to(device, dtype).requires_grad_(False)
    opt_a = torch.optim.AdamW(actor.parameters(), lr=a.actor_learning_rate, betas=(0.9, 0.95))
    opt_c = torch.optim.AdamW(critic.parameters(), lr=a.critic_learning_rate, betas=(0.9, 0.95))
    ref.eval(), reward.eval()
    times = []
    for step in range(args.steps + 1):
        batch = synthetic_prompts(tokenizer, args.batch, args.prompt_len, args.seed + step)
        query, qmask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        sync(device)
        t0 = time.time()
        actor.eval(), critic.eval()
        with torch.no_grad():
            out = actor.generate(query, attention_mask=qmask, max_new_tokens=args.answer_len,
                                 min_new_tokens=args.answer_len, do_sample=True, top_k=0, top_p=1.0,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
            sync(device)
            t1 = time.time()
            response, tq = out[:, query.shape[1] :], query.shape[1]
            mask = torch.ones_like(response)
            seq, attn = out, torch.cat([qmask, mask], 1)
            pos = models.position_inputs(actor, attn)
            logprobs = ppo.logprobs_from_logits(actor(seq, attention_mask=attn, **pos).logits[:, tq - 1 : -1], response)
            ref_logprobs = ppo.logprobs_from_logits(
                ref(seq, attention_mask=attn, **pos).logits[:, tq - 1 : -1], response
            )
            values = critic(seq, attn)[:, tq - 1 : -1]
            scores = models.end_scores(reward(seq, attn), attn)
            rewards, _ = ppo.compute_rewards(scores, logprobs, ref_logprobs, mask, a.kl_coef, a.kl_estimator)
            advantages, returns = ppo.gae(rewards, values, mask, a.gamma, a.lam)
        sync(device)
        t2 = time.time()
        actor.train(), critic.train()
        for idx in torch.randperm(args.batch).view(-1, args.micro_batch):
            s, at, p = seq[idx], attn[idx], {k: v[idx] for k, v in pos.items()}
            new = ppo.logprobs_from_logits(actor(s, attention_mask=at, **p).logits[:, tq - 1 : -1], response[idx])
            loss = ppo.policy_loss(new, logprobs[idx], advantages[idx], mask[idx], a.cliprange)[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(actor.parameters(), 1.0)
            opt_a.step(), opt_a.zero_grad()
            v = critic(s, at)[:, tq - 1 : -1]
            critic_loss = ppo.value_loss(v, values[idx], returns[idx], mask[idx], a.cliprange_value)[0]
            critic_loss.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
            opt_c.step(), opt_c.zero_grad()
        sync(device)
        if step > 0:
            times.append((t1 - t0, t2 - t1, time.time() - t2))
    return [sum(t[i] for t in times) / len(times) for i in range(3)]


def commit():
    with contextlib.suppress(Exception):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    return "unknown"


def grid(args):
    """Every configuration of README's tables, one process each (peak memory is per process), then the tables."""
    base = [sys.executable, os.path.abspath(__file__), "--results", args.results, "--prompt_len", str(args.prompt_len)]
    base += ["--batch", str(args.batch), "--micro_batch", str(args.micro_batch), "--steps", str(args.steps)]
    runs = [base + ["--actor", m, "--answer_len", str(n)] for m in GRID_SIZES.values() for n in GRID_LENGTHS]
    launcher = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2"]
    zero3 = ["--actor_zero_stage", "3", "--critic_zero_stage", "3", "--no_bare"]
    runs.append(launcher + base[1:] + ["--actor", GRID_SIZES["10M"], "--answer_len", "128", *zero3])
    first = sum(1 for _ in open(args.results)) if os.path.isfile(args.results) else 0
    for cmd in runs:
        print("[bench]", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=ROOT))
    rows = [json.loads(line) for line in open(args.results)][first:]
    size = {v: k for k, v in GRID_SIZES.items()}
    print("\n| model | answer | samples/s | gen ms/token | gen / score / train s | peak MiB | bare samples/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = f"{r['overhead_ratio']:.2f}" if r["overhead_ratio"] else "-"
        bare_sps = f"{r['bare_samples_per_s']:.2f}" if r["bare_samples_per_s"] else "-"
        phases = f"{r['gen_s']:.2f} / {r['score_s']:.2f} / {r['train_s']:.2f}"
        name = f"{size.get(r['actor'], r['actor'])} ZeRO-{r['actor_zero_stage']} x{r['ranks']}"
        print(f"| {name} | {r['answer_len']} | {r['samples_per_s']:.2f} | {r['gen_ms_per_token']:.1f} | {phases} | "
              f"{r['peak_mem_mb']:.0f} | {bare_sps} | {ratio} |")  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    if args.grid:
        return grid(args)
    device = common.init_distributed(args.seed)
    (gen, score, train), (actor_params, critic_params), hybrid_ran = ours(args, device)
    world, peak = common.world_size(), peak_memory_mb(device)  # before the bare models load
    row = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"}
    row.update(commit=commit(), actor_params=actor_params, critic_params=critic_params, prompt_len=args.prompt_len)
    row.update(answer_len=args.answer_len, batch=args.batch, actor_zero_stage=args.actor_zero_stage)
    row.update(critic_zero_stage=args.critic_zero_stage, ranks=world, gen_s=gen, score_s=score, train_s=train)
    row.update(
        samples_per_s=args.batch * world / (gen + score + train), tokens_per_s=args.batch * args.answer_len / gen
    )
    row.update(gen_ms_per_token=1000 * gen / args.answer_len, peak_mem_mb=peak, dtype=common.check_dtype(args.dtype))
    row.update(hybrid_engine=hybrid_ran, offload_reference_model=args.offload_reference_model)  # ran, not asked
    row.update(actor=args.actor, critic=args.critic, micro_batch=args.micro_batch)
    row.update(bare_samples_per_s=None, overhead_ratio=None, bare_gen_s=None, bare_score_s=None, bare_train_s=None)
    if not args.no_bare and world == 1:
        b = bare(args, device)
        row.update(bare_gen_s=b[0], bare_score_s=b[1], bare_train_s=b[2], bare_samples_per_s=args.batch / sum(b))
        row["overhead_ratio"] = (gen + score + train) / sum(b)
    if common.rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        figures = " | ".join(f"{k} {row[k]:.3g}" for k in FIELDS[10:] if isinstance(row[k], float))
        print(f"bench {args.actor} / {args.critic}, {args.prompt_len}+{args.answer_len} tokens, batch {args.batch}: "
              f"{figures}")  # fmt: skip


if __name__ == "__main__":
    common.run_cli(main)
