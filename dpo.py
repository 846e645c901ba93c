"""Direct Preference Optimization (Rafailov et al. 2023), the one-file alternative to steps 2 + 3: the step-1 model
learns from step 2's pairs against a frozen copy of itself. A micro-batch is per_device_train_batch_size pairs per
rank (chosen and rejected in one forward pass); global = x accumulation x ranks. Outputs: an HF causal-LM folder,
args.json, metrics.json, log.csv, eval_generations(_start).jsonl (step 3's form).

    python train.py --algo dpo                                   # the demo, on CPU: step 1, then DPO at its recipe
    deepspeed --num_gpus 8 dpo.py --model_name_or_path out/sft --data_path Dahoas/rm-static --zero_stage 3 ..."""

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
from common import UserError, print_rank0

LOSSES, PAIR = ("sigmoid", "ipo", "hinge"), ("chosen", "rejected")


def parse_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description="DPO on preference pairs", formatter_class=fmt)
    # ---- DPO and training
    g = p.add_argument_group("DPO and training").add_argument
    g("--beta", type=float, default=0.1, help="strength of the implicit KL to the reference (Rafailov et al. 2023)")
    g("--loss_type", default="sigmoid", choices=LOSSES, help="sigmoid: DPO; ipo: Azar et al. 2023; hinge: SLiC")
    g("--label_smoothing", type=float, default=0.0, help="conservative DPO: the share of labels assumed flipped")
    g("--rpo_alpha", type=float, default=0.0, help="weight of the chosen answers' NLL (RPO, Pang et al. 2024)")
    g("--learning_rate", type=float, default=1e-6, help="peak learning rate (TRL's DPO default)")
    g("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases and norms)")
    g("--num_train_epochs", type=int, default=1, help="passes over the phase-2 pairs")
    g("--max_steps", type=int, default=0, help="optimizer steps; overrides --num_train_epochs when > 0")
    g("--per_device_train_batch_size", type=int, default=8, help="pairs per micro-batch per rank")
    g("--per_device_eval_batch_size", type=int, default=16, help="pairs (or prompts) per eval micro-batch per rank")
    g("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g("--lr_scheduler_type", default="cosine", help="transformers scheduler: linear, cosine, constant, ...")
    g("--num_warmup_steps", type=int, default=0, help="linear warm-up steps")
    g("--seed", type=int, default=1234, help="data split, shuffling and initialisation")
    # ---- data
    g = p.add_argument_group("data").add_argument
    g("--data_path", nargs="+", default=["builtin:sort"], help="dataset(s) with chosen/rejected pairs to blend")
    g("--data_split", default="2,4,4", help="proportions of each dataset for steps 1,2,3 (phase 2 is trained on)")
    g("--chat_template", action="store_true", help="the tokenizer's chat template (as in step 1)")
    g("--eos_token", default=None, help="the token that ends a response (default: the tokenizer's EOS)")
    g("--data_output_path", default=os.path.join(common.tiny_cache_dir(), "data"), help="tokenised cache")
    g("--max_seq_len", type=int, default=512, help="prompt + response tokens (capped at the model's positions)")
    g("--eval_max_new_tokens", type=int, default=64, help="greedy answer length cap for the accuracy eval")
    # ---- model and memory
    g = p.add_argument_group("model and memory").add_argument
    g("--model_name_or_path", required=True, help="the step-1 output (also the frozen reference)")
    g("--output_dir", required=True, help="where the HF model folder, args.json and metrics.json go")
    g("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on a GPU, else fp32")
    g("--zero_stage", type=int, default=0, help="ZeRO stage 0-3 (the reference: 3 if 3, else 0)")
    g("--offload", action="store_true", help="optimizer state (and ZeRO-3 parameters) on the CPU")
    g("--offload_reference_model", action="store_true", help="reference model parameters on the CPU")
    g("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    g("--dropout", type=float, default=0.0, help="dropout (off by default: it biases the log-prob ratios)")
    g("--lora_dim", type=int, default=0, help="LoRA rank (0: off)")
    g("--lora_module_name", default=None, help="LoRA target (default: the family's decoder layers)")
    g("--only_optimize_lora", action="store_true", help="train only the LoRA weights")
    g("--lora_learning_rate", type=float, default=5e-4, help="learning rate of the LoRA weights")
    g("--load_in_4bit", action="store_true", help="QLoRA: frozen base weights in 4 bits (bitsandbytes); needs LoRA")
    g("--bnb_4bit_quant_type", default="nf4", choices=["nf4", "fp4"], help="4-bit data type of --load_in_4bit")
    # ---- evaluation and logging
    g = p.add_argument_group("evaluation and logging").add_argument
    g("--eval_interval", type=int, default=0, help="evaluate every N optimizer steps (0: start and end only)")
    g("--report_to", nargs="+", default=["none"], choices=common.REPORT_TO, help="DeepSpeed monitors to log to")
    g("--enable_tensorboard", action="store_true", help="the same as --report_to tensorboard (DeepSpeed-Chat's flag)")
    g("--tensorboard_path", default="dpo_tensorboard", help="folder of the tensorboard and csv logs")
    g("--print_loss", action="store_true", help="print the loss at every step")
    g("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (LOCAL_RANK is read instead)")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Everything that can be wrong with the arguments, found before any model or data is loaded."""
    common.check_zero_stage(args.zero_stage, offload=args.offload)
    args.dtype = common.check_dtype(args.dtype)
    common.check_report_to(args)
    args.split = data.parse_split(args.data_split)
    for path in args.data_path:
        sources.resolve_source(path)
    sizes = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "max_seq_len")
    common.check_at_least_one(args, *sizes)
    if args.beta <= 0:
        raise UserError(f"--beta {args.beta}: must be > 0")
    if not 0 <= args.label_smoothing < 0.5:
        raise UserError(f"--label_smoothing {args.label_smoothing}: must be in [0, 0.5)")
    common.check_output_dir(args.output_dir)
    models.check_model_path(args.model_name_or_path)
    lora.check_flags(args, "--offload_reference_model" if args.offload_reference_model else None)  # of a 4-bit ref
    data.check_same_template(args.chat_template, {"--model_name_or_path": args.model_name_or_path})


# ======================================================================================================================
# ALGO LOGIC: the loss, the log-probabilities it compares, the data, the evaluation, and the loop in main().
def sequence_logprobs(logits, labels):
    """Summed log-probs of the labelled (response + EOS; not -100) tokens: logits [B, T, V], labels [B, T] -> [B]."""
    logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t + 1: [B, T-1]
    return (models.logprobs_from_logits(logits, labels.clamp(min=0)) * (labels != data.IGNORE_INDEX)).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid", label_smoothing=0.0):
    """Rafailov et al. 2023 eq. 7: -log sigmoid(beta h), h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
    averaged over pairs; label_smoothing e (conservative DPO): -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h);
    ipo (Azar et al. 2023, eq. 17): (h - 1 / (2 beta))^2; hinge (SLiC, Zhao et al. 2023): max(0, 1 - beta h).
    Inputs: [B] summed log-probs. Returns the loss and the implicit rewards beta * log-ratio of chosen, rejected [B]."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # [B]
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses.mean(), beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)


