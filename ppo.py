"""Step 3: PPO with four models: actor (trained), reference (a frozen copy of the actor), critic (trained, initialised
from the reward model) and reward model (frozen), as in InstructGPT sec. 3.5 and Ziegler et al. 2019, with
DeepSpeed-Chat's flags and API (RLHFEngine, PPOTrainer).

    # tiny CPU smoke run on the built-in demo, from the step-1 and step-2 outputs
    python ppo.py --actor output/step1_sft --reward output/step2_reward --output_dir output/step3_ppo
    # 1 GPU
    deepspeed --num_gpus 1 ppo.py --actor out/sft --reward out/reward --data_path Dahoas/rm-static --dtype bf16 \
        --actor_learning_rate 9.65e-6 --critic_learning_rate 5e-6 --max_answer_seq_len 256 --enable_hybrid_engine \
        --output_dir out/ppo
    # 8 GPUs, actor ZeRO-3, critic ZeRO-2
    deepspeed --num_gpus 8 ppo.py --actor out/sft --reward out/reward --actor_zero_stage 3 --critic_zero_stage 2 ...

Batch hierarchy, per rank (global = per rank x ranks):
    rollout     = per_device_generation_batch_size x generation_batches prompts, one sampled response each
    micro-batch = per_device_training_batch_size sequences of the rollout
    an optimizer step every gradient_accumulation_steps micro-batches; ppo_epochs passes over each rollout
    one "step" = one rollout and the PPO epochs on it

Tensor names (B sequences, Tq query tokens left-padded, Tr response tokens, V vocabulary):
    query [B, Tq], response [B, Tr], mask [B, Tr] (1 up to and including the first EOS),
    logprobs / ref_logprobs / values / rewards / advantages / returns [B, Tr], scores [B].

Reading order: arguments; ALGO LOGIC (the formulas, the trainer, the loop in main); then plumbing (engines, EMA,
evaluation, checkpoints). A copier changes the ALGO LOGIC section.
"""

import argparse
import json
import os
import random
import shutil
import time

import torch
import torch.nn.functional as F

