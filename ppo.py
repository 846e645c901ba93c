"""Step 3: PPO with four models: actor (trained), reference (a frozen copy of the actor), critic (trained, initialised
from the reward model) and reward model (frozen), as in InstructGPT sec. 3.5 and Ziegler et al. 2019, with
DeepSpeed-Chat's flags and API (RLHFEngine, PPOTrainer); or critic-free estimators and programmatic rewards.

    python train.py   # the demo: steps 1-3 on CPU at its recipe (builtin.DEMO_RECIPE); the defaults are for real models
    python ppo.py --actor out/sft --reward_fn checker --advantage_estimator grpo --n_samples_per_prompt 4 ...
    deepspeed --num_gpus 8 ppo.py --actor out/sft --reward out/reward --actor_zero_stage 3 --enable_hybrid_engine ...

Batch hierarchy, per rank (global = per rank x ranks): a rollout is per_device_generation_batch_size x
generation_batches prompts, n_samples_per_prompt sampled responses each; it is trained on for ppo_epochs passes in
micro-batches of per_device_training_batch_size sequences, an optimizer step every gradient_accumulation_steps
micro-batches. One "step" is one rollout and the PPO epochs on it.

Tensors (B sequences, Tq query tokens left-padded, Tr response tokens, V vocabulary): query [B, Tq], response [B, Tr],
mask [B, Tr] (1 up to and including the first EOS), logprobs, ref_logprobs, values, rewards, advantages, returns
[B, Tr], scores [B]. Reading order: arguments, ALGO LOGIC (formulas, trainer, the loop in main), plumbing.
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
from common import UserError, print_rank0
from models import entropy_from_logits, kl_from_logits, logprobs_from_logits

ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
GROUP = {"grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm", "rloo": "token-mean"}  # and its loss mode
ROLES = ("actor", "critic", "ref", "reward")  # the four models; each may load in 4 bits
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Step 3: PPO", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # ---- PPO: the algorithm's knobs
    g = p.add_argument_group("PPO").add_argument
    g("--advantage_estimator", default="gae", choices=ESTIMATORS, help="gae uses the critic; the rest are critic-free")
    g("--n_samples_per_prompt", type=int, default=1, help="responses per prompt, a group (>= 2 for grpo, rloo)")
    g("--reward_fn", default=None, help="instead of --reward: checker (the data's) or file.py:fn(prompts, responses)")
    g("--kl_coef", type=float, default=0.2, help="per-token KL penalty weight (start value with --target_kl)")
    g("--kl_estimator", default="k1", choices=["k1", "k3"], help="k1 = log p - log p_ref; k3 = (r - 1) - log r")
    g("--target_kl", type=float, default=None, help="adaptive KL controller target (Ziegler et al. 2019); off if unset")
    g("--clip_reward_value", type=float, default=5.0, help="reward-model scores are clipped to +/- this")
    g("--normalize_reward", action=argparse.BooleanOptionalAction, default=True, help="standardise scores first")
    g("--missing_eos_penalty", type=float, default=1.0, help="subtracted from the score of a response without EOS")
    g("--whiten_rewards", action="store_true", help="whiten per-token rewards before GAE")
    g("--kl_loss_coef", type=float, default=0.0, help="KL to the reference in the loss, by --kl_estimator (GRPO)")
    g("--entropy_coef", type=float, default=0.0, help="entropy bonus in the policy loss")
    g("--loss_agg_mode", default=None, choices=AGG_MODES, help="how token losses average (default: the estimator's)")
    g("--gamma", type=float, default=1.0, help="discount")
    g("--lam", type=float, default=0.95, help="GAE lambda")
    g("--cliprange", type=float, default=0.2, help="policy ratio clip (the lower one with --cliprange_high)")
    g("--cliprange_high", type=float, default=None, help="DAPO's clip-higher: the upper clip (default: --cliprange)")
    g("--importance_sampling_level", default="token", choices=["token", "sequence"], help="sequence: GSPO's ratio")
    g("--tis_cap", type=float, default=None, help="truncated importance sampling: min(pi_old / pi_sampler, this)")
    g("--dynamic_sampling", action="store_true", help="DAPO: drop groups of equal scores, sample more to refill")
    g("--dynamic_sampling_max_batches", type=int, default=4, help="extra generation batches per step at most")
    g("--overlong_buffer_len", type=int, default=0, help="DAPO's soft overlong penalty over the last N tokens (0: off)")
    g("--overlong_penalty_factor", type=float, default=1.0, help="its size at --max_answer_seq_len tokens")
    g("--cliprange_value", type=float, default=0.2, help="value clip around the rollout's values")
    g("--ppo_epochs", type=int, default=1, help="passes over each rollout (DeepSpeed-Chat: 1)")
    g("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use the same)")
    g("--top_p", type=float, default=1.0, help="nucleus sampling")
    g("--top_k", type=int, default=0, help="top-k sampling (0: off)")
    g("--unsup_coef", type=float, default=27.8, help="PPO-ptx: weight of the LM loss (InstructGPT's gamma)")
    g("--enable_ema", action="store_true", help="keep an EMA of the actor, saved as actor_ema/")
    # ---- batch sizes and schedule (the batch hierarchy above)
    g = p.add_argument_group("batch sizes and schedule").add_argument
    g("--per_device_generation_batch_size", type=int, default=16, help="prompts per generation batch per rank")
    g("--generation_batches", type=int, default=1, help="generation batches per rollout")
    g("--per_device_training_batch_size", type=int, default=16, help="sequences per micro-batch per rank")
    g("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g("--num_train_epochs", type=int, default=1, help="passes over the phase-3 prompts")
    g("--max_steps", type=int, default=0, help="stop after this many rollouts (0: --num_train_epochs)")
    g("--actor_learning_rate", type=float, default=9.65e-6, help="actor peak learning rate")
    g("--critic_learning_rate", type=float, default=5e-6, help="critic peak learning rate")
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
    g("--eos_token", default=None, help="the token that ends a response (default: the actor tokenizer's EOS)")
    g("--data_output_path", default=os.path.join(common.tiny_cache_dir(), "data"), help="tokenised cache")
    g("--max_prompt_seq_len", type=int, default=256, help="longer prompts are dropped")
    g("--max_answer_seq_len", type=int, default=256, help="tokens generated at most per response")
    g("--unsupervised_dataset_name", default=None, help="PPO-ptx text: hub name, folder or a --data_path source")
    g("--unsupervised_dataset_config_name", default=None, help="its config name, e.g. wikitext-2-raw-v1")
    # ---- models and memory
    g = p.add_argument_group("models and memory").add_argument
    g("--actor", "--actor_model_name_or_path", dest="actor", required=True, help="step-1 output; also the reference")
    g("--reward", "--reward_model_name_or_path", "--critic_model_name_or_path", dest="reward", default=None,
      help="step-2 output (or --reward_fn); DeepSpeed-Chat's --critic_model_name_or_path")  # fmt: skip
    g("--critic", default=None, help="critic init (default: the reward model, else the actor)")
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
    for role in ROLES:  # QLoRA: a trained one needs --<role>_lora_dim
        g(f"--{role}_load_in_4bit", action="store_true", help=f"the {role} model's base weights in 4 bits (QLoRA)")
    g("--bnb_4bit_quant_type", default="nf4", choices=["nf4", "fp4"], help="4-bit data type of the *_load_in_4bit")
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
    g("--report_to", nargs="+", default=["none"], choices=common.REPORT_TO, help="DeepSpeed monitors to log to")
    g("--enable_tensorboard", action="store_true", help="the same as --report_to tensorboard (DeepSpeed-Chat's flag)")
    g("--tensorboard_path", default="step3_tensorboard", help="folder of the tensorboard and csv logs")
    g("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (LOCAL_RANK is read instead)")
    common.add_compat_flags(p, 3)
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Everything that can be wrong with the arguments, found before any model or data is loaded."""
    common.note_compat_flags(args)
    args.max_steps = args.test_stop_step if args.enable_test_mode else args.max_steps  # DeepSpeed-Chat's CI mode
    common.check_zero_stage(args.actor_zero_stage, "--actor_zero_stage", args.offload)
    common.check_zero_stage(args.critic_zero_stage, "--critic_zero_stage", args.offload)
    args.dtype = common.check_dtype(args.dtype)
    common.check_report_to(args)
    args.split = data.parse_split(args.data_split)
    for path in args.data_path:
        sources.resolve_source(path)
    sizes = "per_device_generation_batch_size generation_batches n_samples_per_prompt per_device_training_batch_size"
    common.check_at_least_one(args, *sizes.split(), "gradient_accumulation_steps", "ppo_epochs", "max_answer_seq_len")
    common.check_at_least_one(args, "max_prompt_seq_len")
    rollout = args.per_device_generation_batch_size * args.generation_batches * args.n_samples_per_prompt
    if rollout % args.per_device_training_batch_size:
        what = f"--per_device_generation_batch_size x --generation_batches x --n_samples_per_prompt ({rollout})"
        raise UserError(f"{what} must be a multiple of --per_device_training_batch_size")
    micro_batches = args.ppo_epochs * rollout // args.per_device_training_batch_size  # per step; an update may span
    if args.checkpoint_interval * micro_batches % args.gradient_accumulation_steps:  # steps (DeepSpeed-Chat's 1 GPU)
        why = f"{micro_batches} micro-batches per step do not end a --gradient_accumulation_steps update"
        raise UserError(f"--checkpoint_interval {args.checkpoint_interval}: {why}; checkpoints need whole updates")
    if args.advantage_estimator in GROUP and args.n_samples_per_prompt < 2:
        raise UserError(f"--advantage_estimator {args.advantage_estimator}: needs --n_samples_per_prompt 2 or more")
    if args.dynamic_sampling and (args.advantage_estimator == "gae" or args.n_samples_per_prompt < 2):
        why = "needs groups: a critic-free --advantage_estimator and --n_samples_per_prompt 2 or more"
        raise UserError(f"--dynamic_sampling: {why} (a group of equal scores has no signal only then)")
    if (args.reward is None) == (args.reward_fn is None):
        raise UserError("--reward or --reward_fn: give exactly one (the reward model, or a function)")
    args.loss_agg_mode = args.loss_agg_mode or GROUP.get(args.advantage_estimator, "token-mean")
    if args.inference_tp_size > 1 and args.actor_zero_stage != 3:
        raise UserError("--inference_tp_size > 1 needs --actor_zero_stage 3 (the hybrid engine splits ZeRO-3 shards)")
    if args.temperature <= 0:
        raise UserError(f"--temperature {args.temperature}: must be > 0")
    if args.only_optimize_lora and not (args.actor_lora_dim or args.critic_lora_dim):
        raise UserError("--only_optimize_lora needs --actor_lora_dim or --critic_lora_dim > 0")
    for role in (r for r in ROLES if getattr(args, f"{r}_load_in_4bit")):  # frozen ones: ZeRO-0, no LoRA
        offload = {"ref": "offload_reference_model", "reward": "offload_reward_model"}.get(role, "")
        stage, dim = getattr(args, f"{role}_zero_stage", 0), getattr(args, f"{role}_lora_dim", None)
        offloaded = f"--{offload}" if getattr(args, offload, False) else None
        lora.check_4bit(f"--{role}_load_in_4bit", stage, f"--{role}_zero_stage", dim, f"--{role}_lora_dim", offloaded)
    if args.resume and not common.latest_checkpoint(os.path.join(args.output_dir, "checkpoints")):
        raise UserError(f"--resume: no checkpoint in {os.path.join(args.output_dir, 'checkpoints')}")
    common.check_output_dir(args.output_dir)
    args.critic = (args.critic or args.reward or args.actor) if args.advantage_estimator == "gae" else None
    paths = {"--actor": args.actor, "--reward": args.reward, "--critic": args.critic}
    for flag, path in ((f, p) for f, p in paths.items() if p):
        models.check_model_path(path, flag)
    for role, auto in (("actor", "AutoModelForCausalLM"), ("critic", "AutoModel")):  # before any weights load
        name, flag = getattr(args, f"{role}_lora_module_name"), f"--{role}_lora_module_name"
        if getattr(args, f"{role}_lora_dim") and getattr(args, role):
            lora.check_module_name(getattr(args, role), name, flag, auto)
    data.check_same_template(args.chat_template, {f: p for f, p in paths.items() if p})
    if args.reward_fn:
        sources.reward_function(args.reward_fn, args.data_path)


