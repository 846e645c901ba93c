"""Shared plumbing, nothing of the algorithm: distributed setup, argument checks, the DeepSpeed config and monitors,
model loading (hub name, folder or tiny:<type>), the reward model, the optimizer, atomic saving, EMA, checkpoints, the
log, the hybrid-engine toggle (LoRA: lora.py; 4-bit: qlora.py). DeepSpeed is imported lazily: `--help` is instant."""

import contextlib
import importlib.util
import json
import os
import random
import shutil
import socket
import sys

import numpy as np
import torch

import builtin
import qlora


class UserError(Exception):
    """Bad input: reported by run_cli as one line `error: <flag or file>: <what>` and exit status 2, no traceback."""


def run_cli(main):
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # Tear the group down while Python is alive: Gloo's worker threads outliving it abort a rank at interpreter exit,
    # "terminate called without an active exception", after a run that succeeded (pytorch/pytorch#190489).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank():
    return int(os.environ.get("RANK", 0))


def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank():  # the rank within this node: node-local files (data caches, tiny models) are built by local rank 0
    return int(os.environ.get("LOCAL_RANK", 0))


def print_rank0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def init_distributed(seed):
    """Join the `deepspeed` launcher's process group (or make a world of one under plain python) and seed every RNG;
    returns this rank's device."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    deepspeed.init_distributed(dist_backend="gloo" if acc.device_name() == "cpu" else acc.communication_backend_name())
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    acc.set_device(local_rank())
    return torch.device(acc.device_name(local_rank()))


def rank_generator(seed, step):
    """A torch.Generator for each (seed, step, rank): the global RNG is seeded alike on every rank, and this draws
    other data on each (PPO-ptx text, dynamic sampling's prompts), the same again after a resume."""
    return torch.Generator().manual_seed(hash((seed, step, rank())) % 2**32)


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def gather_lists(items):  # every rank's list, concatenated in rank order, on every rank
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return items
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def all_reduce_sum(values, device):  # a list of floats (sums, counters, flags) summed over ranks
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def backward_step(engine, loss):
    """backward + step, unless the loss is NaN/inf on any rank: then all skip it (collectives stay in step); False."""
    if all_reduce_sum([0.0 if torch.isfinite(loss.detach()).all() else 1.0], loss.device)[0] > 0:
        print_rank0("warning: non-finite loss; this micro-batch's update is skipped on every rank")
        return False
    engine.backward(loss)
    engine.step()
    return True


# ----------------------------------------------------------------------------------------------------------------------
# Argument checks shared by the stages; each raises a one-line UserError before any heavy work.
def check_zero_stage(stage, flag="--zero_stage", offload=False):
    if stage not in (0, 1, 2, 3):
        raise UserError(f"{flag} {stage}: must be 0, 1, 2 or 3")
    if offload and stage == 0:  # DeepSpeedCPUAdam would meet parameters DeepSpeed never moved to the CPU
        why = f"DeepSpeed offloads optimizer state only under ZeRO 1-3; use {flag} 2 or 3"
        raise UserError(f"--offload with {flag} 0: {why}")


def check_dtype(dtype):  # auto -> bf16 on a GPU that has it (fp16 on V100, T4), fp32 on CPU; fp16 needs a GPU
    if dtype == "auto":
        dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if torch.cuda.is_available() else "fp32"
    if dtype == "fp16" and not torch.cuda.is_available():
        raise UserError("--dtype fp16 needs a GPU (loss scaling is not supported on CPU); use --dtype bf16 or fp32")
    return dtype


def check_at_least_one(args, *flags):
    for flag in (f for f in flags if getattr(args, f) < 1):
        raise UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")


def check_output_dir(path):
    """The folder can be created and written; the probe removes whatever it created (deepest first)."""
    created, probe = [], os.path.abspath(path)
    while not os.path.exists(probe):
        created, probe = created + [probe], os.path.dirname(probe)
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise UserError(f"--output_dir {path}: not writable")
    except OSError as e:
        raise UserError(f"--output_dir {path}: cannot be created ({e.strerror})") from None
    finally:
        for folder in created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


# DeepSpeed-Chat's flags, accepted so that its command lines run unchanged: what each does here.
COMPAT = {  # flag: (DeepSpeed-Chat's steps that have it, what it does here)
    "deepspeed": ((1, 2, 3), "ignored: every stage runs on DeepSpeed"),
    "num_padding_at_beginning": (
        (2, 3),
        "ignored: scores are read at the last real token, found from the attention mask",
    ),
    "preprocessing_num_workers": ((3,), "ignored: the data is tokenised in one process per node, then cached"),
    "enable_mixed_precision_lora": ((3,), "ignored: no ZeRO++ quantised frozen weights; LoRA trains in --dtype"),
    "compute_fp32_loss": ((1, 2, 3), "ignored: losses, log-probs and values are always computed in fp32"),
    "align_overflow": (
        (3,),
        "ignored: a non-finite loss skips that update on every rank; fp16 overflow skips per engine",
    ),
    "disable_actor_dropout": ((3,), "ignored: --actor_dropout is 0 unless set"),
    "disable_critic_dropout": ((3,), "ignored: --critic_dropout is 0 unless set"),
    "add_eot_token": (
        (1, 2, 3),
        "responses end with <|endoftext|> (added to the tokenizer if it lacks it): --eos_token",
    ),
    "enable_test_mode": ((3,), "stop after --test_stop_step steps"),
    "test_stop_step": ((3,), "the steps of --enable_test_mode"),
}


def add_compat_flags(p, step):  # DeepSpeed-Chat's flags of its step `step` that ours do not already have
    g, kind = (
        p.add_argument_group("DeepSpeed-Chat's flags").add_argument,
        {"test_stop_step": {"type": int, "default": 0}},
    )
    kind.update(add_eot_token={"action": "store_true"}, enable_test_mode={"action": "store_true"})
    for name, (steps, why) in COMPAT.items():
        if step in steps:
            g(f"--{name}", help=why, **kind.get(name, {"nargs": "?", "const": True, "default": None}))


def note_compat_flags(args):  # one line per ignored DeepSpeed-Chat flag given; --add_eot_token is --eos_token
    for name, (_, why) in COMPAT.items():
        if why.startswith("ignored") and getattr(args, name, None) is not None:
            print_rank0(f"note: --{name} is DeepSpeed-Chat's; {why}")
    if getattr(args, "add_eot_token", False):
        args.eos_token = args.eos_token or "<|endoftext|>"


# ----------------------------------------------------------------------------------------------------------------------
# DeepSpeed config (DeepSpeed-Chat's get_train_ds_config / get_eval_ds_config, trimmed).
tiny_cache_dir = builtin.cache_dir  # tiny models and tokenised data caches: $MINIRLHF_CACHE or ~/.cache/minirlhf


def ds_config(stage, dtype, micro_batch, grad_accum=1, offload=False, clip=1.0, monitors=None, train=True):
    zero = {"stage": stage, "stage3_param_persistence_threshold": 1e4, "stage3_max_live_parameters": 3e7}
    zero.update(stage3_prefetch_bucket_size=3e7, offload_param={"device": "cpu" if offload and stage == 3 else "none"})
    zero["offload_optimizer"] = {"device": "cpu" if offload and train and stage > 0 else "none"}
    cfg = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum}
    cfg.update(train_batch_size=micro_batch * grad_accum * world_size(), zero_optimization=zero)
    cfg["steps_per_print"] = 10**9  # we print our own line per step
    cfg["zero_allow_untested_optimizer"] = True  # plain torch AdamW on CPU
    cfg["fp16"] = {"enabled": dtype == "fp16", "loss_scale_window": 100}
    cfg.update(bf16={"enabled": dtype == "bf16"}, gradient_clipping=clip, wall_clock_breakdown=False)
    cfg.update(monitors or {})
    return cfg