import common
import data
from common import UserError, print_rank0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Step 3: PPO", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # ---- PPO: the algorithm's knobs
    g = p.add_argument_group("PPO").add_argument
    g("--kl_coef", type=float, default=0.1, help="per-token KL penalty weight (initial value with --target_kl)")
    g("--kl_estimator", default="k1", choices=["k1", "k3"], help="k1 = log p - log p_ref; k3 = (r - 1) - log r")
    g("--target_kl", type=float, default=None, help="adaptive KL controller target (Ziegler et al. 2019); off if unset")
    g("--clip_reward_value", type=float, default=5.0, help="reward-model scores are clipped to +/- this")
    g("--normalize_reward", action=argparse.BooleanOptionalAction, default=True, help="standardise scores first")
    g("--missing_eos_penalty", type=float, default=1.0, help="subtracted from the score of a response without EOS")
    g("--whiten_rewards", action="store_true", help="whiten per-token rewards before GAE")
    g("--gamma", type=float, default=1.0, help="discount")
    g("--lam", type=float, default=0.95, help="GAE lambda")
    g("--cliprange", type=float, default=0.2, help="policy ratio clip")
    g("--cliprange_value", type=float, default=0.2, help="value clip around the rollout's values")
    g("--ppo_epochs", type=int, default=1, help="passes over each rollout (DeepSpeed-Chat: 1)")
    g("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use the same)")
    g("--top_p", type=float, default=1.0, help="nucleus sampling")
    g("--top_k", type=int, default=0, help="top-k sampling (0: off)")
    g("--unsup_coef", type=float, default=27.8, help="PPO-ptx: weight of the LM loss (InstructGPT's gamma)")
    g("--enable_ema", action="store_true", help="keep an EMA of the actor, saved as actor_ema/")
    # ---- batch sizes and schedule (the batch hierarchy above)
    g = p.add_argument_group("batch sizes and schedule").add_argument
    g("--per_device_generation_batch_size", type=int, default=64, help="prompts per generation batch per rank")
    g("--generation_batches", type=int, default=1, help="generation batches per rollout")
    g("--per_device_training_batch_size", type=int, default=32, help="sequences per micro-batch per rank")
    g("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g("--num_train_epochs", type=int, default=1, help="passes over the phase-3 prompts")
    g("--max_steps", type=int, default=0, help="stop after this many rollouts (0: --num_train_epochs)")
    g("--actor_learning_rate", type=float, default=1e-4, help="actor peak learning rate")
    g("--critic_learning_rate", type=float, default=1e-4, help="critic peak learning rate")
    g("--actor_weight_decay", type=float, default=0.0, help="actor AdamW weight decay")
    g("--critic_weight_decay", type=float, default=0.0, help="critic AdamW weight decay")
    g("--lr_scheduler_type", default="cosine", help="transformers scheduler: cosine, linear, constant, ...")
    g("--num_warmup_steps", type=int, default=0, help="linear warm-up optimizer steps")
    g("--seed", type=int, default=1234, help="data split, prompt order and sampling")
    # ---- data
    g = p.add_argument_group("data").add_argument
    g("--data_path", nargs="+", default=["builtin:sort"], help="dataset(s) whose phase-3 prompts are used")
    g("--data_split", default="2,4,4", help="proportions of each dataset for steps 1,2,3")
    g("--chat_template", action="store_true", help="the tokenizer's chat template (as in steps 1 and 2)")
    g("--data_output_path", default=os.path.join(common.tiny_cache_dir(), "data"), help="tokenised cache")
    g("--max_prompt_seq_len", type=int, default=256, help="longer prompts are dropped")
    g("--max_answer_seq_len", type=int, default=64, help="tokens generated at most per response")
    g("--unsupervised_dataset_name", default=None, help="PPO-ptx text: hub name, folder or a --data_path source")
    g("--unsupervised_dataset_config_name", default=None, help="its config name, e.g. wikitext-2-raw-v1")
    # ---- models and memory
    g = p.add_argument_group("models and memory").add_argument
    g("--actor", "--actor_model_name_or_path", dest="actor", required=True, help="step-1 output; also the reference")
    g("--reward", "--reward_model_name_or_path", dest="reward", required=True, help="step-2 output")
    g("--critic", "--critic_model_name_or_path", dest="critic", default=None, help="critic init (default: --reward)")
    g("--output_dir", required=True, help="actor/, critic/, metrics.json, generations, checkpoints/")
    g("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on a GPU, else fp32")
    g("--actor_zero_stage", type=int, default=0, help="actor ZeRO stage 0-3 (the reference: 3 if 3, else 0)")
    g("--critic_zero_stage", type=int, default=0, help="critic ZeRO stage 0-3 (the reward model: 3 if 3, else 0)")
    g("--offload", action="store_true", help="actor and critic optimizer state (and ZeRO-3 parameters) on the CPU")
    g("--offload_reference_model", action="store_true", help="reference model parameters on the CPU")
    g("--offload_reward_model", action="store_true", help="reward model parameters on the CPU")
    g("--actor_gradient_checkpointing", action="store_true", help="recompute actor activations to save memory")
    g("--critic_gradient_checkpointing", action="store_true", help="recompute critic activations to save memory")
    g("--actor_dropout", type=float, default=0.0, help="actor dropout (off: it biases the log-prob ratios)")
    g("--critic_dropout", type=float, default=0.0, help="critic dropout")
    g("--actor_lora_dim", type=int, default=0, help="actor LoRA rank (0: off)")
    g("--actor_lora_module_name", default=None, help="actor LoRA target (default: the family's decoder layers)")
    g("--critic_lora_dim", type=int, default=0, help="critic LoRA rank (0: off)")
    g("--critic_lora_module_name", default=None, help="critic LoRA target")
    g("--only_optimize_lora", action="store_true", help="train only LoRA weights (and the critic's v_head)")
    g("--actor_lora_learning_rate", type=float, default=5e-4, help="actor LoRA learning rate")
    g("--critic_lora_learning_rate", type=float, default=5e-4, help="critic LoRA learning rate")
    g("--enable_hybrid_engine", action="store_true", help="DeepSpeed hybrid engine for generation (or a fallback)")
    g("--unpin_actor_parameters", action="store_true", help="hybrid engine: do not pin actor parameters")
    g("--release_inference_cache", action="store_true", help="hybrid engine: free its cache after generation")
    g("--inference_tp_size", type=int, default=1, help="hybrid engine: tensor-parallel size (needs actor ZeRO-3)")
    g("--tp_gather_partition_size", type=int, default=8, help="hybrid engine: layers gathered at once for TP")
    # ---- evaluation, logging, checkpoints
    g = p.add_argument_group("evaluation, logging, checkpoints").add_argument
    g("--eval_interval", type=int, default=0, help="evaluate every N steps (0: at the start and end only)")
    g("--checkpoint_interval", type=int, default=0, help="save a resumable checkpoint every N steps (0: never)")
    g("--resume", action="store_true", help="continue from the latest checkpoint in --output_dir")
    g("--print_answers", action="store_true", help="print sample answers at every step")
    g("--print_answers_interval", type=int, default=20, help="print sample answers every N steps (0: never)")
    g("--enable_tensorboard", action="store_true", help="log to tensorboard through DeepSpeed's monitor")
    g("--tensorboard_path", default="step3_tensorboard", help="tensorboard folder")
    g("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (LOCAL_RANK is read instead)")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Everything that can be wrong with the arguments, found before any model or data is loaded."""
    common.check_zero_stage(args.actor_zero_stage, "--actor_zero_stage", args.offload)
    common.check_zero_stage(args.critic_zero_stage, "--critic_zero_stage", args.offload)
    args.dtype = common.check_dtype(args.dtype)
    args.split = data.parse_split(args.data_split)
    for path in args.data_path:
        data.resolve_source(path)
    sizes = ["per_device_generation_batch_size", "generation_batches", "per_device_training_batch_size"]
    sizes += ["gradient_accumulation_steps", "ppo_epochs", "max_prompt_seq_len", "max_answer_seq_len"]
    common.check_at_least_one(args, *sizes)
    rollout = args.per_device_generation_batch_size * args.generation_batches
    micro = args.per_device_training_batch_size * args.gradient_accumulation_steps
    if rollout % micro:
        raise UserError(
            f"--per_device_generation_batch_size x --generation_batches ({rollout}) must be a multiple of "
            f"--per_device_training_batch_size x --gradient_accumulation_steps ({micro})"
        )
    if args.inference_tp_size > 1 and args.actor_zero_stage != 3:
        raise UserError("--inference_tp_size > 1 needs --actor_zero_stage 3 (the hybrid engine splits ZeRO-3 shards)")
    if args.temperature <= 0:
        raise UserError(f"--temperature {args.temperature}: must be > 0")
    if args.only_optimize_lora and not (args.actor_lora_dim or args.critic_lora_dim):
        raise UserError("--only_optimize_lora needs --actor_lora_dim or --critic_lora_dim > 0")
    if args.resume and not latest_checkpoint(args.output_dir):
        raise UserError(f"--resume: no checkpoint in {os.path.join(args.output_dir, 'checkpoints')}")
    common.check_output_dir(args.output_dir)
    args.critic = args.critic or args.reward
    for flag, path in (("--actor", args.actor), ("--reward", args.reward), ("--critic", args.critic)):
        common.check_model_path(path, flag)
    data.check_same_template(args.chat_template, {"--actor": args.actor, "--reward": args.reward})


# ======================================================================================================================
# ALGO LOGIC: the formulas (tensors in, tensors out; the tests import them), the trainer, and the loop in main().
def logprobs_from_logits(logits, labels, temperature=1.0):
    """log pi(label) under softmax(logits / temperature), in fp32: logits [B, T, V], labels [B, T] -> [B, T]."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits, temperature=1.0):
    """Entropy of softmax(logits / temperature) at each position: [B, T, V] -> [B, T]."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_from_logits(logits, ref_logits, temperature=1.0):
    """Exact KL(pi || pi_ref) of the two next-token distributions at each position, always >= 0.
    logits, ref_logits [B, T, V] -> [B, T]."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    ref_logp = F.log_softmax(ref_logits.float() / temperature, dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def masked_mean(x, mask, dim=None):
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum() if dim is None else (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x, mask, unbiased=True):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    return var * n / (n - 1) if unbiased and n > 1 else var


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over masked entries; shift_mean=False keeps the mean (for rewards). Zero off the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def response_mask(response, eos_id):
    """1 on response tokens up to and including the first EOS, 0 after it: [B, Tr] -> [B, Tr].
    The EOS is an action too (in the mask), so the policy learns when to stop."""
    is_eos = (response == eos_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    return (~after_eos).long()


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Per-token KL(pi || pi_ref) estimate from samples of pi (Schulman, "Approximating KL divergence"):
    k1 = log p - log p_ref (unbiased, can be negative); k3 = (r - 1) - log r with r = p_ref / p (>= 0). [B, Tr]."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    return log_ratio


def shape_scores(raw_scores, has_eos, stats, clip_reward_value, missing_eos_penalty):
    """Reward-model scores as PPO's outcome reward: standardised by the reward model's chosen-score statistics
    (when `stats` is given), clipped to +/- clip_reward_value, then lowered by missing_eos_penalty for responses
    that never ended: after the clip, so a low score still feels the whole penalty. [B] float, [B] bool -> [B]."""
    scores = raw_scores if stats is None else (raw_scores - stats["score_mean"]) / max(stats["score_std"], 1e-6)
    return scores.clamp(-clip_reward_value, clip_reward_value) - missing_eos_penalty * (~has_eos).float()


def compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, estimator="k1"):
    """InstructGPT eq. 2 per token: r_t = -kl_coef * KL_t, plus the shaped score on the last response token (the
    EOS, or the last token when truncated), not one position later.
    scores [B]; logprobs, ref_logprobs, mask [B, Tr] -> rewards [B, Tr], kl [B, Tr]."""
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    last = common.last_token_index(mask)  # [B]: reads the mask, so right padding after the EOS is skipped
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens. Values and rewards
    after the end are zeroed, so the last real token bootstraps from 0.
    rewards, values, mask [B, Tr] -> advantages, returns [B, Tr]; returns = advantages + values."""
    values, rewards = values * mask, rewards * mask
    last_gae, out = torch.zeros_like(rewards[:, 0]), []
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        out.append(last_gae)
    advantages = torch.stack(out[::-1], 1) * mask
    return advantages, (advantages + values) * mask


def advantages_and_returns(rewards, values, mask, gamma, lam, whiten_rewards=False):
    """GAE over a whole rollout, advantages whitened over all its response tokens (as N+ and OpenRLHF do: a small
    generation batch whitened on its own would be rescaled differently). [B, Tr] -> advantages, returns [B, Tr]."""
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    return masked_whiten(advantages, mask), returns


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange):
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) as a loss to minimise: the masked mean over tokens of
    max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)). All [B, Tr].
    Returns loss, clipfrac (share of tokens where the clip is active), approx_kl (0.5 * E[log-ratio^2])."""
    log_ratio = (logprobs - old_logprobs) * mask  # masked before exp(): a padded slot's exp() could be inf, inf * 0 NaN
    ratio = log_ratio.exp()
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(loss1, loss2), mask)
    clipfrac = masked_mean((loss2 > loss1).float(), mask)
    return loss, clipfrac, 0.5 * masked_mean(log_ratio**2, mask)