# ======================================================================================================================
# ALGO LOGIC: the formulas (tensors in, tensors out; the tests import them), the trainer, and the loop in main().
def masked_mean(x, mask, dim=None):
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum() if dim is None else (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x, mask, unbiased=True):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    return var * n / (n - 1) if unbiased and n > 1 else var


def masked_whiten(x, mask, shift_mean=True, distributed=False):
    """(x - mean) / std over masked entries (of every rank's x if distributed); shift_mean=False keeps the mean (for
    rewards). Zero off the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    if distributed and common.world_size() > 1:  # sums over every rank's entries
        sums = [(x * mask).sum().item(), (x * x * mask).sum().item(), mask.sum().item()]
        total, sq, n = common.all_reduce_sum(sums, x.device)
        mean, var = x.new_tensor(total / n), x.new_tensor((sq / n - (total / n) ** 2) * n / max(n - 1, 1))
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


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
    last = models.last_token_index(mask)  # [B]: reads the mask, so right padding after the EOS is skipped
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens; after the end everything
    is zeroed, so the last real token bootstraps from 0. [B, Tr] x 3 -> advantages, returns = advantages + values."""
    values, rewards = values * mask, rewards * mask
    last_gae, out = torch.zeros_like(rewards[:, 0]), []
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        out.append(last_gae)
    advantages = torch.stack(out[::-1], 1) * mask
    return advantages, (advantages + values) * mask


