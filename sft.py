"""Step 1: supervised fine-tuning of a causal LM on prompt/response demonstrations.

The loss is next-token cross-entropy on response tokens only (prompt and padding are labelled -100);
every response ends with the tokenizer's EOS, so the model learns to stop.

    # the built-in demo on CPU (about 4 minutes on 2 cores), at its recipe (builtin.DEMO_RECIPE; the defaults are for
    # real pretrained models)
    python sft.py --model_name_or_path tiny:gpt2 --learning_rate 5e-4 --num_train_epochs 20 \
        --per_device_train_batch_size 8 --output_dir output/step1_sft
    # 1 GPU
    deepspeed --num_gpus 1 sft.py --model_name_or_path facebook/opt-1.3b --data_path Dahoas/rm-static \
        --learning_rate 9.65e-6 --per_device_train_batch_size 8 --dtype bf16 --zero_stage 2 --output_dir out/sft
    # 8 GPUs, ZeRO-3
    deepspeed --num_gpus 8 sft.py --model_name_or_path facebook/opt-13b --data_path Dahoas/rm-static \
        --learning_rate 1e-4 --lora_dim 128 --dtype bf16 --zero_stage 3 --output_dir out/sft

Outputs in --output_dir: a Hugging Face model folder, args.json, metrics.json, log.csv.
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


def parse_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description="Step 1: supervised fine-tuning", formatter_class=fmt)
    # ---- training
    g = p.add_argument_group("training").add_argument
    g("--learning_rate", type=float, default=9.65e-6, help="peak learning rate")
    g("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases and norms)")
    g("--num_train_epochs", type=int, default=1, help="passes over the phase-1 training data")
    g("--max_steps", type=int, default=0, help="optimizer steps; overrides --num_train_epochs when > 0")
    g("--per_device_train_batch_size", type=int, default=8, help="micro-batch per rank")
    g("--per_device_eval_batch_size", type=int, default=16, help="eval micro-batch per rank")
    g("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g("--lr_scheduler_type", default="cosine", help="transformers scheduler: linear, cosine, constant, ...")
    g("--num_warmup_steps", type=int, default=0, help="linear warm-up steps")
    g("--train_on_prompt", action="store_true", help="also take the loss on prompt tokens")
    g("--seed", type=int, default=1234, help="data split, shuffling and initialisation")
    # ---- data
    g = p.add_argument_group("data").add_argument
    g(
        "--data_path",
        nargs="+",
        default=["builtin:sort"],
        help="dataset(s) to blend: hub name, folder, file, builtin:sort",
    )
    g("--data_split", default="2,4,4", help="proportions of each dataset for steps 1,2,3")
    g("--sft_only_data_path", nargs="*", default=[], help="datasets used in step 1 only (all of their rows)")
    g("--chat_template", action="store_true", help="the tokenizer's chat template (use the same in all steps)")
    g("--eos_token", default=None, help="the token that ends a response (default: the tokenizer's EOS)")
    g("--data_output_path", default=os.path.join(common.tiny_cache_dir(), "data"), help="tokenised cache")
    g("--max_seq_len", type=int, default=512, help="prompt + response tokens (capped at the model's positions)")
    # ---- model and memory
    g = p.add_argument_group("model and memory").add_argument
    g("--model_name_or_path", required=True, help="hub name, local HF folder, or tiny:<model_type>")
    g("--output_dir", required=True, help="where the HF model folder, args.json and metrics.json go")
    g("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on a GPU, else fp32")
    g("--zero_stage", type=int, default=0, help="ZeRO stage 0-3")
    g("--offload", action="store_true", help="optimizer state (and ZeRO-3 parameters) on the CPU")
    g("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    g("--dropout", type=float, default=None, help="dropout for every dropout site (default: the model's own)")
    g("--lora_dim", type=int, default=0, help="LoRA rank (0: off)")
    g("--lora_module_name", default=None, help="LoRA target (default: the family's decoder layers)")
    g("--only_optimize_lora", action="store_true", help="train only the LoRA weights")
    g("--lora_learning_rate", type=float, default=5e-4, help="learning rate of the LoRA weights")
    g("--load_in_4bit", action="store_true", help="QLoRA: frozen base weights in 4 bits (bitsandbytes); needs LoRA")
    g("--bnb_4bit_quant_type", default="nf4", choices=["nf4", "fp4"], help="4-bit data type of --load_in_4bit")
    # ---- evaluation and logging
    g = p.add_argument_group("evaluation and logging").add_argument
    g("--eval_interval", type=int, default=0, help="evaluate every N optimizer steps (0: start and end only)")
    g("--eval_max_new_tokens", type=int, default=64, help="greedy answer length cap for the accuracy eval")
    g("--report_to", nargs="+", default=["none"], choices=common.REPORT_TO, help="DeepSpeed monitors to log to")
    g("--enable_tensorboard", action="store_true", help="the same as --report_to tensorboard (DeepSpeed-Chat's flag)")
    g("--tensorboard_path", default="step1_tensorboard", help="folder of the tensorboard and csv logs")
    g("--print_loss", action="store_true", help="print the loss at every step")
    g("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (LOCAL_RANK is read instead)")
    common.add_compat_flags(p, 1)
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
    for path in args.data_path + args.sft_only_data_path:
        sources.resolve_source(path)
    common.check_at_least_one(
        args, "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "max_seq_len"
    )
    common.check_output_dir(args.output_dir)
    models.check_model_path(args.model_name_or_path)
    lora.check_flags(args)


# ======================================================================================================================
# ALGO LOGIC: the loss, the data it reads, the evaluation, and the loop in main().
def response_nll(logits, labels):
    """Summed next-token NLL over labelled tokens and their count. logits [B, T, V], labels [B, T]."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]  # position t predicts token t + 1: [B, T-1, V], [B, T-1]
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=data.IGNORE_INDEX, reduction="sum")
    return nll, (labels != data.IGNORE_INDEX).sum()


