"""The representative subset of scripts/zero_matrix.py (two ranks on CPU): actor ZeRO-3 x critic ZeRO-2
with every option at once, and a combination DeepSpeed cannot run, refused up front with its reason."""

import os
import subprocess
import sys

from conftest import ROOT


def test_zero_matrix_quick_subset(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "zero_matrix.py"), "--quick", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "| 3 | 2 | all options | pass |" in proc.stdout
    assert (
        "| 0 | 3 | all options | pass | " in proc.stdout
        and "refused: --offload with --actor_zero_stage 0" in proc.stdout
    )
    assert "2/2 passed" in proc.stdout
    from transformers import AutoModelForCausalLM

    for folder in ("actor", "actor_ema"):  # ZeRO-3 shards (LoRA fused) gathered into complete folders
        model = AutoModelForCausalLM.from_pretrained(os.path.join(str(tmp_path), "a3_c2_all_options", folder))
        assert all(p.numel() > 0 for p in model.parameters())