# Logging through DeepSpeed's monitors (engine.monitor), rank 0 only: --report_to tensorboard wandb csv.
REPORT_TO = ("none", "tensorboard", "wandb", "csv")


def check_report_to(args):
    """--enable_tensorboard (DeepSpeed-Chat's flag) is --report_to tensorboard; each backend's package is installed."""
    args.report_to = sorted(set(args.report_to + ["tensorboard"] * args.enable_tensorboard) - {"none"})
    for package in ("tensorboard", "wandb"):
        if package in args.report_to and importlib.util.find_spec(package) is None:
            how = " (WANDB_MODE=offline needs no account)" if package == "wandb" else ""
            raise UserError(f"--report_to {package} needs the {package} package: pip install {package}{how}")


def monitors(report_to, path, job):
    """DeepSpeed's monitor config for ds_config: tensorboard and csv files under path/job, wandb project minirlhf."""
    files = {"enabled": True, "output_path": path, "job_name": job}
    wandb = {"enabled": True, "project": "minirlhf", "group": job}
    names = {"tensorboard": ("tensorboard", files), "csv": ("csv_monitor", files), "wandb": ("wandb", wandb)}
    return dict(names[k] for k in report_to)


_NO_DECAY = "bias layer_norm.weight layernorm.weight norm.weight ln_f.weight ln_1.weight ln_2.weight ln_attn.weight"
_NO_DECAY = (_NO_DECAY + " ln_mlp.weight norm_1.weight norm_2.weight").split()