def group_advantages(rewards, k, estimator):
    """Critic-free outcome advantages within groups of k responses to one prompt (rows [i*k, (i+1)*k)): [B] -> [B].
    grpo: (R - mean) / std (Shao et al. 2024, DeepSeekMath sec. 4.1); dr_grpo: R - mean, no std (Liu et al. 2025,
    "Understanding R1-Zero-like training"); rloo: R - the mean of the other k - 1 (Ahmadian et al. 2024)."""
    r = rewards.view(-1, k)  # [groups, k]
    if estimator == "rloo":
        return (r - (r.sum(1, keepdim=True) - r) / (k - 1)).flatten()
    centred = r - r.mean(1, keepdim=True)
    return (centred / (r.std(1, keepdim=True) + 1e-6) if estimator == "grpo" else centred).flatten()


def tis_weights(logprobs, sampler_logprobs, mask, cap):
    """Truncated importance sampling (Yao et al. 2025; verl, OpenRLHF): min(pi_old / pi_sampler, cap) per token, when
    the distribution that sampled (the hybrid engine's kernels, cached decoding, top-k/top-p) is not the trainer's
    pi_old; computed in log space (never overflows), 1 off the mask. [B, Tr] x 3 -> [B, Tr]."""
    return ((logprobs - sampler_logprobs) * mask).clamp(max=math.log(cap)).exp()


def keep_groups(scores, k):
    """DAPO's dynamic sampling (Yu et al. 2025, sec. 3.2): False for the groups of k responses whose scores are all
    equal (all right or all wrong: every advantage is 0, no signal). [B] -> [B // k] bool."""
    r = scores.view(-1, k)
    return (r != r[:, :1]).any(1)


def overlong_penalty(lengths, max_len, buffer):
    """DAPO's soft overlong punishment (Yu et al. 2025, sec. 3.4, eq. 13), a penalty in [-1, 0] instead of a cliff:
    0 up to max_len - buffer tokens, then falling linearly to -1 at max_len. lengths [B] -> [B]."""
    return ((max_len - buffer - lengths) / buffer).clamp(-1, 0)


def advantages_and_returns(rewards, values, mask, args):
    """Advantages [B, Tr] of a whole rollout and the critic's returns. gae: GAE, whitened over the rollout (as N+ and
    OpenRLHF); reinforce_pp (Hu 2025): discounted returns of the per-token rewards, whitened over the global batch;
    group estimators: each sequence's total reward (score - KL penalty) against its group's, on every response token."""
    if args.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    if args.advantage_estimator in GROUP:
        advantages = group_advantages(rewards.sum(1), args.n_samples_per_prompt, args.advantage_estimator)
        return advantages[:, None] * mask, advantages[:, None] * mask  # no critic: the returns go unused
    if args.advantage_estimator == "reinforce_pp":  # GAE with lam = 1 and no values is the discounted return
        returns, _ = gae(rewards, torch.zeros_like(rewards), mask, args.gamma, 1.0)
        return masked_whiten(returns, mask, distributed=True), returns
    advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
    return masked_whiten(advantages, mask), returns