def value_loss(values, old_values, returns, mask, cliprange_value):
    """Clipped value loss: 0.5 * masked mean of max((V - R)^2, (clip(V, V_old +/- eps) - R)^2). All [B, Tr].
    Returns loss, clipfrac."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    err1, err2 = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(err1, err2), mask), masked_mean((err2 > err1).float(), mask)


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant."""
    return (1 - masked_var(returns - values, mask) / (masked_var(returns, mask) + 1e-8)).item()


class AdaptiveKLController:
    """Ziegler et al. 2019, sec. 2.2: move kl_coef so that the observed KL tracks `target`.
    e_t = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e_t * n / horizon)."""

    def __init__(self, kl_coef, target=None, horizon=10000):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl, n_samples):
        if self.target:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_samples / self.horizon


def merge_experiences(exps, pad_id):
    """The generation batches of one rollout as one batch: query-side tensors [B, Tq] re-padded on the left,
    response-side tensors [B, Tr] on the right, per-sequence tensors [B] concatenated."""
    tq, tr = max(x["query"].shape[1] for x in exps), max(x["response"].shape[1] for x in exps)
    out = {}
    for key in (k for k, v in exps[0].items() if torch.is_tensor(v)):
        parts = [x[key] for x in exps]
        if parts[0].dim() == 2:
            left = key in ("query", "query_mask")
            fill = pad_id if key in ("query", "response") else 0
            parts = [F.pad(p, ((tq if left else tr) - p.shape[1], 0) if left else (0, tr - p.shape[1]), value=fill) for p in parts]
        out[key] = torch.cat(parts)
    return out