def make_optimizer(model, lr, weight_decay, lora_lr=None, offload=False):
    """AdamW (betas 0.9/0.95, DeepSpeed-Chat's), no decay on biases/norms, LoRA's own lr; CPU Adam when offloaded."""
    groups = {"decay": [], "no_decay": [], "lora": []}
    for name, p in ((n, p) for n, p in model.named_parameters() if p.requires_grad):
        groups["lora" if "lora_" in name else "no_decay" if any(k in name for k in _NO_DECAY) else "decay"].append(p)
    param_groups = [{"params": groups["decay"], "weight_decay": weight_decay}, {"params": groups["no_decay"]}]
    param_groups = [g for g in param_groups + [{"params": groups["lora"], "lr": lora_lr or lr}] if g["params"]]
    for g in param_groups:
        g.setdefault("weight_decay", 0.0)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, lr=lr, betas=(0.9, 0.95))
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.95), fused=torch.cuda.is_available())


# ----------------------------------------------------------------------------------------------------------------------
# Saving: full (ZeRO-3-gathered) weights with LoRA fused into plain HF layers, written beside the target and renamed
# into place, so a crash never leaves a half-written folder where a good one was.
def gather_params(model):
    """{name: CPU tensor} on rank 0 (None elsewhere), ZeRO-3 shards gathered one at a time; collective under ZeRO-3."""
    import deepspeed

    sd = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else contextlib.nullcontext():
            if rank() == 0:
                sd[name] = p.data.detach().cpu().clone()
    return sd if rank() == 0 else None


def state_dict_from(model, params):
    """A saveable state dict from gathered `params`: persistent buffers added, LoRA folded into plain HF weights,
    4-bit weights unpacked into the model's float dtype (QLoRA saves a plain model)."""
    keys = set(model.state_dict().keys())
    sd = {**params, **{n: b.detach().cpu().clone() for n, b in model.named_buffers() if n in keys}}
    dtype = next(v.dtype for v in params.values() if v.is_floating_point())
    sd.update({f"{n}.weight": qlora.unpack(m).to(dtype) for n, m in model.named_modules() if qlora.is_4bit(m)})
    for mname, m in model.named_modules():
        if hasattr(m, "lora_right_weight"):  # lora.LinearLayer_LoRA
            prefix = f"{mname}." if mname else ""
            for k in ("weight", "bias") if hasattr(m, "base") else ():  # base.weight -> weight, the HF name
                if prefix + "base." + k in sd:
                    sd[prefix + k] = sd.pop(prefix + "base." + k)
            right, left = sd.pop(prefix + "lora_right_weight").float(), sd.pop(prefix + "lora_left_weight").float()
            d = m.lora_scaling * (right @ left)  # [in, out]
            w = sd[prefix + "weight"]
            sd[prefix + "weight"] = (w.float() + (d if m.transposed else d.t())).to(w.dtype)
    return sd