def aggregate(loss, mask, mode, max_len):
    """Token losses [B, Tr] -> one number. token-mean: every token weighs the same; seq-mean-token-mean: every sequence
    (GRPO); seq-mean-token-sum-norm: token sums over a constant length, no length bias (Dr. GRPO)."""
    if mode == "seq-mean-token-mean":
        return masked_mean(loss, mask, dim=1).mean()
    if mode == "seq-mean-token-sum-norm":
        return (loss * mask).sum() / (mask.shape[0] * max_len)
    return masked_mean(loss, mask)


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange, agg="token-mean", max_len=None,
                cliprange_high=None, level="token", weights=None):  # fmt: skip
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) as a loss to minimise: max(-A * ratio, -A * clip(ratio,
    1 - eps, 1 + eps_high)) per token [B, Tr], averaged as `agg` says (aggregate). eps_high = cliprange_high: DAPO's
    clip-higher (Yu et al. 2025, sec. 3.1), room for unlikely tokens to rise. level "sequence": GSPO (Zheng et al.
    2025, eq. 7), one ratio per response, exp(mean log-ratio over its tokens), clipped per sequence. weights [B, Tr]:
    truncated importance sampling (TIS), min(pi_old / pi_sampler, C) per token, when the sampler is another function.
    Returns loss, clipfrac (share of tokens where the clip is active), approx_kl (0.5 * E[log-ratio^2])."""
    log_ratio = (logprobs - old_logprobs) * mask  # masked before exp(): a padded slot's exp() could be inf, inf * 0 NaN
    if level == "sequence":
        log_ratio = masked_mean(log_ratio, mask, dim=1)[:, None] * mask  # [B] -> every token of its sequence
    ratio = log_ratio.exp()
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1 - cliprange, 1 + (cliprange if cliprange_high is None else cliprange_high))
    loss = aggregate(torch.max(loss1, loss2) * (1 if weights is None else weights), mask, agg, max_len)
    clipfrac = masked_mean((loss2 > loss1).float(), mask)
    return loss, clipfrac, 0.5 * masked_mean(log_ratio**2, mask)


def value_loss(values, old_values, returns, mask, cliprange_value):
    """Clipped value loss: 0.5 * masked mean of max((V - R)^2, (clip(V, V_old +/- eps) - R)^2). [B, Tr] -> loss,
    clipfrac."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    err1, err2 = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(err1, err2), mask), masked_mean((err2 > err1).float(), mask)


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant."""
    return (1 - masked_var(returns - values, mask) / (masked_var(returns, mask) + 1e-8)).item()


def adaptive_kl_coef(kl_coef, kl, target, n_samples, horizon=10000):
    """Ziegler et al. 2019, sec. 2.2: move kl_coef so that the observed KL tracks `target` (fixed without one):
    e = clip(KL / target - 1, -0.2, 0.2); kl_coef <- kl_coef * (1 + e * n / horizon)."""
    return kl_coef * (1 + min(max(kl / target - 1, -0.2), 0.2) * n_samples / horizon) if target else kl_coef


def merge_experiences(exps, pad_id):
    """The generation batches of a rollout as one: [B, Tq] re-padded on the left, [B, Tr] on the right, [B] joined."""
    tq, tr = max(x["query"].shape[1] for x in exps), max(x["response"].shape[1] for x in exps)
    out = {}
    for key in (k for k, v in exps[0].items() if torch.is_tensor(v)):
        parts = [x[key] for x in exps]
        if parts[0].dim() == 2:
            left, fill = key in ("query", "query_mask"), pad_id if key in ("query", "response") else 0
            parts = [F.pad(p, (tq - p.shape[1], 0) if left else (0, tr - p.shape[1]), value=fill) for p in parts]
        out[key] = torch.cat(parts)
    return out


class PPOTrainer:
    """DeepSpeed-Chat's DeepSpeedPPOTrainer: generate_experience(prompt_batch) -> rollout experience; train_rlhf(exp)
    -> metrics of one PPO micro-batch (an update of the actor and of the critic)."""

    def __init__(self, engine, args):
        self.engine, self.args = engine, args
        self.tokenizer, self.device = engine.tokenizer, engine.device
        self.kl_coef = args.kl_coef  # moved by adaptive_kl_coef when --target_kl is set
        self.skipped = 0  # micro-batch updates dropped for a non-finite loss (or reward)
        self.generate_kwargs = {}  # more generate() arguments: scripts/bench.py forces full-length answers

    @torch.no_grad()
    def sample(self, query, query_mask, greedy=False, sampler_logprobs=False):
        """Responses to left-padded queries [B, Tq]: response [B, Tr] (PAD after the first EOS) and its mask; with
        sampler_logprobs also the log-probs of the sampled tokens under the distribution that drew them [B, Tr]."""
        a, e, tok = self.args, self.engine, self.tokenizer
        e.actor.eval()
        kw = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "do_sample": not greedy}
        if not greedy:
            kw.update(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k)
        if sampler_logprobs:  # the sampling distribution at each step: after temperature, top-k and top-p
            kw.update(return_dict_in_generate=True, output_scores=True)
        # the hybrid engine under ZeRO-3 gathers layer by layer (--unpin_actor_parameters): a rank done early must
        # keep forwarding until all are (DeepSpeed-Chat: synced_gpus=z3_enabled); the fallback generates gathered
        kw.update(self.generate_kwargs, synced_gpus=e.hybrid and a.actor_zero_stage == 3 and common.world_size() > 1)
        with common.generation_model(e.actor, e.hybrid, a.actor_zero_stage == 3) as model:
            out = model.generate(query, attention_mask=query_mask, max_new_tokens=a.max_answer_seq_len, **kw)
        e.actor.train()  # before scoring: the hybrid engine's eval mode runs inference kernels (their own positions,
        # LoRA fused), and old log-probs must come from training's forward (DeepSpeed-Chat: eval, generate, train)
        response = (out.sequences if sampler_logprobs else out)[:, query.shape[1] :]
        if response.shape[1] == 0:  # generate returned nothing new
            response = torch.full_like(query[:, :1], tok.eos_token_id)
        mask = models.response_mask(response, tok.eos_token_id)
        if not sampler_logprobs:
            return response.masked_fill(mask == 0, tok.pad_token_id), mask
        logp = [F.log_softmax(s.float(), -1).gather(1, response[:, t, None])[:, 0] for t, s in enumerate(out.scores)]
        return response.masked_fill(mask == 0, tok.pad_token_id), mask, torch.stack(logp, 1).masked_fill(mask == 0, 0)

    @torch.no_grad()
    def score(self, query, query_mask, response, mask, instructions, full_kl=False):
        """logprobs, ref_logprobs, entropy, values [B, Tr] and raw scores [B] (the reward model's, or --reward_fn's on
        the decoded answers and `instructions`); with full_kl the exact per-token KL to the reference [B, Tr]."""
        a, e, tok = self.args, self.engine, self.tokenizer
        seq, attn = torch.cat([query, response], 1), torch.cat([query_mask, mask], 1)  # [B, Tq + Tr]
        tq, out = query.shape[1], {}
        logits = models.response_logits(e.actor, seq, attn, tq)  # [B, Tr, V]
        out["logprobs"] = logprobs_from_logits(logits, response, a.temperature)
        out["entropy"] = entropy_from_logits(logits, a.temperature)
        ref_logits = models.response_logits(e.ref, seq, attn, tq)
        out["ref_logprobs"] = logprobs_from_logits(ref_logits, response, a.temperature)
        if full_kl:
            out["kl"] = kl_from_logits(logits, ref_logits, a.temperature) * mask
        del logits, ref_logits  # [B, Tq + Tr, V] each: gone before the critic's and the reward model's passes
        if e.critic is not None:
            e.critic.eval()
        values = e.critic(seq, attn)[:, tq - 1 : -1] * mask if e.critic else torch.zeros_like(out["logprobs"])
        out["values"] = values  # V(state before each response token)
        if e.reward is not None:
            out["scores"] = models.end_scores(e.reward(seq, attn), attn)  # read at the last real token: the EOS
        else:
            answers = [data.decode_answer(tok, r) for r in response.tolist()]
            out["scores"] = torch.tensor(e.reward_fn(instructions, answers), dtype=torch.float, device=self.device)
        return out

    @torch.no_grad()
    def generate_experience(self, prompt_batch):
        """One generation batch of a rollout from left-padded prompts {input_ids, attention_mask, instructions}: sample
        --n_samples_per_prompt responses to each (a group: adjacent rows), score them, per-token rewards."""
        a, tok, k = self.args, self.tokenizer, self.args.n_samples_per_prompt
        repeat = lambda key: prompt_batch[key].repeat_interleave(k, 0).to(self.device)  # a group: k adjacent rows
        query, query_mask = repeat("input_ids"), repeat("attention_mask")
        t0 = time.time()
        response, mask, *sampler = self.sample(query, query_mask, sampler_logprobs=a.tis_cap is not None)
        gen_seconds = time.time() - t0
        s = self.score(query, query_mask, response, mask, [p for p in prompt_batch["instructions"] for _ in range(k)])
        has_eos = ((response == tok.eos_token_id) & (mask == 1)).any(1)  # [B]
        stats = self.engine.reward_stats if a.normalize_reward else None
        scores = shape_scores(s["scores"], has_eos, stats, a.clip_reward_value, a.missing_eos_penalty)
        if a.overlong_buffer_len:  # DAPO's soft length penalty, on top of the shaped score
            length = overlong_penalty(mask.sum(1), a.max_answer_seq_len, a.overlong_buffer_len)
            scores = scores + a.overlong_penalty_factor * length
        rewards, kl = compute_rewards(scores, s["logprobs"], s["ref_logprobs"], mask, self.kl_coef, a.kl_estimator)
        exp = {"query": query, "query_mask": query_mask, "response": response, "mask": mask, "rewards": rewards}
        exp.update({"sampler_logprobs": sampler[0]} if sampler else {})
        exp.update({k: s[k] for k in ("logprobs", "ref_logprobs", "values", "entropy", "scores")})
        return {**exp, "kl": kl.sum(1), "has_eos": has_eos, "gen_seconds": gen_seconds}

    def train_rlhf(self, exp, ptx_batch=None):
        """One PPO micro-batch: the clipped policy loss (+ unsup_coef x the LM loss with PPO-ptx) for the actor, the
        clipped value loss for the critic, one optimizer step each. Returns this micro-batch's metrics."""
        a, e, mask, tq = self.args, self.engine, exp["mask"], exp["query"].shape[1]
        seq, attn = torch.cat([exp["query"], exp["response"]], 1), torch.cat([exp["query_mask"], mask], 1)
        e.actor.train()
        logits, agg = models.response_logits(e.actor, seq, attn, tq), (a.loss_agg_mode, a.max_answer_seq_len)
        logprobs = logprobs_from_logits(logits, exp["response"], a.temperature)
        old = (exp["logprobs"], exp["advantages"], mask, a.cliprange)  # the rollout's log-probs and advantages
        weights = None if a.tis_cap is None else tis_weights(exp["logprobs"], exp["sampler_logprobs"], mask, a.tis_cap)
        knobs = dict(cliprange_high=a.cliprange_high, level=a.importance_sampling_level, weights=weights)
        actor_loss, clipfrac, approx_kl = policy_loss(logprobs, *old, *agg, **knobs)
        loss, m = actor_loss, {}
        if a.kl_loss_coef:  # GRPO's KL term: in the loss, estimated per token by --kl_estimator (k3 in the paper)
            kl_loss = aggregate(kl_penalty(logprobs, exp["ref_logprobs"], a.kl_estimator), mask, *agg)
            loss, m["kl_loss"] = loss + a.kl_loss_coef * kl_loss, kl_loss.item()
        if a.entropy_coef:  # an entropy bonus keeps exploring
            loss = loss - a.entropy_coef * aggregate(entropy_from_logits(logits, a.temperature), mask, *agg)
        if ptx_batch is not None:
            ptx_loss = e.actor(input_ids=ptx_batch, labels=ptx_batch, use_cache=False).loss
            loss = loss + a.unsup_coef * ptx_loss
            m["ptx_loss"] = ptx_loss.item()
        boundary = e.actor.is_gradient_accumulation_boundary()  # read before step() advances the counter
        actor_ok = common.backward_step(e.actor, loss)  # a NaN reward arrives here as NaN advantages: skipped
        if e.ema is not None and boundary and actor_ok:
            e.ema.update(e.actor.module)
        self.skipped += not actor_ok
        m.update(actor_loss=actor_loss.item(), clipfrac=clipfrac.item(), approx_kl=approx_kl.item())
        if e.critic is not None:
            e.critic.train()
            values = e.critic(seq, attn)[:, tq - 1 : -1]  # [B, Tr], aligned as in score()
            critic_loss, vf_clipfrac = value_loss(values, exp["values"], exp["returns"], mask, a.cliprange_value)
            self.skipped += not common.backward_step(e.critic, critic_loss)
            m.update(critic_loss=critic_loss.item(), vf_clipfrac=vf_clipfrac.item())
            m["explained_var"] = explained_variance(exp["values"], exp["returns"], mask)
        return m