class PPOTrainer:
    """DeepSpeed-Chat's DeepSpeedPPOTrainer: generate_experience(prompt_batch) -> experience (responses, their
    log-probs, values and rewards); train_rlhf(exp) -> metrics of one PPO micro-batch for the actor and critic."""

    def __init__(self, engine, args):
        self.engine, self.args = engine, args
        self.tokenizer, self.device = engine.tokenizer, engine.device
        self.kl_ctl = AdaptiveKLController(args.kl_coef, args.target_kl)
        self.skipped = 0  # micro-batch updates dropped for a non-finite loss (or reward)

    def logits(self, engine, seq, attn, query_len):
        """Logits that predict each response token: [B, Tq + Tr, V] -> [B, Tr, V]. Position t predicts token t + 1,
        so the logits for response tokens Tq .. Tq + Tr - 1 sit at positions Tq - 1 .. Tq + Tr - 2."""
        pos = common.position_inputs(engine.module, attn)  # counted over real tokens: left padding changes nothing
        return engine(input_ids=seq, attention_mask=attn, use_cache=False, **pos).logits[:, query_len - 1 : -1]

    @torch.no_grad()
    def sample(self, query, query_mask, greedy=False):
        """Responses to left-padded queries [B, Tq]: response [B, Tr] (PAD after the first EOS) and its mask."""
        a, e, tok = self.args, self.engine, self.tokenizer
        e.actor.eval()
        sampling = {"do_sample": True, "temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k}
        with common.generation_model(e.actor, e.hybrid, a.actor_zero_stage == 3) as model:
            out = model.generate(
                input_ids=query, attention_mask=query_mask, max_new_tokens=a.max_answer_seq_len, synced_gpus=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **({"do_sample": False} if greedy else sampling),
            )
        response = out[:, query.shape[1] :]
        if response.shape[1] == 0:  # generate returned nothing new
            response = torch.full_like(query[:, :1], tok.eos_token_id)
        mask = response_mask(response, tok.eos_token_id)
        return response.masked_fill(mask == 0, tok.pad_token_id), mask

    @torch.no_grad()
    def score(self, query, query_mask, response, mask, full_kl=False):
        """logprobs, ref_logprobs, entropy, values [B, Tr] and raw reward-model scores [B]; with full_kl also the
        exact per-token KL to the reference [B, Tr] (evaluation)."""
        a, e = self.args, self.engine
        seq, attn = torch.cat([query, response], 1), torch.cat([query_mask, mask], 1)  # [B, Tq + Tr]
        tq = query.shape[1]
        logits, ref_logits = self.logits(e.actor, seq, attn, tq), self.logits(e.ref, seq, attn, tq)  # [B, Tr, V]
        e.critic.eval()
        out = {
            "logprobs": logprobs_from_logits(logits, response, a.temperature),
            "ref_logprobs": logprobs_from_logits(ref_logits, response, a.temperature),
            "entropy": entropy_from_logits(logits, a.temperature),
            "values": e.critic(seq, attn)[:, tq - 1 : -1] * mask,  # V(state before each response token)
            "scores": common.end_scores(e.reward(seq, attn), attn),  # read at the last real token: the EOS
        }
        if full_kl:
            out["kl"] = kl_from_logits(logits, ref_logits, a.temperature) * mask
        return out

    @torch.no_grad()
    def generate_experience(self, prompt_batch):
        """One generation batch of a rollout from left-padded prompts {input_ids, attention_mask}: sample responses,
        score them with all four models and compute the per-token rewards (advantages come once per rollout)."""
        a, tok = self.args, self.tokenizer
        query, query_mask = prompt_batch["input_ids"].to(self.device), prompt_batch["attention_mask"].to(self.device)
        t0 = time.time()
        response, mask = self.sample(query, query_mask)
        gen_seconds = time.time() - t0
        s = self.score(query, query_mask, response, mask)
        has_eos = ((response == tok.eos_token_id) & (mask == 1)).any(1)  # [B]
        stats = self.engine.reward_stats if a.normalize_reward else None
        scores = shape_scores(s["scores"], has_eos, stats, a.clip_reward_value, a.missing_eos_penalty)
        rewards, kl = compute_rewards(scores, s["logprobs"], s["ref_logprobs"], mask, self.kl_ctl.value, a.kl_estimator)
        exp = {"query": query, "query_mask": query_mask, "response": response, "mask": mask, "rewards": rewards}
        exp.update({k: s[k] for k in ("logprobs", "ref_logprobs", "values", "entropy", "scores")})
        return {**exp, "kl": kl.sum(1), "has_eos": has_eos, "gen_seconds": gen_seconds}

    def train_rlhf(self, exp, ptx_batch=None):
        """One PPO micro-batch: the clipped policy loss (+ unsup_coef x the LM loss with PPO-ptx) for the actor, the
        clipped value loss for the critic, one optimizer step each. Returns this micro-batch's metrics."""
        a, e = self.args, self.engine
        seq = torch.cat([exp["query"], exp["response"]], 1)
        attn = torch.cat([exp["query_mask"], exp["mask"]], 1)
        tq = exp["query"].shape[1]
        e.actor.train()
        logprobs = logprobs_from_logits(self.logits(e.actor, seq, attn, tq), exp["response"], a.temperature)
        actor_loss, clipfrac, approx_kl = policy_loss(logprobs, exp["logprobs"], exp["advantages"], exp["mask"], a.cliprange)
        loss, m = actor_loss, {}
        if ptx_batch is not None:
            ptx_loss = e.actor(input_ids=ptx_batch, labels=ptx_batch, use_cache=False).loss
            loss = loss + a.unsup_coef * ptx_loss
            m["ptx_loss"] = ptx_loss.item()
        boundary = e.actor.is_gradient_accumulation_boundary()  # read before step() advances the counter
        actor_ok = common.backward_step(e.actor, loss)  # a NaN reward arrives here as NaN advantages: skipped
        if e.ema is not None and boundary and actor_ok:
            e.ema.update(e.actor.module)
        e.critic.train()
        values = e.critic(seq, attn)[:, tq - 1 : -1]  # [B, Tr], aligned as in score()
        critic_loss, vf_clipfrac = value_loss(values, exp["values"], exp["returns"], exp["mask"], a.cliprange_value)
        critic_ok = common.backward_step(e.critic, critic_loss)
        self.skipped += (not actor_ok) + (not critic_ok)
        m.update(actor_loss=actor_loss.item(), critic_loss=critic_loss.item(), clipfrac=clipfrac.item())
        m.update(approx_kl=approx_kl.item(), vf_clipfrac=vf_clipfrac.item())
        m["explained_var"] = explained_variance(exp["values"], exp["returns"], exp["mask"])
        return m


def main(argv=None):
    args = parse_args(argv)
    device = common.init_distributed()
    common.set_seed(args.seed)
    tokenizer = common.load_tokenizer(args.actor, "--actor")

    # ---- data: phase-3 prompts of every --data_path (+ PPO-ptx text), before the models load
    (train_prompts, _, _), (eval_prompts, eval_texts, eval_refs) = data.build_prompts(args, tokenizer)
    ptx = data.build_ptx(args, tokenizer) if args.unsupervised_dataset_name else None
    eval_set = (eval_prompts, eval_texts, data.checker_for(args.data_path), eval_refs)

    # ---- batch hierarchy (module docstring)
    world, gen_bs, micro = common.world_size(), args.per_device_generation_batch_size, args.per_device_training_batch_size
    rollout = gen_bs * args.generation_batches  # sequences per rank per step
    updates_per_step = args.ppo_epochs * (rollout // micro) // args.gradient_accumulation_steps
    steps_per_epoch = len(train_prompts) // (rollout * world)
    if steps_per_epoch == 0:
        raise UserError(f"--data_path: {len(train_prompts)} phase-3 prompts are fewer than one rollout of {rollout * world}")
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
    print_rank0(
        f"ppo: actor {args.actor}, critic {args.critic}, reward {args.reward}; {len(train_prompts)} train / "
        f"{len(eval_prompts)} eval prompts; rollout {gen_bs} x {args.generation_batches} per rank x {world} ranks = "
        f"{rollout * world} sequences; micro-batch {micro} x accum {args.gradient_accumulation_steps}; "
        f"{args.ppo_epochs} PPO epochs = {updates_per_step} updates per step; {total_steps} steps; "
        f"zero actor {args.actor_zero_stage} / critic {args.critic_zero_stage}; {args.dtype}"
    )

    # ---- models: four engines; resume or evaluate the starting (SFT) policy
    engine = RLHFEngine(args.actor, args.critic, args.reward, tokenizer, args, total_steps * updates_per_step, device)
    trainer = PPOTrainer(engine, args)
    log = common.CSVLog(os.path.join(args.output_dir, "log.csv"), append=args.resume)
    state = load_checkpoint(engine, trainer, args) if args.resume else {"step": 0, "metrics_start": None}
    if state["metrics_start"] is None:
        start, records = evaluate(trainer, *eval_set)
        state["metrics_start"] = {f"{k}_start": v for k, v in start.items()}
        log.write(0, start)
        write_jsonl(os.path.join(args.output_dir, "eval_generations_start.jsonl"), records)
    print_rank0("eval start | " + " | ".join(f"{k} {v:.4f}" for k, v in state["metrics_start"].items()))

    # ---- loop: one step = one rollout of fresh samples, then ppo_epochs passes over it in micro-batches
    t_start = time.time()
    for step in range(state["step"], total_steps):
        t0 = time.time()
        mine = rollout_prompts(len(train_prompts), step, steps_per_epoch, rollout, args.seed)  # this rank's share
        chunks = [mine[g * gen_bs : (g + 1) * gen_bs] for g in range(args.generation_batches)]
        batches = [data.collate_prompts([{"prompt_ids": train_prompts[i]} for i in c], tokenizer.pad_token_id) for c in chunks]
        exps = [trainer.generate_experience(b) for b in batches]
        gen_seconds = sum(x["gen_seconds"] for x in exps)  # sampling only; scoring counts as neither
        exp = merge_experiences(exps, tokenizer.pad_token_id)  # the whole rollout: [rollout, ...]
        exp["advantages"], exp["returns"] = advantages_and_returns(
            exp["rewards"], exp["values"], exp["mask"], args.gamma, args.lam, args.whiten_rewards
        )
        t1 = time.time()
        stats = []
        for _ in range(args.ppo_epochs):
            for idx in torch.randperm(rollout).view(-1, micro):  # micro-batches in a fresh random order each epoch
                ptx_batch = None if ptx is None else ptx[torch.randint(len(ptx), (micro,))].to(device)
                stats.append(trainer.train_rlhf({k: v[idx] for k, v in exp.items()}, ptx_batch))
        m = rollout_metrics(exp, stats, trainer, device)
        trainer.kl_ctl.update(m["kl"], rollout * world)
        m.update(gen_seconds=gen_seconds, train_seconds=time.time() - t1, samples_per_s=rollout * world / (time.time() - t0))
        log_step(step + 1, total_steps, m, log, engine, trainer)
        if args.print_answers or (args.print_answers_interval and (step + 1) % args.print_answers_interval == 0):
            print_answers(exp, tokenizer)
        if args.eval_interval and (step + 1) % args.eval_interval == 0 and step + 1 < total_steps:
            mid, _ = evaluate(trainer, *eval_set)
            log.write(step + 1, mid)
            print_rank0(f"eval step {step + 1} | " + " | ".join(f"{k} {v:.4f}" for k, v in mid.items()))
        if args.checkpoint_interval and (step + 1) % args.checkpoint_interval == 0 and step + 1 < total_steps:
            save_checkpoint(engine, trainer, args, step + 1, state)

    # ---- final eval and save: actor (+ EMA) as HF causal-LM folders, critic as a reward-model folder
    end, records = evaluate(trainer, *eval_set)
    metrics = {**state["metrics_start"], **end, "train_seconds": time.time() - t_start, "steps": total_steps}
    metrics["skipped_updates"] = trainer.skipped
    log.write(total_steps, end)
    print_rank0("eval end | " + " | ".join(f"{k} {v:.4f}" for k, v in end.items()))
    write_jsonl(os.path.join(args.output_dir, "eval_generations.jsonl"), records)
    save_outputs(engine, tokenizer, args, metrics)
    print_rank0(f"saved {args.output_dir}")


# ======================================================================================================================
# Plumbing: the prompt order, per-step metrics and printing, the four engines, EMA, evaluation, outputs, checkpoints.
def rollout_prompts(n, step, steps_per_epoch, rollout, seed):
    """Indices of this rank's prompts for `step`: each epoch walks a fresh seeded permutation of the n prompts,
    rollout x world of them per step, and rank r takes every world-th of those."""
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    world = common.world_size()
    return order[within * rollout * world : (within + 1) * rollout * world][common.rank() :: world].tolist()


def rollout_metrics(exp, stats, trainer, device):
    """The step's console/log metrics: rollout figures plus the mean of the micro-batch metrics, averaged over ranks."""
    m = {
        "reward": exp["scores"].mean().item(),
        "kl": exp["kl"].mean().item(),
        "entropy": masked_mean(exp["entropy"], exp["mask"]).item(),
        "response_length": exp["mask"].sum(1).float().mean().item(),
        "eos_rate": exp["has_eos"].float().mean().item(),
        **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]},
        "kl_coef": trainer.kl_ctl.value,
        "skipped": trainer.skipped,
    }
    keys = sorted(m)
    return dict(zip(keys, [v / common.world_size() for v in common.all_reduce_sum([m[k] for k in keys], device)]))