def nll_loss(policy_chosen, chosen_tokens):
    """RPO (Pang et al. 2024, eq. 3): -log pi(y_w) / |y_w|, averaged over pairs; keeps the chosen answers likely, which
    DPO alone may lower along with the rejected ones. policy_chosen: [B] summed log-probs; chosen_tokens: [B]."""
    return (-policy_chosen / chosen_tokens).mean()


def build_data(args, tokenizer):
    """Tokenised phase-2 pairs (the rows reward.py trains on), each answer with labels on its response + EOS only."""
    chat = tokenizer if args.chat_template else None
    rows = data.phase_rows(args.data_path, args.split, 2, args.seed, need="pairs", chat_tokenizer=chat)
    enc = lambda r: data.encode_row(tokenizer, r["prompt"], [r[k] for k in PAIR], args.max_seq_len)  # None: too long
    pairs = lambda e: {f"{k}_{x}": row[x] for k, row in zip(PAIR, e[0]) for x in ("input_ids", "labels")}
    encode = lambda r: (e := enc(r)) and {**pairs(e), "cut": e[1]}
    return data.build_cached("dpo", rows, tokenizer, args.data_output_path, encode, max_seq_len=args.max_seq_len)


def collate(batch, pad_id):
    """Chosen rows first, then rejected rows, right-padded: input_ids, labels, attention_mask [2B, T]."""
    rows = [{"input_ids": b[f"{k}_input_ids"], "labels": b[f"{k}_labels"]} for k in PAIR for b in batch]
    return data.collate_sft(rows, pad_id)


def pair_logprobs(engine, batch):
    """Summed response log-probs of the chosen and the rejected answers, one forward pass: ([B], [B])."""
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sequence_logprobs(logits, batch["labels"]).chunk(2)