def main(argv=None):
    args = parse_args(argv)
    device = common.init_distributed(args.seed)
    tokenizer = models.load_tokenizer(args.actor, "--actor", args.chat_template, args.eos_token, args.add_eot_token)

    # ---- data: phase-3 prompts of every --data_path (+ PPO-ptx text), before the models load
    train, held_out = data.build_prompts(args, tokenizer)  # {"ids", "texts", "references", "instructions"}
    ptx = data.build_ptx(args, tokenizer) if args.unsupervised_dataset_name else None
    eval_set = (held_out, sources.checker_for(args.data_path))
    out = lambda name: os.path.join(args.output_dir, name)
    pad, checkpoints = tokenizer.pad_token_id, out("checkpoints")

    # ---- batch hierarchy (module docstring)
    world, gen_bs, k = common.world_size(), args.per_device_generation_batch_size, args.n_samples_per_prompt
    micro, prompts = args.per_device_training_batch_size, gen_bs * args.generation_batches  # prompts per rank per step
    rollout = prompts * k  # sequences per rank per step
    micro_batches, accum = args.ppo_epochs * rollout // micro, args.gradient_accumulation_steps  # per step
    steps_per_epoch = len(train["ids"]) // (prompts * world)
    if steps_per_epoch == 0:
        raise UserError(f"--data_path: {len(train['ids'])} phase-3 prompts; one rollout needs {prompts * world}")
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
    reward = args.reward or f"--reward_fn {args.reward_fn}"
    n_models = f"{2 + bool(args.critic) + bool(args.reward)} models" + ("" if args.critic else " (critic-free)")
    print_rank0(
        f"ppo: {args.advantage_estimator}, {n_models}; actor {args.actor}, critic {args.critic}, reward {reward}; "
        f"{len(train['ids'])} train / {len(held_out['ids'])} eval prompts; rollout {gen_bs} x {args.generation_batches}"
        f" prompts x {k} samples per rank x {world} ranks = {rollout * world} sequences; micro-batch {micro} x accum "
        f"{accum}; {args.ppo_epochs} PPO epochs = {micro_batches / accum:g} updates per step; "
        f"{total_steps} steps; zero actor {args.actor_zero_stage} / critic {args.critic_zero_stage}; {args.dtype}"
    )

    # ---- models: four engines; resume or evaluate the starting (SFT) policy
    updates = total_steps * micro_batches // accum  # optimizer steps (the schedule's length)
    engine = RLHFEngine(args.actor, args.critic, args.reward, tokenizer, args, updates, device)
    trainer, engines = PPOTrainer(engine, args), {"actor": engine.actor, "critic": engine.critic}
    engines = {tag: e for tag, e in engines.items() if e is not None}
    log = common.CSVLog(out("log.csv"), append=args.resume, engine=engine.actor, group="ppo")
    state = {"step": 0, "metrics_start": None}
    if args.resume:  # engines, optimizers, RNG, EMA and our counters, as an uninterrupted run had them
        state = common.load_checkpoint(checkpoints, engines, engine.ema)
        trainer.kl_coef, trainer.skipped = state["kl_coef"], state["skipped"]
    if state["metrics_start"] is None:
        start, records = evaluate(trainer, *eval_set)
        state["metrics_start"] = {f"{k}_start": v for k, v in start.items()}
        log.write(0, start)
        common.write_json(out("eval_generations_start.jsonl"), records)
    print_rank0("eval start | " + " | ".join(f"{k} {v:.4f}" for k, v in state["metrics_start"].items()))

    # ---- loop: one step = one rollout of fresh samples, then ppo_epochs passes over it in micro-batches
    t_start = time.time()
    for step in range(state["step"], total_steps):
        t0 = time.time()
        # this rank's prompts: each epoch walks a fresh seeded permutation, rollout x world prompts per step
        epoch, within = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train["ids"]), generator=torch.Generator().manual_seed(args.seed + epoch))
        mine = order[within * prompts * world : (within + 1) * prompts * world][common.rank() :: world].tolist()
        chunks = [mine[g * gen_bs : (g + 1) * gen_bs] for g in range(args.generation_batches)]
        exps, m = [trainer.generate_experience(data.prompt_batch(train, chunk, pad)) for chunk in chunks], {}
        if args.dynamic_sampling:  # DAPO: groups of equal scores out, groups of fresh prompts in, as many sequences
            exps, m = refill_groups(trainer, exps, train, step)
        gen_seconds = sum(x["gen_seconds"] for x in exps)  # sampling only; scoring counts as neither
        exp = merge_experiences(exps, pad)  # the whole rollout: [rollout, ...]
        exp["advantages"], exp["returns"] = advantages_and_returns(exp["rewards"], exp["values"], exp["mask"], args)
        t1 = time.time()
        stats, ptx_rng = [], common.rank_generator(args.seed, step)
        for _ in range(args.ppo_epochs):
            for idx in torch.randperm(rollout).view(-1, micro):  # micro-batches in a fresh random order each epoch
                ptx_idx = None if ptx is None else torch.randint(len(ptx), (micro,), generator=ptx_rng)  # per rank
                ptx_batch = None if ptx is None else ptx[ptx_idx].to(device)
                stats.append(trainer.train_rlhf({k: v[idx] for k, v in exp.items()}, ptx_batch))
        m.update(reward=exp["scores"].mean().item(), kl=exp["kl"].mean().item(), kl_coef=trainer.kl_coef)
        m.update(entropy=masked_mean(exp["entropy"], exp["mask"]).item(), skipped=trainer.skipped)
        m.update(response_length=exp["mask"].sum(1).float().mean().item())
        m.update(eos_rate=exp["has_eos"].float().mean().item())
        m.update({k: sum(s[k] for s in stats) / len(stats) for k in stats[0]})  # the mean over micro-batches
        m = dict(zip(sorted(m), [v / world for v in common.all_reduce_sum([m[k] for k in sorted(m)], device)]))  # ranks
        trainer.kl_coef = adaptive_kl_coef(trainer.kl_coef, m["kl"], args.target_kl, rollout * world)
        m.update(gen_seconds=gen_seconds, train_seconds=time.time() - t1)
        m["samples_per_s"] = rollout * world / (time.time() - t0)
        show = args.print_answers or (args.print_answers_interval and (step + 1) % args.print_answers_interval == 0)
        log_step(step + 1, total_steps, m, log, engine, trainer, exp if show else None)
        if args.eval_interval and (step + 1) % args.eval_interval == 0 and step + 1 < total_steps:
            mid, _ = evaluate(trainer, *eval_set)
            log.write(step + 1, mid)
            print_rank0(f"eval step {step + 1} | " + " | ".join(f"{k} {v:.4f}" for k, v in mid.items()))
        if args.checkpoint_interval and (step + 1) % args.checkpoint_interval == 0 and step + 1 < total_steps:
            state.update(kl_coef=trainer.kl_coef, skipped=trainer.skipped)
            common.save_checkpoint(checkpoints, step + 1, engines, state, engine.ema)

    # ---- final eval and save: actor (+ EMA) as HF causal-LM folders, critic as a reward-model folder
    end, records = evaluate(trainer, *eval_set)
    metrics = {**state["metrics_start"], **end, "train_seconds": time.time() - t_start, "steps": total_steps}
    metrics["skipped_updates"] = trainer.skipped
    log.write(total_steps, end)
    print_rank0("eval end | " + " | ".join(f"{k} {v:.4f}" for k, v in end.items()))
    common.write_json(out("eval_generations.jsonl"), records)
    saved_args = {"args.json": {k: v for k, v in vars(args).items() if k != "split"}}  # HF folders + args + metrics
    common.save_hf(engine.actor.module, tokenizer, out("actor"), json_files=saved_args)
    if engine.ema is not None:
        ema = engine.ema.state_dict(engine.actor.module)
        common.save_hf(engine.actor.module, tokenizer, out("actor_ema"), saved_args, ema, gathered=True)
    if engine.critic is not None:
        models.save_reward_model(engine.critic.module, tokenizer, out("critic"), saved_args)
    common.write_json(out("args.json"), saved_args["args.json"])
    common.write_json(out("metrics.json"), metrics)
    print_rank0(f"saved {args.output_dir}")


