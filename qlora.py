"""4-bit base weights (QLoRA, Dettmers et al. 2023) through transformers' BitsAndBytesConfig: the loading options, the
loaded layers' bookkeeping, and saving them unpacked. Imports nothing of ours: common.py and lora.py use it."""

import json
import os

import torch


def is_4bit(module):
    return type(module).__name__ == "Linear4bit"  # bitsandbytes', without importing it


def load_kwargs(quant_type, dtype):
    """from_pretrained options: quant_type ("nf4", "fp4") with double quantization, computed in dtype (our --dtype)."""
    import transformers

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    kw = dict(bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, **kw)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": {"": device}, "dtype": torch.float32}


def prepare(model, model_class, config):
    """Each Linear4bit remembers whether the checkpoint stored it as GPT-2's Conv1D ([in, out]; bitsandbytes holds it
    [out, in]), so saving turns it back; bitsandbytes' CPU eval shortcut is turned off: it repacks the weight in place
    for a bf16 kernel, after which the weight no longer unpacks and a training forward fails."""
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        plain = dict(model_class.from_config(config).named_modules())
    for name, module in ((n, m) for n, m in model.named_modules() if is_4bit(m)):
        module.hf_transposed = isinstance(plain.get(name), Conv1D)
        module.support_avx512bf16_for_cpu = False


def unpack(module):
    """A Linear4bit's weight as the HF checkpoint holds it: [out, in], or [in, out] for Conv1D; on the CPU."""
    import bitsandbytes as bnb

    w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).cpu()
    return w.t() if module.hf_transposed else w


def save_pretrained(model, folder, state_dict):
    """model.save_pretrained(folder, state_dict) that writes a plain model whatever the loading did: for a 4-bit model
    transformers' quantizer would save the packed weights instead, and config.json would still ask for 4 bits."""
    quantizer, model.hf_quantizer = getattr(model, "hf_quantizer", None), None
    try:
        model.save_pretrained(folder, state_dict=state_dict)
    finally:
        model.hf_quantizer = quantizer
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    if config.pop("quantization_config", None):  # state_dict holds the unpacked weights
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