def build_data(args, tokenizer):
    """Tokenised phase-1 train/eval sets (rows keep their prompt for the accuracy check)."""
    chat = tokenizer if args.chat_template else None
    rows = data.phase_rows(args.data_path, args.split, 1, args.seed, chat_tokenizer=chat)
    for path in args.sft_only_data_path:
        rows["train"] += data.phase_rows([path], [1, 0, 0], 1, args.seed, chat_tokenizer=chat)["train"]

    def encode(r):  # None: the row does not fit (data.encode_row)
        enc = data.encode_row(tokenizer, r["prompt"], [r["response"]], args.max_seq_len, args.train_on_prompt)
        return enc and {**enc[0][0], "prompt": r["prompt"], "cut": enc[1]}

    lengths = {"max_seq_len": args.max_seq_len, "train_on_prompt": args.train_on_prompt}
    return data.build_cached("sft", rows, tokenizer, args.data_output_path, encode, **lengths)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts, batch_size, max_new_tokens, device, zero3):
    """Greedy answers for this rank's share of `prompts` (lists of token ids) as {index: text}."""
    answers = {}
    for idx in data.rank_batches(len(prompts), batch_size):
        batch = data.collate_prompts([prompts[i] for i in idx or [0]], tokenizer.pad_token_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        kw = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        kw["synced_gpus"] = zero3 and common.world_size() > 1
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, **kw)
        for i, row in zip(idx, out[:, ids.shape[1] :].tolist()):  # the generated tokens: [B, new]
            answers[i] = data.decode_answer(tokenizer, row)
    return answers


@torch.no_grad()
def evaluate(engine, batches, prompts, checker, tokenizer, args, device):
    """Perplexity over response tokens of the eval split; greedy accuracy when the data has a checker."""
    engine.eval()
    nll, count = 0.0, 0
    for batch, rows in batches():  # rows 0: a dummy batch (ZeRO-3 ranks forward together), not counted
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        s, n = response_nll(logits, batch["labels"])
        nll, count = nll + s.item() * (rows > 0), count + n.item() * (rows > 0)
    nll, count = common.all_reduce_sum([nll, count], device)
    out = {"eval_loss": nll / count, "eval_perplexity": math.exp(min(nll / count, 50))}
    if checker is not None:
        sizes = (args.per_device_eval_batch_size, args.eval_max_new_tokens, device, args.zero_stage == 3)
        answers = greedy_generate(engine.module, tokenizer, [data.encode_prompt(tokenizer, p) for p in prompts], *sizes)
        hits = [checker(prompts[i], a) for i, a in answers.items()]
        correct, total = common.all_reduce_sum([sum(hits), len(hits)], device)
        out["eval_accuracy"] = correct / total
    engine.train()
    return out