# ======================================================================================================================
# Plumbing: per-step metrics and printing, the four engines, evaluation, outputs.
def refill_groups(trainer, exps, prompts, step):
    """DAPO's dynamic sampling (Yu et al. 2025, sec. 3.2) over a rollout's generation batches: the groups keep_groups
    drops are replaced by groups of fresh prompts (drawn at random, another stream on each rank) until the rollout is
    full again, after at most --dynamic_sampling_max_batches extra generation batches (dropped groups then fill what is
    left: the optimizer always sees as many sequences). Every rank samples while any rank is short: ZeRO-3 ranks
    generate together. Returns the batches and {"dropped_groups", "extra_batches"}."""
    a, k, need = trainer.args, trainer.args.n_samples_per_prompt, sum(len(x["scores"]) for x in exps)
    rng, kept, spare, m = common.rank_generator(a.seed + 1, step), [], [], {"dropped_groups": 0, "extra_batches": 0}
    rows = lambda x, keep: {key: v[keep] if torch.is_tensor(v) else v for key, v in x.items()}
    while True:
        for x in exps:
            keep = keep_groups(x["scores"], k).repeat_interleave(k)
            kept, spare = kept + [rows(x, keep)], spare + [{**rows(x, ~keep), "gen_seconds": 0.0}]
            m["dropped_groups"] += int((~keep).sum()) // k
        short = common.all_reduce_sum([float(sum(len(x["scores"]) for x in kept) < need)], trainer.device)[0]
        if not short or m["extra_batches"] == a.dynamic_sampling_max_batches:
            break
        idx = torch.randint(len(prompts["ids"]), (a.per_device_generation_batch_size,), generator=rng).tolist()
        exps = [trainer.generate_experience(data.prompt_batch(prompts, idx, trainer.tokenizer.pad_token_id))]
        m["extra_batches"] += 1
    out, n = [], 0
    for x in kept + spare:  # whole groups (every batch holds whole groups), as many sequences as before
        take = min(len(x["scores"]), need - n)
        out, n = out + ([rows(x, slice(0, take))] if take else []), n + take
    return out, m