def full_state_dict(model):  # on rank 0 (None elsewhere), ZeRO-3 gathered, LoRA fused; collective under ZeRO-3
    params = gather_params(model)
    return None if params is None else state_dict_from(model, params)


def write_json(path, obj):
    """`obj` as JSON, or a list as JSON lines for a .jsonl path; rank 0 writes it beside, then renames it."""
    if rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(f"{path}.tmp", "w") as f:
            lines = path.endswith(".jsonl")
            f.write("".join(json.dumps(r) + "\n" for r in obj) if lines else json.dumps(obj, indent=2, default=str))
        os.replace(f"{path}.tmp", path)


def publish_dir(tmp, output_dir):
    """Rename `tmp` to `output_dir`, carrying over files (logs) it lacks; the old folder is whole until the rename."""
    old, exists = f"{output_dir}.old{os.getpid()}", os.path.isdir(output_dir)
    for entry in os.listdir(output_dir) if exists else []:
        if not os.path.exists(os.path.join(tmp, entry)):
            os.replace(os.path.join(output_dir, entry), os.path.join(tmp, entry))
    os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
    if exists:
        os.replace(output_dir, old)
    os.replace(tmp, output_dir)
    shutil.rmtree(old, ignore_errors=True)


def save_hf(model, tokenizer, output_dir, json_files=None, state_dict=None, gathered=False):
    """A Hugging Face folder (ZeRO-3 gathered, LoRA fused; or the caller's gathered `state_dict`, None off rank 0) plus
    json files (args.json, ...). Collective: call on every rank."""
    sd = state_dict if gathered else full_state_dict(model)
    if rank() == 0:
        tmp = f"{output_dir.rstrip('/')}.saving{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        qlora.save_pretrained(model, tmp, sd)
        tokenizer.save_pretrained(tmp)
        for fname, obj in (json_files or {}).items():
            write_json(os.path.join(tmp, fname), obj)
        publish_dir(tmp, output_dir)
    barrier()


class EMA:
    """Moving average of the parameters, fp32 on rank 0's CPU (DeepSpeed-Chat's --enable_ema, beta 0.992)."""

    def __init__(self, module, beta=0.992):
        self.beta, params = beta, gather_params(module)
        self.shadow = None if params is None else {k: v.float() for k, v in params.items() if v.is_floating_point()}

    def update(self, module):  # packed 4-bit weights (frozen) are not averaged: saving unpacks them from the module
        for k, v in ((k, v) for k, v in (gather_params(module) or {}).items() if k in self.shadow):
            self.shadow[k].mul_(self.beta).add_(v.float(), alpha=1 - self.beta)

    def state_dict(self, module):  # saveable (rank 0; None elsewhere): the model's dtypes, LoRA fused
        dtypes = {n: p.dtype for n, p in module.named_parameters()}
        return self.shadow and state_dict_from(module, {k: v.to(dtypes[k]) for k, v in self.shadow.items()})


# Resumable checkpoints: written beside, renamed, then `latest` moved on, so a crash never leaves a half-written one.
def latest_checkpoint(root):
    pointer = os.path.join(root, "latest")
    path = os.path.join(root, open(pointer).read().strip()) if os.path.isfile(pointer) else ""
    return path if os.path.isdir(path) else None