@torch.no_grad()
def evaluate(engine, ref, batches, prompts, checker, tokenizer, args, device):
    """Eval pairs: loss, implicit reward accuracy (beta * log-ratio of chosen > rejected), rewards, margin; with a
    checker, greedy answers to step 3's held-out prompts: accuracy, exact KL to the reference, length, EOS rate."""
    engine.eval()
    loss_args, eos = (args.beta, args.loss_type, args.label_smoothing), tokenizer.eos_token_id
    sums = dict.fromkeys("loss correct chosen rejected pairs accuracy kl response_length eos_rate n".split(), 0.0)
    for batch, rows in batches():  # rows 0: a dummy batch (ZeRO-3 ranks forward together), not counted
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, chosen, rejected = dpo_loss(*pair_logprobs(engine, batch), *pair_logprobs(ref, batch), *loss_args)
        values = (loss * len(chosen), chosen > rejected, chosen, rejected, torch.ones_like(chosen))
        for key, value in zip(("loss", "correct", "chosen", "rejected", "pairs"), values if rows else ()):
            sums[key] += value.sum().item()
    records = []
    for idx in data.rank_batches(len(prompts["ids"]), args.per_device_eval_batch_size) if checker else []:
        batch = data.collate_prompts([prompts["ids"][i] for i in idx or [0]], tokenizer.pad_token_id)
        query, query_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        kw = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": eos, "max_new_tokens": args.eval_max_new_tokens}
        with common.generation_model(engine, False, args.zero_stage == 3) as model:  # ZeRO-3: gathered once
            response = model.generate(query, attention_mask=query_mask, do_sample=False, **kw)[:, query.shape[1] :]
        mask = models.response_mask(response, eos)  # [B, Tr]
        seq, attn, tq = torch.cat([query, response], 1), torch.cat([query_mask, mask], 1), query.shape[1]
        logits = [models.response_logits(m, seq, attn, tq) for m in (engine, ref)]  # positions as generate() counts
        kl = (models.kl_from_logits(*logits) * mask).sum(1)  # exact KL(pi || ref) per answer [B], a row at a time
        for j, i in enumerate(idx):
            text = data.decode_answer(tokenizer, response[j].tolist())
            right = bool(checker(prompts["texts"][i], text))
            records.append({"prompt": prompts["texts"][i], "response": text, "kl": kl[j].item(), "correct": right})
            values = (right, kl[j], mask[j].sum(), (response[j] == eos).any(), 1)
            for key, value in zip(("accuracy", "kl", "response_length", "eos_rate", "n"), values):
                sums[key] += float(value)
    s = dict(zip(sums, common.all_reduce_sum(list(sums.values()), device)))
    engine.train()
    out = {"eval_loss": s["loss"] / s["pairs"], "eval_reward_accuracy": s["correct"] / s["pairs"]}
    out.update(eval_chosen_reward=s["chosen"] / s["pairs"], eval_rejected_reward=s["rejected"] / s["pairs"])
    out["eval_margin"] = out["eval_chosen_reward"] - out["eval_rejected_reward"]
    greedy = ("accuracy", "kl", "response_length", "eos_rate")  # as step 3 names them
    out.update({f"eval_{k}": s[k] / s["n"] for k in greedy} if checker else {})
    return out, common.gather_lists(records)


