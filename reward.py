"""Step 2: reward model = LM backbone + scalar head, trained on chosen/rejected pairs.

The score of a sequence is the head's value at the last real token of prompt + response + EOS
(`end_scores`); step 3 reads rewards the same way and initialises its critic from this model.

    # tiny CPU smoke run on the built-in demo, from the step-1 output
    python reward.py --model_name_or_path output/step1_sft --data_path builtin:sort --output_dir output/step2_reward
    # 1 GPU
    deepspeed --num_gpus 1 reward.py --model_name_or_path facebook/opt-350m --data_path Dahoas/rm-static \
        --learning_rate 5e-5 --per_device_train_batch_size 8 --dtype bf16 --zero_stage 2 --output_dir out/reward
    # 8 GPUs, ZeRO-3
    deepspeed --num_gpus 8 reward.py --model_name_or_path facebook/opt-350m --data_path Dahoas/rm-static \
        --dtype bf16 --zero_stage 3 --output_dir out/reward

Outputs in --output_dir: a Hugging Face folder of the backbone whose weights also hold v_head.weight
and v_head.bias, with score_mean/score_std in config.json; args.json; metrics.json.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

import common
import data
from common import UserError, end_scores, load_reward_model, print_rank0, save_reward_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Step 2: reward model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", required=True, help="backbone: step-1 output, hub name, local HF folder or tiny:<model_type>")
    p.add_argument("--data_path", nargs="+", default=["builtin:sort"], help="dataset(s) with chosen/rejected pairs to blend")
    p.add_argument("--data_split", default="2,4,4", help="proportions of each dataset for steps 1,2,3")
    p.add_argument("--chat_template", action="store_true", help="render prompts with the tokenizer's chat template instead of \"Human: ... Assistant:\" (use the same in all three steps)")
    p.add_argument("--data_output_path", default=os.path.join(common.tiny_cache_dir(), "data"), help="where the tokenised cache lives")
    p.add_argument("--output_dir", required=True, help="where the reward model folder, args.json and metrics.json go")
    p.add_argument("--per_device_train_batch_size", type=int, default=16, help="pairs per micro-batch per rank")
    p.add_argument("--per_device_eval_batch_size", type=int, default=32, help="pairs per eval micro-batch per rank")
    p.add_argument("--max_seq_len", type=int, default=512, help="prompt + response tokens (capped at the model's positions)")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases and norms)")
    p.add_argument("--num_train_epochs", type=int, default=2, help="passes over the phase-2 pairs")
    p.add_argument("--max_steps", type=int, default=0, help="optimizer steps; overrides --num_train_epochs when > 0")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr_scheduler_type", default="cosine", help="transformers scheduler name: linear, cosine, constant, ...")
    p.add_argument("--num_warmup_steps", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--seed", type=int, default=1234, help="seed for the data split, shuffling and init")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--dropout", type=float, default=None, help="dropout for every dropout site (default: the model's own)")
    p.add_argument("--offload", action="store_true", help="ZeRO offload of optimizer (and, at stage 3, parameters) to CPU")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="training precision; auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--zero_stage", type=int, default=0, help="ZeRO stage 0-3")
    p.add_argument("--lora_dim", type=int, default=0, help="LoRA rank; 0 disables LoRA")
    p.add_argument("--lora_module_name", default=None, help="LoRA goes on linear layers whose name contains this (default: the family's decoder layers)")
    p.add_argument("--only_optimize_lora", action="store_true", help="freeze everything but the LoRA weights (and v_head)")
    p.add_argument("--lora_learning_rate", type=float, default=5e-4, help="learning rate of the LoRA weights")
    p.add_argument("--num_padding_at_beginning", type=int, default=None, help="accepted for DeepSpeed-Chat compatibility and ignored: scores are read at the last real token by the attention mask")
    p.add_argument("--eval_interval", type=int, default=0, help="evaluate every N optimizer steps (0: start and end only)")
    p.add_argument("--eval_iters", type=int, default=0, help="eval micro-batches per evaluation (0: the whole phase-2 eval split)")
    p.add_argument("--enable_tensorboard", action="store_true", help="log to tensorboard through DeepSpeed's monitor")
    p.add_argument("--tensorboard_path", default="step2_tensorboard", help="tensorboard output folder")
    p.add_argument("--print_loss", action="store_true", help="print the loss at every step")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (LOCAL_RANK is read from the environment)")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Everything that can be wrong with the arguments, found before any model or data is loaded."""
    common.check_zero_stage(args.zero_stage, offload=args.offload)
    args.dtype = common.check_dtype(args.dtype)
    args.split = data.parse_split(args.data_split)
    for path in args.data_path:
        data.resolve_source(path)
    common.check_at_least_one(args, "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "max_seq_len")
    if args.only_optimize_lora and args.lora_dim == 0:
        raise UserError("--only_optimize_lora needs --lora_dim > 0")
    common.check_output_dir(args.output_dir)
    common.check_model_path(args.model_name_or_path)
    data.check_same_template(args.chat_template, {"--model_name_or_path": args.model_name_or_path})


# --------------------------------------------------------------------------------------------
def pairwise_loss(chosen, rejected):
    """InstructGPT eq. 1 (Ouyang et al. 2022, sec. 3.5): -log sigmoid(r_chosen - r_rejected),
    averaged over pairs. chosen, rejected: [B] end-token scores."""
    return -F.logsigmoid(chosen - rejected).mean()


def pair_stats(chosen, rejected):
    """Sums for pairwise accuracy and score means: [correct, pairs, sum chosen, sum rejected, sum chosen^2]."""
    return [(chosen > rejected).sum().item(), chosen.numel(), chosen.sum().item(), rejected.sum().item(), (chosen ** 2).sum().item()]


def build_data(args, tokenizer):
    """Tokenised phase-2 pairs; with a source that classifies its rejected answers (builtin:sort), each pair's
    kind of error too, for per-kind accuracy."""
    rows = data.phase_rows(args.data_path, args.split, 2, args.seed, need_pairs=True, chat_tokenizer=tokenizer if args.chat_template else None)
    kind = data.error_kind_for(args.data_path)

    def encode(r):
        return {"chosen_ids": data.encode_pair(tokenizer, r["prompt"], r["chosen"], args.max_seq_len)["input_ids"],
                "rejected_ids": data.encode_pair(tokenizer, r["prompt"], r["rejected"], args.max_seq_len)["input_ids"],
                **({"kind": kind(r["prompt"], r["chosen"], r["rejected"])} if kind else {})}
    return data.build_cached("pairs", rows, tokenizer, args.data_output_path, encode, max_seq_len=args.max_seq_len, kinds=bool(kind))


@torch.no_grad()
def evaluate(engine, loader, args, device, kinds=()):
    """Pairwise accuracy, mean chosen/rejected scores and margin, chosen-score mean/std; with `kinds` (the
    eval set's kinds of rejected answer) pairwise accuracy per kind as eval_accuracy_<kind>."""
    engine.eval()
    sums, loss_sum = [0.0] * 5, 0.0
    per_kind = {k: [0.0, 0.0] for k in kinds}  # kind -> [pairs judged right, pairs]
    for i, batch in enumerate(loader):
        if args.eval_iters and i >= args.eval_iters:
            break
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        scores = end_scores(engine(ids, mask), mask)
        chosen, rejected = scores.chunk(2)
        sums = [a + b for a, b in zip(sums, pair_stats(chosen, rejected))]
        loss_sum += pairwise_loss(chosen, rejected).item() * chosen.numel()
        for kind, right in zip(batch.get("kind", []), (chosen > rejected).tolist()):
            per_kind[kind][0] += right
            per_kind[kind][1] += 1
    flat = common.all_reduce_sum(sums + [loss_sum] + [x for k in kinds for x in per_kind[k]], device)
    correct, n, sc, sr, sc2, loss_sum = flat[:6]
    engine.train()
    mean_c, mean_r = sc / n, sr / n
    out = {"eval_accuracy": correct / n, "eval_loss": loss_sum / n, "eval_chosen_score": mean_c,
           "eval_rejected_score": mean_r, "eval_margin": mean_c - mean_r,
           "score_mean": mean_c, "score_std": math.sqrt(max(sc2 / n - mean_c ** 2, 1e-12))}
    for k, right, total in zip(kinds, flat[6::2], flat[7::2]):
        out[f"eval_accuracy_{k}"] = right / max(total, 1)
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.num_padding_at_beginning is not None:
        print_rank0("note: --num_padding_at_beginning is ignored; scores are read at the last real token of each sequence")
    device = common.init_distributed()
    common.set_seed(args.seed)
    import deepspeed
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import get_scheduler

    tokenizer = common.load_tokenizer(args.model_name_or_path)
    args.max_seq_len = common.cap_seq_len(args.model_name_or_path, args.max_seq_len)

    # ---- data: phase-2 pairs of every --data_path, before the model loads
    sets = build_data(args, tokenizer)
    collate = lambda b: data.collate_pairs(b, tokenizer.pad_token_id)  # noqa: E731
    train_set, eval_set = sets["train"], sets["eval"]
    kinds = sorted(set(eval_set["kind"])) if "kind" in eval_set.column_names else []
    sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=args.per_device_train_batch_size, sampler=sampler, collate_fn=collate)
    eval_loader = DataLoader(eval_set, batch_size=args.per_device_eval_batch_size, collate_fn=collate,
                             sampler=DistributedSampler(eval_set, shuffle=False))

    # ---- batch hierarchy: pairs per micro-batch per rank x accumulation x ranks = pairs per optimizer step
    world = common.world_size()
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
    print_rank0(f"reward: backbone {args.model_name_or_path}, data {' '.join(args.data_path)}: {len(train_set)} train / "
                f"{len(eval_set)} eval pairs, micro-batch {args.per_device_train_batch_size} pairs x accum "
                f"{args.gradient_accumulation_steps} x ranks {world} = global batch {global_batch} pairs, {total_steps} steps, "
                f"zero {args.zero_stage}, {args.dtype}")

    # ---- model: backbone + v_head, LoRA, optimizer, schedule, DeepSpeed engine
    ds_cfg = common.ds_config(args.zero_stage, args.dtype, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                              args.offload, tensorboard=(args.tensorboard_path, "step2_reward") if args.enable_tensorboard else None)
    model, _ = load_reward_model(args.model_name_or_path, tokenizer, args.dropout, args.zero_stage, ds_cfg)
    if args.lora_dim > 0:
        common.convert_to_lora(model.backbone, args.lora_module_name or common.default_lora_module(model.backbone), args.lora_dim)
        if args.only_optimize_lora:
            common.only_optimize_lora(model.backbone)
    if args.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable()
    optimizer = common.make_optimizer(model, args.learning_rate, args.weight_decay, args.lora_learning_rate, args.offload)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps, total_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    log = common.CSVLog(os.path.join(args.output_dir, "log.csv"))

    # ---- loop
    start = evaluate(engine, eval_loader, args, device, kinds)
    metrics = {f"{k}_start": v for k, v in start.items() if not k.startswith("score_")}
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
                acc = sum(correct) / len(correct)
                print_rank0(f"step {step}/{total_steps} | loss {loss.item():.4f} | train acc {acc:.3f} | "
                            f"lr {engine.get_lr()[0]:.2e} | {seen / (time.time() - t0):.1f} pairs/s")
                log.write(step, {"loss": loss.item(), "train_accuracy": acc, "lr": engine.get_lr()[0], "skipped": skipped})
                if engine.monitor.enabled:
                    engine.monitor.write_events([("train/loss", loss.item(), step), ("train/accuracy", acc, step)])
                correct = []
            if args.eval_interval and step % args.eval_interval == 0 and step < total_steps:
                mid = evaluate(engine, eval_loader, args, device, kinds)
                log.write(step, mid)
                print_rank0(f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in mid.items()))
            if step >= total_steps:
                break
        epoch += 1
    metrics.update(train_seconds=time.time() - t0, skipped_updates=skipped)
    end = evaluate(engine, eval_loader, args, device, kinds)
    metrics.update(end)
    print_rank0("eval end | " + " | ".join(f"{k} {v:.4f}" for k, v in end.items()) + f" | train {metrics['train_seconds']:.0f}s")

    # ---- save: backbone + v_head, with the chosen-score statistics step 3 normalises rewards by
    stats = {"score_mean": end["score_mean"], "score_std": end["score_std"]}
    save_reward_model(engine.module, tokenizer, args.output_dir, stats=stats,
                      json_files={"args.json": {k: v for k, v in vars(args).items() if k != "split"}, "metrics.json": metrics})
    print_rank0(f"saved {args.output_dir}")


if __name__ == "__main__":
    common.run_cli(main)