def log_step(step, total_steps, m, log, engine, trainer):
    log.write(step, m)
    if engine.actor.monitor.enabled:
        engine.actor.monitor.write_events([(f"ppo/{k}", v, step) for k, v in m.items()])
    print_rank0(
        f"step {step}/{total_steps} | reward {m['reward']:.3f} | kl {m['kl']:.3f} | ent {m['entropy']:.3f} | "
        f"len {m['response_length']:.1f} | eos {m['eos_rate']:.2f} | clipfrac {m['clipfrac']:.3f} | "
        f"approx_kl {m['approx_kl']:.4f} | vf_loss {m['critic_loss']:.4f} | vf_clip {m['vf_clipfrac']:.3f} | "
        f"ev {m['explained_var']:.3f} | gen {m['gen_seconds']:.1f}s train {m['train_seconds']:.1f}s | "
        f"{m['samples_per_s']:.1f} samples/s" + (f" | skipped {trainer.skipped} non-finite updates" if trainer.skipped else "")
    )


def print_answers(exp, tokenizer):
    for j in range(min(3, len(exp["query"]))):
        q = tokenizer.decode(exp["query"][j][exp["query_mask"][j] == 1])
        r = tokenizer.decode(data.cut_at_eos(exp["response"][j].tolist(), tokenizer.eos_token_id), skip_special_tokens=True)
        print_rank0(f"    {q[-48:]!r:52} -> {r!r:28} score {exp['scores'][j].item():+.2f}")