def log_step(step, total_steps, m, log, engine, trainer, exp=None):
    """log.csv (and --report_to), one console line, and a few sample answers of `exp` when given."""
    log.write(step, m)
    skipped = f" | skipped {trainer.skipped} non-finite updates" if trainer.skipped else ""
    shown = [("reward", "reward", ".3f"), ("kl", "kl", ".3f"), ("ent", "entropy", ".3f")]  # (name, key, format)
    shown += [("len", "response_length", ".1f"), ("eos", "eos_rate", ".2f"), ("clipfrac", "clipfrac", ".3f")]
    shown += [("approx_kl", "approx_kl", ".4f"), ("vf_loss", "critic_loss", ".4f"), ("vf_clip", "vf_clipfrac", ".3f")]
    shown += [("ev", "explained_var", ".3f"), ("dropped", "dropped_groups", ".0f"), ("extra", "extra_batches", ".0f")]
    line = " | ".join(f"{name} {m[key]:{fmt}}" for name, key, fmt in shown if key in m)  # no critic: no vf_ figures
    times = f"gen {m['gen_seconds']:.1f}s train {m['train_seconds']:.1f}s | {m['samples_per_s']:.1f} samples/s"
    print_rank0(f"step {step}/{total_steps} | {line} | {times}{skipped}")
    tok = engine.tokenizer
    for j in range(min(3, len(exp["query"])) if exp is not None else 0):
        q = tok.decode(exp["query"][j][exp["query_mask"][j] == 1])
        r = data.decode_answer(tok, exp["response"][j].tolist())
        print_rank0(f"    {q[-48:]!r:52} -> {r!r:28} score {exp['scores'][j].item():+.2f}")


