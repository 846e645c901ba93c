"""LoRA in DeepSpeed-Chat's layout (its dschat/utils/module/lora.py), over nn.Linear, GPT-2's Conv1D and bitsandbytes'
4-bit Linear4bit (QLoRA). Saving folds LoRA into plain weights: common.state_dict_from."""

import importlib.util
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, print_rank0
from models import resolve_model
from qlora import is_4bit


# LoRA in DeepSpeed-Chat's layout (lora_right_weight, lora_left_weight, lora_scaling, fuse_lora): the convention
# DeepSpeed's hybrid engine knows how to fuse. nn.Linear and GPT-2's Conv1D (weight stored transposed, [in, out]).
class LinearLayer_LoRA(nn.Module):  # DeepSpeed-Chat's name, which its hybrid engine looks for
    def __init__(self, weight, bias, lora_dim, lora_scaling=1.0, transposed=False, base=None):
        super().__init__()
        self.transposed = transposed  # the HF checkpoint stores the weight [in, out] (Conv1D)
        if base is None:
            self.weight, self.bias = weight, bias
            self.weight.requires_grad = False  # only the low-rank update is trained
            shape = getattr(weight, "ds_shape", weight.shape)
            fan_in, fan_out = (shape[0], shape[1]) if transposed else (shape[1], shape[0])
        else:  # QLoRA (Dettmers et al. 2023): a frozen bitsandbytes Linear4bit computes x W^T + b itself
            self.base, fan_in, fan_out = base, base.in_features, base.out_features
        self.lora_right_weight = nn.Parameter(torch.zeros(fan_in, lora_dim))  # [in, r]
        self.lora_left_weight = nn.Parameter(torch.zeros(lora_dim, fan_out))  # [r, out]
        nn.init.kaiming_uniform_(self.lora_right_weight, a=math.sqrt(5))
        self.lora_scaling = lora_scaling / lora_dim
        self.fuse_lora = False

    def delta(self):  # the update in the weight's own layout
        d = self.lora_scaling * (self.lora_right_weight @ self.lora_left_weight)  # [in, out]
        return d if self.transposed else d.t()

    def fuse_lora_weight(self):  # a 4-bit base cannot absorb the update: it stays unfused, forward adds it
        if not self.fuse_lora and not hasattr(self, "base"):
            self.weight.data += self.delta().to(self.weight.dtype)
            self.fuse_lora = True

    def unfuse_lora_weight(self):
        if self.fuse_lora:
            self.weight.data -= self.delta().to(self.weight.dtype)
            self.fuse_lora = False

    def forward(self, x):
        if hasattr(self, "base"):
            out = self.base(x)
        else:
            out = F.linear(x, self.weight.t() if self.transposed else self.weight, self.bias)
        if self.fuse_lora:
            return out
        return out + (x @ self.lora_right_weight @ self.lora_left_weight) * self.lora_scaling


def linear_layers(model, module_name):  # [(name, module)] of the nn.Linear / Conv1D / Linear4bit named *module_name*
    from transformers.pytorch_utils import Conv1D

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and module_name in n]


def convert_to_lora(model, module_name, lora_dim, flag="--lora_module_name"):  # nn.Linear/Conv1D named *module_name*
    from transformers.pytorch_utils import Conv1D

    targets = linear_layers(model, module_name)
    if not targets:
        raise UserError(f"{flag} {module_name!r}: matches no linear layer of {type(model).__name__}")
    for name, module in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if is_4bit(module):
            layer = LinearLayer_LoRA(None, None, lora_dim, transposed=module.hf_transposed, base=module)
        else:
            layer = LinearLayer_LoRA(module.weight, module.bias, lora_dim, transposed=isinstance(module, Conv1D))
        setattr(parent, name.rsplit(".", 1)[-1], layer.to(module.weight.device))
    print_rank0(f"lora: {len(targets)} linear layers of {type(model).__name__} match {module_name!r}, dim {lora_dim}")


def only_optimize_lora(model):
    for name, p in model.named_parameters():
        p.requires_grad = "lora_right_weight" in name or "lora_left_weight" in name


def default_lora_module(
    model,
):  # "layers." (OPT, LLaMA, Mistral, Qwen2, GPT-NeoX) or "h." (GPT-2, -J, -Neo, BLOOM, ...)
    return "layers." if any(".layers." in f".{n}" for n, _ in model.named_modules()) else "h."


def add_lora(model, lora_dim, module_name=None, only_lora=False, flag="--lora_module_name"):
    """LoRA of rank lora_dim on the linear layers named *module_name* (default: the family's decoder layers); with
    only_lora nothing else trains (--only_optimize_lora, or a 4-bit base, whose packed weights cannot)."""
    convert_to_lora(model, module_name or default_lora_module(model), lora_dim, flag)
    if only_lora:
        only_optimize_lora(model)


def check_4bit(flag, zero_stage, stage_flag="--zero_stage", lora_dim=None, lora_flag="--lora_dim", offloaded=None):
    """A model loaded in 4 bits (QLoRA); lora_dim None: a frozen model, else it trains and needs LoRA; offloaded: the
    flag that would offload it (ZeRO-3's, which cannot hold packed weights), when given."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{flag} needs bitsandbytes: pip install 'bitsandbytes>=0.45'")
    if zero_stage == 3:
        raise UserError(f"{flag} with {stage_flag} 3: ZeRO-3 cannot shard bitsandbytes' packed weights; use 0-2")
    if lora_dim == 0:
        raise UserError(f"{flag} needs {lora_flag} > 0: 4-bit weights are frozen, only LoRA weights train")
    if offloaded:
        raise UserError(f"{offloaded} with {flag}: ZeRO-3 cannot hold 4-bit weights; the model stays on the device")


def check_module_name(model_name, module_name, flag="--lora_module_name", auto_class="AutoModelForCausalLM"):
    """A --lora_module_name matches a linear layer: checked on an empty (meta-device) copy of the architecture, before
    any weights load."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(resolve_model(model_name))
    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(config)
    if module_name is not None and not linear_layers(model, module_name):
        raise UserError(f"{flag} {module_name!r}: matches no linear layer of {type(model).__name__}")


def check_flags(args, offloaded=None, auto_class="AutoModelForCausalLM"):
    """The LoRA flags of a one-model stage (sft.py, reward.py, dpo.py): --only_optimize_lora, --load_in_4bit,
    --lora_module_name (after --model_name_or_path is known to load)."""
    if args.only_optimize_lora and args.lora_dim == 0:
        raise UserError("--only_optimize_lora needs --lora_dim > 0")
    if args.load_in_4bit:
        check_4bit("--load_in_4bit", args.zero_stage, lora_dim=args.lora_dim, offloaded=offloaded)
    if args.lora_dim:
        check_module_name(args.model_name_or_path, args.lora_module_name, auto_class=auto_class)