class RLHFEngine:
    """DeepSpeed-Chat's DeepSpeedRLHFEngine: four DeepSpeed engines. The actor and critic are trained, each with its
    own ZeRO stage; the reference and reward models are frozen inference engines, ZeRO-3 sharded when their trained
    counterpart is ZeRO-3 or when offloaded to the CPU (DeepSpeed offloads parameters only under ZeRO-3)."""

    def __init__(self, actor, critic, reward, tokenizer, args, total_updates=1000, device=None):
        self.args, self.tokenizer, self.device = args, tokenizer, device or torch.device("cpu")
        self.total_updates = total_updates
        self.actor = self._init_actor(actor)
        ref = common.load_model(actor, tokenizer, dropout=0.0)
        self.ref = self._frozen(ref, args.actor_zero_stage, args.offload_reference_model)
        self.critic = self._init_critic(critic)
        reward_model, self.reward_stats = common.load_reward_model(reward, tokenizer, dropout=0.0)
        self.reward = self._frozen(reward_model, args.critic_zero_stage, args.offload_reward_model)
        self.ema = EMA(self.actor.module) if args.enable_ema else None

    def _train_cfg(self, stage):
        a = self.args
        board = (a.tensorboard_path, "step3_ppo") if a.enable_tensorboard else None
        return common.ds_config(stage, a.dtype, a.per_device_training_batch_size, a.gradient_accumulation_steps, a.offload, tensorboard=board)

    def _engine(self, model, cfg, lr, weight_decay, lora_lr):
        import deepspeed
        from transformers import get_scheduler

        optimizer = common.make_optimizer(model, lr, weight_decay, lora_lr, self.args.offload)
        scheduler = get_scheduler(self.args.lr_scheduler_type, optimizer, self.args.num_warmup_steps, self.total_updates)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg)
        return engine

    def _lora(self, model, dim, module_name, flag):
        if dim:
            common.convert_to_lora(model, module_name or common.default_lora_module(model), dim, flag)
            if self.args.only_optimize_lora:
                common.only_optimize_lora(model)

    def _init_actor(self, path):
        a = self.args
        cfg = self._train_cfg(a.actor_zero_stage)
        self.hybrid = a.enable_hybrid_engine and torch.cuda.is_available()
        if a.enable_hybrid_engine and not self.hybrid:
            print_rank0("warning: the hybrid engine needs a CUDA GPU; falling back to ZeRO-gathered generate")
        if self.hybrid:
            sizes = (a.max_prompt_seq_len + a.max_answer_seq_len, a.inference_tp_size, a.release_inference_cache)
            cfg["hybrid_engine"] = common.hybrid_engine_config(*sizes, not a.unpin_actor_parameters, a.tp_gather_partition_size)
        model = common.load_model(path, self.tokenizer, dropout=a.actor_dropout, zero_stage=a.actor_zero_stage, ds_cfg=cfg)
        self._lora(model, a.actor_lora_dim, a.actor_lora_module_name, "--actor_lora_module_name")
        if a.actor_gradient_checkpointing:
            model.gradient_checkpointing_enable()
        engine = self._engine(model, cfg, a.actor_learning_rate, a.actor_weight_decay, a.actor_lora_learning_rate)
        if self.hybrid:
            self.hybrid = common.probe_hybrid_engine(engine, self.tokenizer, self.device)
        return engine

    def _init_critic(self, path):
        a = self.args
        cfg = self._train_cfg(a.critic_zero_stage)
        model, _ = common.load_reward_model(path, self.tokenizer, a.critic_dropout, a.critic_zero_stage, cfg)
        self._lora(model.backbone, a.critic_lora_dim, a.critic_lora_module_name, "--critic_lora_module_name")
        if a.critic_gradient_checkpointing:
            model.backbone.gradient_checkpointing_enable()
        return self._engine(model, cfg, a.critic_learning_rate, a.critic_weight_decay, a.critic_lora_learning_rate)

    def _frozen(self, model, trained_stage, offload):
        import deepspeed

        model.requires_grad_(False)
        stage = 3 if trained_stage == 3 or offload else 0
        cfg = common.ds_config(stage, self.args.dtype, self.args.per_device_training_batch_size, offload=offload, train=False)
        engine, *_ = deepspeed.initialize(model=model, config=cfg)
        engine.eval()
        return engine