def main(argv=None):
    args = parse_args(argv)
    device = common.init_distributed(args.seed)
    import deepspeed
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import get_scheduler

    path = args.model_name_or_path
    tokenizer = models.load_tokenizer(path, chat_template=args.chat_template, eos_token=args.eos_token)
    args.max_seq_len = models.cap_seq_len(path, args.max_seq_len)

    # ---- data: phase-2 pairs (as step 2) and, with a checker, step 3's held-out prompts; before the models load
    sets, checker = build_data(args, tokenizer), sources.checker_for(args.data_path)
    limits = {"actor": path, "max_prompt_seq_len": 256, "max_answer_seq_len": args.eval_max_new_tokens}  # as step 3
    prompts = data.build_prompts(argparse.Namespace(**vars(args), **limits), tokenizer)[1] if checker else None
    batches = lambda b: collate(b, tokenizer.pad_token_id)
    sampler = DistributedSampler(sets["train"], shuffle=True, seed=args.seed)
    train_loader = DataLoader(sets["train"], args.per_device_train_batch_size, sampler=sampler, collate_fn=batches)

    # ---- batch hierarchy: pairs per micro-batch per rank x accumulation x ranks = pairs per optimizer step
    world, micro, accum = common.world_size(), args.per_device_train_batch_size, args.gradient_accumulation_steps
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(len(train_loader) / accum) * args.num_train_epochs
    print_rank0(
        f"dpo ({args.loss_type}, beta {args.beta}) of {path} on {' '.join(args.data_path)}: {len(sets['train'])} "
        f"train / {len(sets['eval'])} eval pairs, micro-batch {micro} pairs x accum {accum} x ranks {world} = global "
        f"batch {micro * accum * world} pairs, {total_steps} steps, zero {args.zero_stage}, {args.dtype}"
    )

    # ---- models: the policy (LoRA, optimizer, schedule) and its frozen reference, ZeRO-3 sharded when the policy is
    mon = common.monitors(args.report_to, args.tensorboard_path, "dpo")
    ds_cfg = common.ds_config(args.zero_stage, args.dtype, micro, accum, args.offload, monitors=mon)
    quant = (args.bnb_4bit_quant_type, args.dtype) if args.load_in_4bit else None  # the reference: the same 4 bits
    model = models.load_model(path, tokenizer, "AutoModelForCausalLM", args.dropout, args.zero_stage, ds_cfg, quant)
    if args.lora_dim > 0:  # a 4-bit base cannot train: only LoRA does
        lora.add_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora or args.load_in_4bit)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    lrs = (args.learning_rate, args.weight_decay, args.lora_learning_rate)
    optimizer = common.make_optimizer(model, *lrs, args.offload)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps, total_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    ref_stage = 3 if args.zero_stage == 3 or args.offload_reference_model else 0  # sharded as it loads
    ref_cfg = common.ds_config(ref_stage, args.dtype, micro, offload=args.offload_reference_model, train=False)
    ref_model = models.load_model(path, tokenizer, "AutoModelForCausalLM", 0.0, ref_stage, ref_cfg, quant)
    ref, *_ = deepspeed.initialize(model=ref_model.requires_grad_(False), config=ref_cfg)
    ref.eval()
    log = common.CSVLog(os.path.join(args.output_dir, "log.csv"), engine=engine)
    eval_batches = lambda: data.eval_batches(sets["eval"], args.per_device_eval_batch_size, batches)
    eval_args = (engine, ref, eval_batches, prompts, checker, tokenizer, args, device)

    # ---- loop
    start, records = evaluate(*eval_args)
    metrics = {f"{k}_start": v for k, v in start.items()}
    common.write_json(os.path.join(args.output_dir, "eval_generations_start.jsonl"), records)  # [] without a checker
    print_rank0("eval start | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    log.write(0, start)
    log_every = 1 if args.print_loss else max(1, total_steps // 20)
    step, epoch, t0, seen, skipped = 0, 0, time.time(), 0, 0  # evaluate() left the engine in train mode
    while step < total_steps:
        sampler.set_epoch(epoch)
        for batch in train_loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                ref_logps = pair_logprobs(ref, batch)  # the frozen reference's: chosen [B], rejected [B]
            policy = pair_logprobs(engine, batch)
            loss, chosen, rejected = dpo_loss(*policy, *ref_logps, args.beta, args.loss_type, args.label_smoothing)
            if args.rpo_alpha:
                loss = loss + args.rpo_alpha * nll_loss(policy[0], (batch["labels"] != -100).sum(1).chunk(2)[0])
            boundary = engine.is_gradient_accumulation_boundary()  # read before step() advances the counter
            if not common.backward_step(engine, loss):
                skipped += 1
                continue
            seen += len(chosen) * world
            if not boundary:
                continue
            step += 1
            if step % log_every == 0 or step == total_steps:
                acc, margin = (chosen > rejected).float().mean().item(), (chosen - rejected).mean().item()
                speed = seen / (time.time() - t0)
                figures = {"loss": loss.item(), "reward_accuracy": acc, "margin": margin, "samples_per_s": speed}
                print_rank0(f"step {step}/{total_steps} | " + " | ".join(f"{k} {v:.4f}" for k, v in figures.items()))
                log.write(step, {**figures, "skipped": skipped})
            if args.eval_interval and step % args.eval_interval == 0 and step < total_steps:
                mid, _ = evaluate(*eval_args)
                log.write(step, mid)
                print_rank0(f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in mid.items()))
            if step >= total_steps:
                break
        epoch += 1
    metrics.update(train_seconds=time.time() - t0, skipped_updates=skipped)
    end, records = evaluate(*eval_args)
    metrics.update(end)
    log.write(total_steps, end)
    print_rank0("eval end | " + " | ".join(f"{k} {v:.4f}" for k, v in end.items()))

    # ---- save: HF folder (ZeRO-3 gathered, LoRA fused) + args + metrics + eval generations
    common.write_json(os.path.join(args.output_dir, "eval_generations.jsonl"), records)
    saved_args = {k: v for k, v in vars(args).items() if k != "split"}
    common.save_hf(engine.module, tokenizer, args.output_dir, {"args.json": saved_args, "metrics.json": metrics})
    print_rank0(f"saved {args.output_dir}")


if __name__ == "__main__":
    common.run_cli(main)