def save_checkpoint(root, step, engines, state, ema=None):
    """After `step`: each engine (weights, optimizer, scheduler) under its tag, each rank's RNG, EMA, `state` (json)."""
    name, tmp = f"step_{step}", os.path.join(root, f".tmp_step_{step}")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    for tag, engine in engines.items():
        engine.save_checkpoint(tmp, tag=tag)
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    rng.update({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
    torch.save(rng, os.path.join(tmp, f"rng_rank{rank()}.pt"))
    if ema is not None and rank() == 0:
        torch.save(ema.shadow, os.path.join(tmp, "ema.pt"))
    barrier()
    if rank() == 0:
        write_json(os.path.join(tmp, "state.json"), {**state, "step": step})
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)  # left by a crash before `latest` moved on
        os.replace(tmp, os.path.join(root, name))
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        for old in (d for d in os.listdir(root) if d.startswith("step_") and d != name):
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    barrier()


def load_checkpoint(root, engines, ema=None):  # the latest save_checkpoint into engines, EMA, RNG; returns its state
    path = latest_checkpoint(root)
    for tag, engine in engines.items():
        engine.load_checkpoint(path, tag=tag)
    state = json.load(open(os.path.join(path, "state.json")))
    rng = torch.load(os.path.join(path, f"rng_rank{rank()}.pt"), weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    if ema is not None and ema.shadow is not None:
        ema.shadow = torch.load(os.path.join(path, "ema.pt"))
    print_rank0(f"resumed from {path} after step {state['step']}")
    return state


class CSVLog:
    """Per-step metrics as `step,name,value` rows (plots and any tool read them); rank 0 writes, a resume appends.
    Each row also goes to the engine's --report_to backends: eval_x as eval/x, the rest as <group>/name."""

    def __init__(self, path, append=False, engine=None, group="train"):
        self.path = path if rank() == 0 else None
        self.engine, self.group = engine, group
        if self.path and not (append and os.path.exists(path)):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write("step,name,value\n")

    def write(self, step, metrics):
        if self.path:
            with open(self.path, "a") as f:
                f.writelines(f"{step},{k},{v}\n" for k, v in metrics.items())
        if self.engine is not None and self.engine.monitor.enabled:
            name = lambda k: f"eval/{k.removeprefix('eval_')}" if k.startswith("eval_") else f"{self.group}/{k}"
            self.engine.monitor.write_events([(name(k), float(v), step) for k, v in metrics.items()])


# ----------------------------------------------------------------------------------------------------------------------
# The hybrid-engine toggle. DeepSpeed's hybrid engine switches the actor between ZeRO training and fused inference
# kernels for generation; it needs a CUDA GPU and a DeepSpeed policy for the model (there is none for OPT under
# transformers 5, where its generate fails). Where it cannot run we fall back, with one warning, to gathering ZeRO-3
# parameters once per rollout and calling generate on the plain module.
def probe_hybrid_engine(engine, tokenizer, device):  # True if the hybrid engine generates; else one warning
    try:
        ids = torch.tensor([[tokenizer.eos_token_id] * 2], device=device)
        engine.eval()
        kwargs = {"max_new_tokens": 1, "do_sample": False, "pad_token_id": tokenizer.pad_token_id, "synced_gpus": False}
        engine.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        return True
    except Exception as e:  # whatever the failure, the fallback path generates correctly
        why = f"{type(e).__name__}: {str(e)[:120]}"
        print_rank0(f"warning: hybrid engine cannot generate for this model ({why}); falling back to gathered generate")
        return False


@contextlib.contextmanager
def generation_model(engine, hybrid, zero3):
    """The hybrid engine; or under ZeRO-3 the module gathered once per rollout, hooks removed; else the plain module."""
    if hybrid:
        yield engine
    elif zero3:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        with unwrap_model_for_generation(engine) as gathered:
            yield gathered.module
    else:
        yield engine.module