def main(argv=None):
    args = parse_args(argv)
    device = common.init_distributed(args.seed)
    import deepspeed
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import get_scheduler

    name, eos = args.model_name_or_path, (args.eos_token, args.add_eot_token)
    tokenizer = models.load_tokenizer(name, "--model_name_or_path", args.chat_template, *eos)
    args.max_seq_len = models.cap_seq_len(args.model_name_or_path, args.max_seq_len)

    # ---- data: phase 1 of every --data_path (plus --sft_only_data_path), before the model loads
    sets = build_data(args, tokenizer)
    collate = lambda b: data.collate_sft(b, tokenizer.pad_token_id)
    train_set, eval_set = (sets[part].select_columns(["input_ids", "labels"]) for part in ("train", "eval"))
    sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed)
    train_loader = DataLoader(train_set, args.per_device_train_batch_size, sampler=sampler, collate_fn=collate)
    eval_batches = lambda: data.eval_batches(eval_set, args.per_device_eval_batch_size, collate)
    checker = sources.checker_for(args.data_path)
    eval_prompts = sets["eval"]["prompt"] if checker else []

    # ---- batch hierarchy: micro-batch per rank x accumulation x ranks = global batch per optimizer step
    world, micro, accum = common.world_size(), args.per_device_train_batch_size, args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_loader) / accum)
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
    print_rank0(
        f"sft: model {args.model_name_or_path}, data {' '.join(args.data_path)}: {len(train_set)} train / "
        f"{len(eval_set)} eval rows, micro-batch {micro} x accum {accum} x ranks {world} = global batch "
        f"{micro * accum * world}, {total_steps} steps, zero {args.zero_stage}, {args.dtype}"
    )

    # ---- model: LoRA, optimizer, schedule, DeepSpeed engine
    mon = common.monitors(args.report_to, args.tensorboard_path, "step1_sft")
    ds_cfg = common.ds_config(args.zero_stage, args.dtype, micro, accum, args.offload, monitors=mon)
    quant = (args.bnb_4bit_quant_type, args.dtype) if args.load_in_4bit else None
    kw = dict(dropout=args.dropout, zero_stage=args.zero_stage, ds_cfg=ds_cfg, quant=quant)
    model = models.load_model(args.model_name_or_path, tokenizer, **kw)
    if args.lora_dim > 0:  # a 4-bit base cannot train: only LoRA does
        lora.add_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora or args.load_in_4bit)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    lrs = (args.learning_rate, args.weight_decay, args.lora_learning_rate)
    optimizer = common.make_optimizer(model, *lrs, args.offload)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps, total_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    log = common.CSVLog(os.path.join(args.output_dir, "log.csv"), engine=engine)
    eval_args = (engine, eval_batches, eval_prompts, checker, tokenizer, args, device)

    # ---- loop
    start = evaluate(*eval_args)
    metrics = {f"{k}_start": v for k, v in start.items()}
    log.write(0, start)
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
                speed = seen / (time.time() - t0)
                print_rank0(f"step {step}/{total_steps} | loss {loss.item():.4f} | lr {lr:.2e} | {speed:.1f} samples/s")
                log.write(step, {"loss": loss.item(), "lr": lr, "skipped": skipped})
            if args.eval_interval and step % args.eval_interval == 0 and step < total_steps:
                mid = evaluate(*eval_args)
                log.write(step, mid)
                print_rank0(f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in mid.items()))
            if step >= total_steps:
                break
        epoch += 1
    metrics.update(train_seconds=time.time() - t0, skipped_updates=skipped)
    end = evaluate(*eval_args)
    metrics.update(end)
    log.write(total_steps, end)
    print_rank0(
        "eval end | " + " | ".join(f"{k} {v:.4f}" for k, v in end.items()) + f" | train {metrics['train_seconds']:.0f}s"
    )

    # ---- save: HF folder (ZeRO-3 gathered, LoRA fused) + args + metrics
    saved_args = {k: v for k, v in vars(args).items() if k != "split"}
    common.save_hf(
        engine.module, tokenizer, args.output_dir, json_files={"args.json": saved_args, "metrics.json": metrics}
    )
    print_rank0(f"saved {args.output_dir}")


if __name__ == "__main__":
    common.run_cli(main)
