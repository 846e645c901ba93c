"""What 4-bit loading saves: bytes of weights and resident memory of one random model loaded in fp32 and in 4 bits
(nf4, double quantization: what --load_in_4bit does), each load in a fresh process so the peaks do not mix.

    python scripts/qlora_memory.py                                       # ~52M-parameter llama-shaped model
    python scripts/qlora_memory.py --model tiny:opt@hidden=768,layers=12,heads=12,ffn=3072

Prints one table row per mode and the ratio; --json writes the rows too.
"""

import argparse
import ctypes
import gc
import importlib
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def measure(model, mode):
    """In this process: load `model` (fp32 or nf4 4-bit) and return its weight bytes and this process's peak RSS."""
    import torch

    importlib.import_module("bitsandbytes")  # in both modes, so the baseline is the same

    import models

    tokenizer = models.load_tokenizer(model)
    rss_before = rss_now()
    loaded = models.load_model(model, tokenizer, quant=("nf4", "fp32") if mode == "4bit" else None)
    with torch.no_grad():  # one forward pass touches every weight (fp32 safetensors are mapped lazily)
        loaded(**tokenizer(["sort: d b a c"], return_tensors="pt"))
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    quant_state = sum(  # absmax and the double-quantization constants live beside each packed weight
        sum(t.numel() * t.element_size() for t in p.quant_state.as_dict(packed=True).values() if hasattr(t, "numel"))
        for p in loaded.parameters()
        if getattr(p, "quant_state", None) is not None
    )
    return {
        "mode": mode,
        "params": sum(p.numel() * (2 if p.dtype.itemsize == 1 else 1) for p in loaded.parameters()),  # 2 per byte
        "weight_mb": (sum(t.numel() * t.element_size() for t in tensors) + quant_state) / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **{f"rss_{k}_growth_mb": v - rss_before[k] for k, v in rss_now().items()},
    }


def rss_now():  # {"anon": MiB, "file": MiB} resident now, once freed loading temporaries go back to the system
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap otherwise, and RSS would count it
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[f"Rss{k.title()}"].split()[0]) / 1024 for k in ("anon", "file")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny:llama@hidden=640,layers=12,heads=10,ffn=1720", help="tiny:<spec> or folder")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--_mode", default=None, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args._mode:
        print(json.dumps(measure(args.model, args._mode)))
        return
    import models

    models.resolve_model(args.model)  # build the random model folder once, outside the measured processes
    rows = []
    for mode in ("fp32", "4bit"):
        cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--_mode", mode]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=ROOT))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"model {args.model}: {rows[0]['params'] / 1e6:.1f}M parameters")
    print("| load | weights (MiB) | anonymous RSS growth (MiB) | file-backed RSS growth (MiB) | peak RSS (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        rss = f"{r['rss_anon_growth_mb']:.0f} | {r['rss_file_growth_mb']:.0f} | {r['peak_rss_mb']:.0f}"
        print(f"| {r['mode']} | {r['weight_mb']:.1f} | {rss} |")
    ratio = rows[0]["weight_mb"] / rows[1]["weight_mb"]
    print(f"weights {ratio:.2f}x smaller in 4 bits (fp32 safetensors are mapped, not copied: file-backed RSS)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "rows": rows, "weight_ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
