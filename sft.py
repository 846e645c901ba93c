"""Step 1: supervised fine-tuning of a causal LM on prompt/response demonstrations.

The loss is next-token cross-entropy on response tokens only (prompt and padding are labelled -100);
every response ends with the tokenizer's EOS, so the model learns to stop.

    # tiny CPU smoke run on the built-in demo (about 2 minutes on 2 cores)
    python sft.py --model_name_or_path tiny:gpt2 --data_path builtin:sort --output_dir output/step1_sft
    # 1 GPU
    deepspeed --num_gpus 1 sft.py --model_name_or_path facebook/opt-1.3b --data_path Dahoas/rm-static \
        --learning_rate 9.65e-6 --per_device_train_batch_size 8 --dtype bf16 --zero_stage 2 --output_dir out/sft
    # 8 GPUs, ZeRO-3
    deepspeed --num_gpus 8 sft.py --model_name_or_path facebook/opt-13b --data_path Dahoas/rm-static \
        --learning_rate 1e-4 --lora_dim 128 --dtype bf16 --zero_stage 3 --output_dir out/sft

Outputs in --output_dir: a Hugging Face model folder, args.json, metrics.json.
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

import common
import data
from common import UserError, print_rank0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Step 1: supervised fine-tuning", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", required=True, help="hub name, local HF folder, or tiny:<model_type>")
    p.add_argument("--data_path", nargs="+", default=["builtin:sort"], help="dataset(s) to blend: hub name, local folder ending in one, local/jsonfile, builtin:sort")
    p.add_argument("--data_split", default="2,4,4", help="proportions of each dataset for steps 1,2,3")
    p.add_argument("--chat_template", action="store_true", help="render prompts with the tokenizer's chat template instead of \"Human: ... Assistant:\" (use the same in all three steps)")
    p.add_argument("--sft_only_data_path", nargs="*", default=[], help="datasets used in step 1 only (all of their rows)")
    p.add_argument("--data_output_path", default=os.path.join(common.tiny_cache_dir(), "data"), help="where the tokenised cache lives")
    p.add_argument("--output_dir", required=True, help="where the HF model folder, args.json and metrics.json go")
    p.add_argument("--per_device_train_batch_size", type=int, default=32, help="micro-batch per rank")
    p.add_argument("--per_device_eval_batch_size", type=int, default=16, help="eval micro-batch per rank")
    p.add_argument("--max_seq_len", type=int, default=512, help="prompt + response tokens (capped at the model's positions)")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases and norms)")
    p.add_argument("--num_train_epochs", type=int, default=8, help="passes over the phase-1 training data")
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
    p.add_argument("--only_optimize_lora", action="store_true", help="freeze everything but the LoRA weights")
    p.add_argument("--lora_learning_rate", type=float, default=5e-4, help="learning rate of the LoRA weights")
    p.add_argument("--train_on_prompt", action="store_true", help="also take the loss on prompt tokens")
    p.add_argument("--eval_interval", type=int, default=0, help="evaluate every N optimizer steps (0: start and end only)")
    p.add_argument("--eval_max_new_tokens", type=int, default=64, help="greedy answer length cap for the accuracy eval")
    p.add_argument("--enable_tensorboard", action="store_true", help="log to tensorboard through DeepSpeed's monitor")
    p.add_argument("--tensorboard_path", default="step1_tensorboard", help="tensorboard output folder")
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
    for path in args.data_path + args.sft_only_data_path:
        data.resolve_source(path)
    common.check_at_least_one(args, "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "max_seq_len")
    if args.only_optimize_lora and args.lora_dim == 0:
        raise UserError("--only_optimize_lora needs --lora_dim > 0")
    common.check_output_dir(args.output_dir)
    common.check_model_path(args.model_name_or_path)


def response_nll(logits, labels):
    """Summed next-token NLL over labelled tokens and their count. logits [B, T, V], labels [B, T]."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=data.IGNORE_INDEX, reduction="sum")
    return nll, (labels != data.IGNORE_INDEX).sum()


def build_data(args, tokenizer):
    """Tokenised phase-1 train/eval sets (rows keep their prompt for the accuracy check)."""
    chat = tokenizer if args.chat_template else None
    rows = data.phase_rows(args.data_path, args.split, 1, args.seed, chat_tokenizer=chat)
    for path in args.sft_only_data_path:
        rows["train"] += data.phase_rows([path], [1, 0, 0], 1, args.seed, chat_tokenizer=chat)["train"]
    encode = lambda r: {**data.encode_pair(tokenizer, r["prompt"], r["response"], args.max_seq_len, args.train_on_prompt), "prompt": r["prompt"]}  # noqa: E731
    return data.build_cached("sft", rows, tokenizer, args.data_output_path, encode,
                             max_seq_len=args.max_seq_len, train_on_prompt=args.train_on_prompt)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts, batch_size, max_new_tokens, device, zero3):
    """Greedy answers for this rank's share of `prompts` (lists of token ids) as {index: text}."""
    answers = {}
    for idx in data.rank_batches(len(prompts), batch_size):
        batch = data.collate_prompts([{"prompt_ids": prompts[i]} for i in idx or [0]], tokenizer.pad_token_id)
        out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, synced_gpus=zero3 and common.world_size() > 1)
        width = batch["input_ids"].shape[1]
        for i, row in zip(idx, out[:, width:].tolist()):
            answers[i] = tokenizer.decode(data.cut_at_eos(row, tokenizer.eos_token_id), skip_special_tokens=True)
    return answers