class RLHFEngine:
    """DeepSpeed-Chat's DeepSpeedRLHFEngine: the trained actor and critic, each with its ZeRO stage, and the frozen
    reference and reward model, ZeRO-3 sharded when their trained twin is or when offloaded (DeepSpeed's rule)."""

    def __init__(self, actor, critic, reward, tokenizer, args, total_updates=1000, device=None):
        a, self.args, self.tokenizer, self.device = args, args, tokenizer, device or torch.device("cpu")
        self.hybrid = a.enable_hybrid_engine and torch.cuda.is_available() and not a.actor_load_in_4bit
        why = "the hybrid engine needs a CUDA GPU and a 16/32-bit actor"
        if a.enable_hybrid_engine and not self.hybrid:
            print_rank0(f"warning: {why}; using ZeRO-gathered generate")
        cfg = self._train_cfg(a.actor_zero_stage)
        if self.hybrid:
            he = {"enabled": True, "max_out_tokens": a.max_prompt_seq_len + a.max_answer_seq_len}
            he.update(inference_tp_size=a.inference_tp_size, release_inference_cache=a.release_inference_cache)
            he.update(pin_parameters=not a.unpin_actor_parameters, tp_gather_partition_size=a.tp_gather_partition_size)
            cfg["hybrid_engine"] = he
        quant = {r: (a.bnb_4bit_quant_type, a.dtype) if getattr(a, f"{r}_load_in_4bit") else None for r in ROLES}
        kw = dict(dropout=a.actor_dropout, zero_stage=a.actor_zero_stage, ds_cfg=cfg, quant=quant["actor"])
        model = models.load_model(actor, tokenizer, **kw)
        self.actor = self._trained(model, model, cfg, total_updates, "actor")
        if self.hybrid:
            self.hybrid = common.probe_hybrid_engine(self.actor, tokenizer, self.device)
        stage, cfg = self._frozen_cfg(a.actor_zero_stage, a.offload_reference_model, quant["ref"])  # the actor, frozen
        ref = models.load_model(actor, tokenizer, dropout=0.0, zero_stage=stage, ds_cfg=cfg, quant=quant["ref"])
        self.ref = self._frozen(ref, cfg)
        self.critic = self.reward = self.reward_stats = None  # critic-free estimators have no critic
        if critic:
            cfg = self._train_cfg(a.critic_zero_stage, monitors=False)
            kw = dict(zero_stage=a.critic_zero_stage, ds_cfg=cfg, quant=quant["critic"], standardise=a.normalize_reward)
            model, _ = models.load_reward_model(critic, tokenizer, a.critic_dropout, **kw)
            self.critic = self._trained(model, model.backbone, cfg, total_updates, "critic")
        if reward:  # else --reward_fn scores the answers
            stage, cfg = self._frozen_cfg(a.critic_zero_stage, a.offload_reward_model, quant["reward"])
            model, self.reward_stats = models.load_reward_model(reward, tokenizer, 0.0, stage, cfg, quant["reward"])
            self.reward = self._frozen(model, cfg)
        self.reward_fn = sources.reward_function(a.reward_fn, a.data_path) if a.reward_fn else None
        self.ema = common.EMA(self.actor.module) if a.enable_ema else None

    def _train_cfg(self, stage, monitors=True):  # the actor's engine logs (--report_to) for the whole step
        a = self.args
        mon = common.monitors(a.report_to, a.tensorboard_path, "step3_ppo") if monitors else None
        micro, accum = a.per_device_training_batch_size, a.gradient_accumulation_steps
        return common.ds_config(stage, a.dtype, micro, accum, a.offload, monitors=mon)

    def _trained(self, model, backbone, cfg, total_updates, role):
        """LoRA, gradient checkpointing, optimizer and schedule for the actor or critic (flags --<role>_...)."""
        import deepspeed
        from transformers import get_scheduler

        a, flag = self.args, lambda name: getattr(self.args, f"{role}_{name}")
        if flag("lora_dim"):  # a 4-bit base cannot train: only LoRA (and the critic's v_head) does
            only = a.only_optimize_lora or flag("load_in_4bit")
            lora.add_lora(backbone, flag("lora_dim"), flag("lora_module_name"), only, f"--{role}_lora_module_name")
        if flag("gradient_checkpointing"):
            backbone.gradient_checkpointing_enable()
        lrs = (flag("learning_rate"), flag("weight_decay"), flag("lora_learning_rate"))
        optimizer = common.make_optimizer(model, *lrs, a.offload)
        scheduler = get_scheduler(a.lr_scheduler_type, optimizer, a.num_warmup_steps, total_updates)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg)
        return engine

    def _frozen_cfg(self, trained_stage, offload, quant):  # ZeRO-3 when its twin is or when offloaded; 4 bits: 0
        stage, a = 3 if (trained_stage == 3 or offload) and not quant else 0, self.args
        return stage, common.ds_config(stage, a.dtype, a.per_device_training_batch_size, offload=offload, train=False)

    def _frozen(self, model, cfg):  # loaded with cfg: ZeRO-3 shards it as it loads, never whole on one rank
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model.requires_grad_(False), config=cfg)
        engine.eval()
        return engine


@torch.no_grad()
def evaluate(trainer, held_out, checker):
    """Greedy answers to held-out prompts: mean score (reward model or --reward_fn), exact KL to the reference summed
    over the response, length, EOS rate; with a checker ground-truth accuracy, and with a reward model the share hacked
    (wrong, yet scored above the reference answer). Returns metrics and records (prompt, response, score, kl, ...)."""
    a, tok, dev = trainer.args, trainer.tokenizer, trainer.device
    prompts, texts, references = held_out["ids"], held_out["texts"], held_out["references"]
    judge = checker is not None and trainer.engine.reward is not None
    records = []
    for idx in data.rank_batches(len(prompts), a.per_device_generation_batch_size):
        batch = data.prompt_batch(held_out, idx or [0], tok.pad_token_id)  # a rank with none left runs a dummy prompt
        query, query_mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        response, mask = trainer.sample(query, query_mask, greedy=True)
        s = trainer.score(query, query_mask, response, mask, batch["instructions"], full_kl=True)
        has_eos = ((response == tok.eos_token_id) & (mask == 1)).any(1)
        if judge:  # prompt + reference answer + EOS, right-padded; scored at the last real token like any answer
            answer = lambda i: data.encode_response(tok, prompts[i], texts[i], references[i])[: a.max_answer_seq_len]
            ids = [prompts[i] + answer(i) for i in idx or [0]]
            ref = data.collate_sft([{"input_ids": x, "labels": x} for x in ids], tok.pad_token_id)  # right-padded
            ref_ids, ref_mask = ref["input_ids"].to(dev), ref["attention_mask"].to(dev)
            ref_scores = models.end_scores(trainer.engine.reward(ref_ids, ref_mask), ref_mask)
        for j, i in enumerate(idx):
            text = data.decode_answer(tok, response[j].tolist())
            rec = {"prompt": texts[i], "response": text, "score": s["scores"][j].item(), "kl": s["kl"][j].sum().item()}
            rec.update(response_length=mask[j].sum().item(), eos=has_eos[j].item())
            if checker is not None:
                rec["correct"] = bool(checker(texts[i], text))
            if judge:
                rec["reference_score"] = ref_scores[j].item()
                rec["hacked"] = not rec["correct"] and rec["score"] > rec["reference_score"]
            records.append(rec)
    records = common.gather_lists(records)  # every rank's, on every rank: the metrics are their means
    rename = {"score": "reward", "eos": "eos_rate", "correct": "accuracy"}  # record key -> metric, where they differ
    keys = [k for k in ("score", "kl", "response_length", "eos", "correct", "hacked") if k in records[0]]
    return {f"eval_{rename.get(k, k)}": sum(r[k] for r in records) / len(records) for k in keys}, records


if __name__ == "__main__":
    common.run_cli(main)