class EMA:
    """Exponential moving average of the actor's parameters, kept in fp32 on rank 0's CPU (DeepSpeed-Chat's
    --enable_ema, beta 0.992). Collective under ZeRO-3: call on every rank."""

    def __init__(self, module, beta=0.992):
        self.beta = beta
        params = common.gather_params(module)
        self.shadow = None if params is None else {k: v.float() for k, v in params.items()}

    def update(self, module):
        params = common.gather_params(module)
        if params is not None:
            for k, v in params.items():
                self.shadow[k].mul_(self.beta).add_(v.float(), alpha=1 - self.beta)

    def state_dict(self, module):
        """Saveable weights (rank 0; None elsewhere), cast back to the model's dtypes, LoRA fused."""
        if self.shadow is None:
            return None
        dtypes = {n: p.dtype for n, p in module.named_parameters()}
        return common.state_dict_from(module, {k: v.to(dtypes[k]) for k, v in self.shadow.items()})


@torch.no_grad()
def evaluate(trainer, prompts, texts, checker, references=None):
    """Greedy answers to held-out prompts: mean reward-model score, exact KL to the reference policy (summed over
    response tokens), response length, EOS rate; with a checker the ground-truth accuracy, and with reference answers
    too reward hacking: the share of wrong answers the reward model scores above the correct (reference) answer.
    Returns (metrics, records); records (all ranks' on each) hold prompt, response, score, kl, correct, reference_score."""
    import torch.distributed as dist

    a, tok, dev = trainer.args, trainer.tokenizer, trainer.device
    judge = checker is not None and references is not None
    totals, records = dict.fromkeys(["score", "kl", "length", "eos", "correct", "hacked", "n"], 0.0), []
    for idx in data.rank_batches(len(prompts), a.per_device_generation_batch_size):
        batch = data.collate_prompts([{"prompt_ids": prompts[i]} for i in idx or [0]], tok.pad_token_id)
        query, query_mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        response, mask = trainer.sample(query, query_mask, greedy=True)
        s = trainer.score(query, query_mask, response, mask, full_kl=True)
        has_eos = ((response == tok.eos_token_id) & (mask == 1)).any(1)
        if judge:  # prompt + reference answer + EOS, right-padded; scored at the last real token like any answer
            ids = [data.encode_pair(tok, texts[i], references[i], len(prompts[i]) + a.max_answer_seq_len)["input_ids"] for i in idx or [0]]
            ref_mask = data.pad([[1] * len(x) for x in ids], 0).to(dev)
            ref_scores = common.end_scores(trainer.engine.reward(data.pad(ids, tok.pad_token_id).to(dev), ref_mask), ref_mask)
        for j, i in enumerate(idx):
            text = tok.decode(data.cut_at_eos(response[j].tolist(), tok.eos_token_id), skip_special_tokens=True)
            rec = {"prompt": texts[i], "response": text, "score": s["scores"][j].item(), "kl": s["kl"][j].sum().item()}
            if checker is not None:
                rec["correct"] = bool(checker(texts[i], text))
            if judge:
                rec["reference_score"] = ref_scores[j].item()
                totals["hacked"] += not rec["correct"] and rec["score"] > rec["reference_score"]
            records.append(rec)
            totals["score"], totals["kl"], totals["n"] = totals["score"] + rec["score"], totals["kl"] + rec["kl"], totals["n"] + 1
            totals["length"] += mask[j].sum().item()
            totals["eos"] += has_eos[j].item()
            totals["correct"] += rec.get("correct", 0)
    totals = dict(zip(totals, common.all_reduce_sum(list(totals.values()), dev)))
    n = totals["n"]
    metrics = {"eval_reward": totals["score"] / n, "eval_kl": totals["kl"] / n}
    metrics.update(eval_response_length=totals["length"] / n, eval_eos_rate=totals["eos"] / n)
    if checker is not None:
        metrics["eval_accuracy"] = totals["correct"] / n
    if judge:
        metrics["eval_hacked"] = totals["hacked"] / n
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    return metrics, records


