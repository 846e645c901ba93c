"""Step 2: a reward model, LM backbone + scalar head (models.RewardModel), trained on chosen/rejected pairs with the
Bradley-Terry loss of InstructGPT. A sequence's score is the head's value at its last real token, the EOS after
prompt + response (models.end_scores); step 3 reads rewards the same way and starts its critic from this model.

    # the built-in demo on CPU, from the step-1 output, at its recipe (builtin.DEMO_RECIPE)
    python reward.py --model_name_or_path output/step1_sft --learning_rate 5e-4 --num_train_epochs 2 \\
        --per_device_train_batch_size 8 --per_device_eval_batch_size 32 --output_dir output/step2_reward
    # 1 GPU
    deepspeed --num_gpus 1 reward.py --model_name_or_path facebook/opt-350m --data_path Dahoas/rm-static \\
        --learning_rate 5e-5 --per_device_train_batch_size 8 --dtype bf16 --zero_stage 2 --output_dir out/reward
    # 8 GPUs, ZeRO-3
    deepspeed --num_gpus 8 reward.py --model_name_or_path facebook/opt-350m --data_path Dahoas/rm-static \\
        --dtype bf16 --zero_stage 3 --output_dir out/reward

Batch hierarchy: a micro-batch is per_device_train_batch_size pairs per rank (chosen and rejected in one forward
pass: 2x that many sequences); an optimizer step every gradient_accumulation_steps micro-batches; global = x ranks.
Outputs in --output_dir: a Hugging Face folder of the backbone whose weights also hold v_head.weight and v_head.bias,
with score_mean/score_std in config.json (step 3 standardises rewards by them); args.json; metrics.json; log.csv.
"""

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

import common
import data
import lora
import models
import sources
from common import print_rank0
from models import end_scores, load_reward_model, save_reward_model


