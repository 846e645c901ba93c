"""--report_to: DeepSpeed's monitors get every log.csv row, eval_x as eval/x and the rest as train/ or ppo/ names."""

import importlib.util
import os

import pytest

from conftest import TINY_PPO, assert_one_line_error, run_stage


def test_tensorboard_and_csv_get_the_step3_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, logs = str(tmp_path / "ppo"), str(tmp_path / "logs")
    flags = ["--max_steps", "2", "--report_to", "tensorboard", "csv", "--tensorboard_path", logs, "--output_dir", out]
    run_stage(["ppo.py", *TINY_PPO, *flags])
    board = EventAccumulator(os.path.join(logs, "step3_ppo")).Reload()
    tags = set(board.Tags()["scalars"])
    assert {"ppo/reward", "ppo/kl", "ppo/actor_loss", "ppo/critic_loss", "eval/accuracy", "eval/kl"} <= tags, tags
    assert [e.step for e in board.Scalars("ppo/reward")] == [1, 2]
    assert [e.step for e in board.Scalars("eval/accuracy")] == [0, 2]  # the start and the end
    rows = [line.split(",") for line in open(os.path.join(out, "log.csv")).read().splitlines()[1:]]
    reward = [float(v) for s, k, v in rows if k == "reward"]
    assert [e.value for e in board.Scalars("ppo/reward")] == pytest.approx(reward)  # the same figures as log.csv
    assert os.path.isfile(os.path.join(logs, "step3_ppo", "ppo_reward.csv"))  # DeepSpeed's csv monitor


def test_enable_tensorboard_is_deepspeed_chats_alias(tmp_path):
    logs = str(tmp_path / "logs")
    flags = [
        "--max_steps",
        "2",
        "--enable_tensorboard",
        "--tensorboard_path",
        logs,
        "--output_dir",
        str(tmp_path / "o"),
    ]
    run_stage(["sft.py", "--model_name_or_path", "tiny:gpt2", "--eval_max_new_tokens", "4", *flags])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(logs, "step1_sft")))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_writes_a_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    flags = ["--max_steps", "2", "--report_to", "wandb", "--output_dir", str(tmp_path / "o")]
    run_stage(["reward.py", "--model_name_or_path", "tiny:gpt2", *flags])
    assert any(f.startswith("offline-run-") for f in os.listdir(os.path.join(tmp_path, "wandb")))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_the_package_is_one_line(tmp_path):
    proc = run_stage(["dpo.py", "--model_name_or_path", "tiny:gpt2", "--report_to", "wandb", "--output_dir",
                      str(tmp_path / "o")], check=False)  # fmt: skip
    assert_one_line_error(proc, "--report_to wandb needs the wandb package: pip install wandb")