def write_jsonl(path, records):
    if common.rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(f"{path}.tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(f"{path}.tmp", path)


def save_outputs(engine, tokenizer, args, metrics):
    """actor/ (+ actor_ema/) as HF causal-LM folders, critic/ as a reward-model folder, args.json, metrics.json."""
    saved_args = {"args.json": {k: v for k, v in vars(args).items() if k != "split"}}
    common.save_hf(engine.actor.module, tokenizer, os.path.join(args.output_dir, "actor"), json_files=saved_args)
    if engine.ema is not None:
        ema = engine.ema.state_dict(engine.actor.module)
        common.save_hf(engine.actor.module, tokenizer, os.path.join(args.output_dir, "actor_ema"), saved_args, ema)
    common.save_reward_model(engine.critic.module, tokenizer, os.path.join(args.output_dir, "critic"), saved_args)
    if common.rank() == 0:
        common.write_json(os.path.join(args.output_dir, "args.json"), saved_args["args.json"])
        common.write_json(os.path.join(args.output_dir, "metrics.json"), metrics)


# ---- checkpoints: written beside, then renamed; `latest` names the newest complete one
def latest_checkpoint(output_dir):
    pointer = os.path.join(output_dir, "checkpoints", "latest")
    if not os.path.isfile(pointer):
        return None
    path = os.path.join(output_dir, "checkpoints", open(pointer).read().strip())
    return path if os.path.isdir(path) else None


def save_checkpoint(engine, trainer, args, step, state):
    """Resumable state after `step` rollouts: both engines (weights, optimizer, scheduler), EMA, each rank's RNG and
    our counters. Written to a temporary folder, renamed, then `latest` updated."""
    root = os.path.join(args.output_dir, "checkpoints")
    name, tmp = f"step_{step}", os.path.join(root, f".tmp_step_{step}")
    if common.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    common.barrier()
    engine.actor.save_checkpoint(tmp, tag="actor")
    engine.critic.save_checkpoint(tmp, tag="critic")
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(tmp, f"rng_rank{common.rank()}.pt"))
    if engine.ema is not None and common.rank() == 0:
        torch.save(engine.ema.shadow, os.path.join(tmp, "ema.pt"))
    common.barrier()
    if common.rank() == 0:
        counters = {"step": step, "kl_coef": trainer.kl_ctl.value, "skipped": trainer.skipped}
        common.write_json(os.path.join(tmp, "state.json"), {**state, **counters})
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)  # left by a crash before `latest` moved on
        os.replace(tmp, os.path.join(root, name))
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        for old in os.listdir(root):  # keep only the newest complete checkpoint
            if old.startswith("step_") and old != name:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    common.barrier()


def load_checkpoint(engine, trainer, args):
    """Restore what save_checkpoint wrote; returns the saved state ({"step", "metrics_start", ...})."""
    path = latest_checkpoint(args.output_dir)
    engine.actor.load_checkpoint(path, tag="actor")
    engine.critic.load_checkpoint(path, tag="critic")
    state = json.load(open(os.path.join(path, "state.json")))
    rng = torch.load(os.path.join(path, f"rng_rank{common.rank()}.pt"), weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    if engine.ema is not None and engine.ema.shadow is not None:
        engine.ema.shadow = torch.load(os.path.join(path, "ema.pt"))
    trainer.kl_ctl.value, trainer.skipped = state["kl_coef"], state.get("skipped", 0)
    print_rank0(f"resumed from {path} after step {state['step']}")
    return state


if __name__ == "__main__":
    common.run_cli(main)