def parse_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description="Step 2: reward model", formatter_class=fmt)
    # ---- training
    g = p.add_argument_group("training").add_argument
    g("--learning_rate", type=float, default=9.65e-6, help="peak learning rate")
    g("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases and norms)")
    g("--num_train_epochs", type=int, default=1, help="passes over the phase-2 pairs")
    g("--max_steps", type=int, default=0, help="optimizer steps; overrides --num_train_epochs when > 0")
    g("--per_device_train_batch_size", type=int, default=8, help="pairs per micro-batch per rank")
    g("--per_device_eval_batch_size", type=int, default=16, help="pairs per eval micro-batch per rank")
    g("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g("--lr_scheduler_type", default="cosine", help="transformers scheduler: linear, cosine, constant, ...")
    g("--num_warmup_steps", type=int, default=0, help="linear warm-up steps")
    g("--seed", type=int, default=1234, help="data split, shuffling and initialisation")
    # ---- data
    g = p.add_argument_group("data").add_argument
    g("--data_path", nargs="+", default=["builtin:sort"], help="dataset(s) with chosen/rejected pairs to blend")
    g("--data_split", default="2,4,4", help="proportions of each dataset for steps 1,2,3")
    g("--chat_template", action="store_true", help="the tokenizer's chat template (use the same in all steps)")
    g("--eos_token", default=None, help="the token that ends a response, where the score is read (default: EOS)")
    g("--data_output_path", default=os.path.join(common.tiny_cache_dir(), "data"), help="tokenised cache")
    g("--max_seq_len", type=int, default=512, help="prompt + response tokens (capped at the model's positions)")
    # ---- model and memory
    g = p.add_argument_group("model and memory").add_argument
    g("--model_name_or_path", required=True, help="backbone: step-1 output, hub name, HF folder or tiny:<type>")
    g("--output_dir", required=True, help="where the reward model folder, args.json and metrics.json go")
    g("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on a GPU, else fp32")
    g("--zero_stage", type=int, default=0, help="ZeRO stage 0-3")
    g("--offload", action="store_true", help="optimizer state (and ZeRO-3 parameters) on the CPU")
    g("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    g("--dropout", type=float, default=None, help="dropout for every dropout site (default: the model's own)")
    g("--lora_dim", type=int, default=0, help="LoRA rank (0: off)")
    g("--lora_module_name", default=None, help="LoRA target (default: the family's decoder layers)")
    g("--only_optimize_lora", action="store_true", help="train only the LoRA weights (and v_head)")
    g("--lora_learning_rate", type=float, default=5e-4, help="learning rate of the LoRA weights")
    g("--load_in_4bit", action="store_true", help="QLoRA: frozen base weights in 4 bits (bitsandbytes); needs LoRA")
    g("--bnb_4bit_quant_type", default="nf4", choices=["nf4", "fp4"], help="4-bit data type of --load_in_4bit")
    # ---- evaluation and logging
    g = p.add_argument_group("evaluation and logging").add_argument
    g("--eval_interval", type=int, default=0, help="evaluate every N optimizer steps (0: start and end only)")
    g("--eval_iters", type=int, default=0, help="eval micro-batches per evaluation (0: the whole eval split)")
    g("--report_to", nargs="+", default=["none"], choices=common.REPORT_TO, help="DeepSpeed monitors to log to")
    g("--enable_tensorboard", action="store_true", help="the same as --report_to tensorboard (DeepSpeed-Chat's flag)")
    g("--tensorboard_path", default="step2_tensorboard", help="folder of the tensorboard and csv logs")
    g("--print_loss", action="store_true", help="print the loss at every step")
    g("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (LOCAL_RANK is read instead)")
    common.add_compat_flags(p, 2)
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Everything that can be wrong with the arguments, found before any model or data is loaded."""
    common.note_compat_flags(args)
    common.check_zero_stage(args.zero_stage, offload=args.offload)
    args.dtype = common.check_dtype(args.dtype)
    common.check_report_to(args)
    args.split = data.parse_split(args.data_split)
    for path in args.data_path:
        sources.resolve_source(path)
    sizes = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "max_seq_len")
    common.check_at_least_one(args, *sizes)
    common.check_output_dir(args.output_dir)
    models.check_model_path(args.model_name_or_path)
    lora.check_flags(args, auto_class="AutoModel")
    data.check_same_template(args.chat_template, {"--model_name_or_path": args.model_name_or_path})


# ======================================================================================================================
# ALGO LOGIC: the loss, the data it reads, the evaluation, and the loop in main().
def pairwise_loss(chosen, rejected):
    """InstructGPT eq. 1 (Ouyang et al. 2022, sec. 3.5): -log sigmoid(r_chosen - r_rejected), averaged over pairs.
    chosen, rejected: [B] end-token scores."""
    return -F.logsigmoid(chosen - rejected).mean()


KEYS = ("chosen", "rejected")


def build_data(args, tokenizer):
    """Tokenised phase-2 pairs; for a source that classifies its rejected answers (builtin:sort), each pair's kind of
    error too, for per-kind accuracy."""
    chat = tokenizer if args.chat_template else None
    rows = data.phase_rows(args.data_path, args.split, 2, args.seed, need="pairs", chat_tokenizer=chat)
    kind = sources.error_kind_for(args.data_path)

    def encode(r):  # None: the pair does not fit (data.encode_row)
        if (enc := data.encode_row(tokenizer, r["prompt"], [r[k] for k in KEYS], args.max_seq_len)) is None:
            return None
        ids = {f"{k}_ids": e["input_ids"] for k, e in zip(KEYS, enc[0])}
        return {**ids, "cut": enc[1], **({"kind": kind(r["prompt"], r["chosen"], r["rejected"])} if kind else {})}

    cache = (tokenizer, args.data_output_path, encode)
    return data.build_cached("pairs", rows, *cache, max_seq_len=args.max_seq_len, kinds=bool(kind))


@torch.no_grad()
def evaluate(engine, batches, args, device, kinds=()):
    """Pairwise accuracy (ties count as wrong), mean chosen/rejected scores and margin, chosen-score mean/std; with
    `kinds` (the eval set's kinds of rejected answer) pairwise accuracy per kind as eval_accuracy_<kind>."""
    engine.eval()
    sums = dict.fromkeys(["correct", "pairs", "chosen", "rejected", "chosen_sq", "loss"], 0.0)
    for kind in kinds:
        sums[f"correct_{kind}"] = sums[f"pairs_{kind}"] = 0.0
    for i, (batch, rows) in enumerate(batches()):
        if args.eval_iters and i >= args.eval_iters:
            break
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        chosen, rejected = end_scores(engine(ids, mask), mask).chunk(2)  # chosen rows first: [B], [B]
        if rows == 0:  # a dummy batch (ZeRO-3 ranks forward together): not counted
            continue
        sums["correct"] += (chosen > rejected).sum().item()
        sums["pairs"] += chosen.numel()
        sums["chosen"] += chosen.sum().item()
        sums["rejected"] += rejected.sum().item()
        sums["chosen_sq"] += (chosen**2).sum().item()
        sums["loss"] += pairwise_loss(chosen, rejected).item() * chosen.numel()
        for kind, right in zip(batch.get("kind", []), (chosen > rejected).tolist()):
            sums[f"correct_{kind}"] += right
            sums[f"pairs_{kind}"] += 1
    s = dict(zip(sums, common.all_reduce_sum(list(sums.values()), device)))
    engine.train()
    n, mean_c, mean_r = s["pairs"], s["chosen"] / s["pairs"], s["rejected"] / s["pairs"]
    out = {"eval_accuracy": s["correct"] / n, "eval_loss": s["loss"] / n, "eval_chosen_score": mean_c}
    out.update(eval_rejected_score=mean_r, eval_margin=mean_c - mean_r, score_mean=mean_c)
    out["score_std"] = math.sqrt(max(s["chosen_sq"] / n - mean_c**2, 1e-12))
    return {**out, **{f"eval_accuracy_{k}": s[f"correct_{k}"] / max(s[f"pairs_{k}"], 1) for k in kinds}}


def main(argv=None):
    args = parse_args(argv)
    device = common.init_distributed(args.seed)
    import deepspeed
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import get_scheduler

    name, eos = args.model_name_or_path, (args.eos_token, args.add_eot_token)
    tokenizer = models.load_tokenizer(name, "--model_name_or_path", args.chat_template, *eos)
    args.max_seq_len = models.cap_seq_len(args.model_name_or_path, args.max_seq_len)

    # ---- data: phase-2 pairs of every --data_path, before the model loads
    sets = build_data(args, tokenizer)
    collate = lambda b: data.collate_pairs(b, tokenizer.pad_token_id)
    train_set, eval_set = sets["train"], sets["eval"]
    kinds = sorted(set(eval_set["kind"])) if "kind" in eval_set.column_names else []
    sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed)
    train_loader = DataLoader(train_set, args.per_device_train_batch_size, sampler=sampler, collate_fn=collate)
    eval_batches = lambda: data.eval_batches(eval_set, args.per_device_eval_batch_size, collate)

    # ---- batch hierarchy: pairs per micro-batch per rank x accumulation x ranks = pairs per optimizer step
    world, micro, accum = common.world_size(), args.per_device_train_batch_size, args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_loader) / accum)
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
    print_rank0(
        f"reward: backbone {args.model_name_or_path}, data {' '.join(args.data_path)}: {len(train_set)} train / "
        f"{len(eval_set)} eval pairs, micro-batch {micro} pairs x accum {accum} x ranks {world} = global batch "
        f"{micro * accum * world} pairs, {total_steps} steps, zero {args.zero_stage}, {args.dtype}"
    )

    # ---- model: backbone + v_head, LoRA, optimizer, schedule, DeepSpeed engine
    mon = common.monitors(args.report_to, args.tensorboard_path, "step2_reward")
    ds_cfg = common.ds_config(args.zero_stage, args.dtype, micro, accum, args.offload, monitors=mon)
    quant = (args.bnb_4bit_quant_type, args.dtype) if args.load_in_4bit else None
    model, _ = load_reward_model(args.model_name_or_path, tokenizer, args.dropout, args.zero_stage, ds_cfg, quant)
    if args.lora_dim > 0:  # a 4-bit base cannot train: only LoRA (and the v_head) does
        only = args.only_optimize_lora or args.load_in_4bit
        lora.add_lora(model.backbone, args.lora_dim, args.lora_module_name, only)
    if args.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable()
    lrs = (args.learning_rate, args.weight_decay, args.lora_learning_rate)
    optimizer = common.make_optimizer(model, *lrs, args.offload)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps, total_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    log = common.CSVLog(os.path.join(args.output_dir, "log.csv"), engine=engine)

    # ---- loop
    start = {k: v for k, v in evaluate(engine, eval_batches, args, device, kinds).items() if not k.startswith("score_")}
    metrics = {f"{k}_start": v for k, v in start.items()}
    log.write(0, start)
    print_rank0("eval start | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    log_every = 1 if args.print_loss else max(1, total_steps // 20)
    step, epoch, t0, seen, correct, skipped = 0, 0, time.time(), 0, [], 0
    engine.train()
    while step < total_steps:
        sampler.set_epoch(epoch)
        for batch in train_loader:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            chosen, rejected = end_scores(engine(ids, mask), mask).chunk(2)  # chosen rows first: [B], [B]
            loss = pairwise_loss(chosen, rejected)
            boundary = engine.is_gradient_accumulation_boundary()  # read before step() advances the counter
            if not common.backward_step(engine, loss):
                skipped += 1
                continue
            seen += chosen.numel() * world
            correct.append((chosen > rejected).float().mean().item())
            if not boundary:
                continue
            step += 1
            if step % log_every == 0 or step == total_steps:
                acc, lr = sum(correct) / len(correct), engine.get_lr()[0]
                speed = seen / (time.time() - t0)
                print_rank0(
                    f"step {step}/{total_steps} | loss {loss.item():.4f} | train acc {acc:.3f} | lr {lr:.2e} | "
                    f"{speed:.1f} pairs/s"
                )
                log.write(step, {"loss": loss.item(), "train_accuracy": acc, "lr": lr, "skipped": skipped})
                correct = []
            if args.eval_interval and step % args.eval_interval == 0 and step < total_steps:
                mid = evaluate(engine, eval_batches, args, device, kinds)
                log.write(step, mid)
                print_rank0(f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in mid.items()))
            if step >= total_steps:
                break
        epoch += 1
    metrics.update(train_seconds=time.time() - t0, skipped_updates=skipped)
    end = evaluate(engine, eval_batches, args, device, kinds)
    metrics.update(end)
    log.write(total_steps, end)
    print_rank0(
        "eval end | " + " | ".join(f"{k} {v:.4f}" for k, v in end.items()) + f" | train {metrics['train_seconds']:.0f}s"
    )

    # ---- save: backbone + v_head, with the chosen-score statistics step 3 standardises rewards by
    stats = {"score_mean": end["score_mean"], "score_std": end["score_std"]}
    saved_args = {k: v for k, v in vars(args).items() if k != "split"}
    json_files = {"args.json": saved_args, "metrics.json": metrics}
    save_reward_model(engine.module, tokenizer, args.output_dir, json_files, stats=stats)
    print_rank0(f"saved {args.output_dir}")


if __name__ == "__main__":
    common.run_cli(main)
