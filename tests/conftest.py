"""Shared fixtures. Tiny models and tokenised caches go to a per-session folder, so the suite is
hermetic; helpers run a stage as a subprocess exactly as a user would."""

import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

builtin = importlib.import_module("builtin")  # the repository, on the path above

# the demo's learning rates and sizes (train.py's recipe for tiny models; the stages' defaults are for real models)
DEMO = {script: flags.split() for script, flags in builtin.DEMO_RECIPE.items()}
# ppo.py on the tiny model with its own reward model: small enough for a test, every model path exercised
TINY_PPO = ["--actor", "tiny:gpt2", "--reward", "tiny:gpt2", *DEMO["ppo.py"], "--per_device_generation_batch_size",
            "8", "--per_device_training_batch_size", "4", "--max_answer_seq_len", "8"]  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cache"))
    os.environ["MINIRLHF_CACHE"] = path
    return path


def write_sort_rows(path, n=300, easy_pairs=False):
    """n rows of the demo as a local JSONL file (prompt, chosen, rejected, response): no checker, so the stages skip
    their greedy accuracy evals, and its 9:1 eval split is small (fast tests of everything else). easy_pairs: every
    rejected answer is "?", a preference a few steps learn."""
    import json

    rows = [{**r, "rejected": "?"} if easy_pairs else r for r in builtin.sort_dataset()["train"][:n]]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def run_stage(args, cwd=ROOT, launcher=None, timeout=600, check=True):
    """Run `python <args>` (or `deepspeed --num_gpus N <args>`) and return the CompletedProcess."""
    cmd = (
        [sys.executable]
        if launcher is None
        else [
            os.path.join(os.path.dirname(sys.executable), "deepspeed"),
            "--num_gpus",
            str(launcher),
            "--master_port",
            str(_port()),
        ]
    )
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        cmd + [os.path.join(ROOT, args[0])] + list(args[1:]),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd + list(args))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def _port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line_error(proc, *fragments):
    """A bad-input run exits 2 with a single `error: ...` line naming the flag/file, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]