@torch.no_grad()
def evaluate(engine, loader, prompts, checker, tokenizer, args, device):
    """Perplexity over response tokens of the eval split; greedy accuracy when the data has a checker."""
    engine.eval()
    nll, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        s, n = response_nll(logits, batch["labels"])
        nll, count = nll + s.item(), count + n.item()
    nll, count = common.all_reduce_sum([nll, count], device)
    out = {"eval_loss": nll / count, "eval_perplexity": math.exp(min(nll / count, 50))}
    if checker is not None:
        answers = greedy_generate(engine.module, tokenizer, [tokenizer(p)["input_ids"] for p in prompts],
                                         args.per_device_eval_batch_size, args.eval_max_new_tokens, device, args.zero_stage == 3)
        hits = [checker(prompts[i], a) for i, a in answers.items()]
        correct, total = common.all_reduce_sum([sum(hits), len(hits)], device)
        out["eval_accuracy"] = correct / total
    engine.train()
    return out


def main(argv=None):
    args = parse_args(argv)
    device = common.init_distributed()
    common.set_seed(args.seed)
    import deepspeed
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import get_scheduler

    tokenizer = common.load_tokenizer(args.model_name_or_path)
    args.max_seq_len = common.cap_seq_len(args.model_name_or_path, args.max_seq_len)

    # ---- data: phase 1 of every --data_path (plus --sft_only_data_path), before the model loads
    sets = build_data(args, tokenizer)
    collate = lambda b: data.collate_sft(b, tokenizer.pad_token_id)  # noqa: E731
    cols = ["input_ids", "labels"]
    train_set, eval_set = sets["train"].select_columns(cols), sets["eval"].select_columns(cols)
    sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=args.per_device_train_batch_size, sampler=sampler, collate_fn=collate)
    eval_loader = DataLoader(eval_set, batch_size=args.per_device_eval_batch_size, collate_fn=collate,
                             sampler=DistributedSampler(eval_set, shuffle=False))
    checker = data.checker_for(args.data_path)
    eval_prompts = sets["eval"]["prompt"] if checker else []

    # ---- batch hierarchy: micro-batch per rank x accumulation x ranks = global batch per optimizer step
    world = common.world_size()
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
    print_rank0(f"sft: model {args.model_name_or_path}, data {' '.join(args.data_path)}: {len(train_set)} train / {len(eval_set)} eval rows, "
                f"micro-batch {args.per_device_train_batch_size} x accum {args.gradient_accumulation_steps} x ranks {world} "
                f"= global batch {global_batch}, {total_steps} steps, zero {args.zero_stage}, {args.dtype}")

    # ---- model: LoRA, optimizer, schedule, DeepSpeed engine
    ds_cfg = common.ds_config(args.zero_stage, args.dtype, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                              args.offload, tensorboard=(args.tensorboard_path, "step1_sft") if args.enable_tensorboard else None)
    model = common.load_model(args.model_name_or_path, tokenizer, dropout=args.dropout, zero_stage=args.zero_stage, ds_cfg=ds_cfg)
    if args.lora_dim > 0:
        common.convert_to_lora(model, args.lora_module_name or common.default_lora_module(model), args.lora_dim)
        if args.only_optimize_lora:
            common.only_optimize_lora(model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = common.make_optimizer(model, args.learning_rate, args.weight_decay, args.lora_learning_rate, args.offload)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps, total_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    log = common.CSVLog(os.path.join(args.output_dir, "log.csv"))

    # ---- loop
    metrics = {f"{k}_start": v for k, v in evaluate(engine, eval_loader, eval_prompts, checker, tokenizer, args, device).items()}
    print_rank0("eval start | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    log_every = 1 if args.print_loss else max(1, total_steps // 20)
    step, epoch, t0, seen, skipped = 0, 0, time.time(), 0, 0
    engine.train()
    while step < total_steps:
        sampler.set_epoch(epoch)
        for batch in train_loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch, use_cache=False).loss
            boundary = engine.is_gradient_accumulation_boundary()  # read before step() advances the counter
            if not common.backward_step(engine, loss):
                skipped += 1
                continue
            seen += batch["input_ids"].shape[0] * world
            if not boundary:
                continue
            step += 1
            if step % log_every == 0 or step == total_steps:
                lr = engine.get_lr()[0]
                print_rank0(f"step {step}/{total_steps} | loss {loss.item():.4f} | lr {lr:.2e} | {seen / (time.time() - t0):.1f} samples/s")
                log.write(step, {"loss": loss.item(), "lr": lr, "skipped": skipped})
                if engine.monitor.enabled:
                    engine.monitor.write_events([("train/loss", loss.item(), step), ("train/lr", lr, step)])
            if args.eval_interval and step % args.eval_interval == 0 and step < total_steps:
                mid = evaluate(engine, eval_loader, eval_prompts, checker, tokenizer, args, device)
                log.write(step, mid)
                print_rank0(f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in mid.items()))
            if step >= total_steps:
                break
        epoch += 1
    metrics.update(train_seconds=time.time() - t0, skipped_updates=skipped)
    end = evaluate(engine, eval_loader, eval_prompts, checker, tokenizer, args, device)
    metrics.update(end)
    print_rank0("eval end | " + " | ".join(f"{k} {v:.4f}" for k, v in end.items()) + f" | train {metrics['train_seconds']:.0f}s")

    # ---- save: HF folder (ZeRO-3 gathered, LoRA fused) + args + metrics
    common.save_hf(engine.module, tokenizer, args.output_dir,
                   json_files={"args.json": {k: v for k, v in vars(args).items() if k != "split"}, "metrics.json": metrics})
    print_rank0(f"saved {args.output_dir}")


if __name__ == "__main__":
    common.run_cli(main)
