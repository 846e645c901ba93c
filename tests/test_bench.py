"""scripts/bench.py: the JSON line it appends has every field, with sane values (not timings)."""

import json

from conftest import run_stage

FIELDS = ["device", "commit", "actor_params", "critic_params", "prompt_len", "answer_len", "batch",
          "actor_zero_stage", "critic_zero_stage", "ranks", "gen_s", "score_s", "train_s", "samples_per_s",
          "tokens_per_s", "peak_mem_mb", "bare_samples_per_s", "overhead_ratio"]  # fmt: skip


def test_bench_quick_appends_one_json_line_with_every_field(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text('{"earlier": "row"}\n')  # appended to, never overwritten
    proc = run_stage(["scripts/bench.py", "--quick", "--results", str(results)])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == 2 and rows[0] == {"earlier": "row"}
    row = rows[1]
    assert set(FIELDS) <= set(row), set(FIELDS) - set(row)
    assert (row["prompt_len"], row["answer_len"], row["batch"], row["ranks"]) == (8, 8, 4, 1)
    assert row["actor_params"] == row["critic_params"] - 129  # the critic: the same backbone + v_head (128 + 1)
    for key in ("gen_s", "score_s", "train_s", "samples_per_s", "tokens_per_s", "peak_mem_mb", "overhead_ratio"):
        assert row[key] > 0, key
    assert row["samples_per_s"] == 4 / (row["gen_s"] + row["score_s"] + row["train_s"])
    assert row["tokens_per_s"] == 4 * 8 / row["gen_s"]
    assert "bench tiny:gpt2 / tiny:gpt2, 8+8 tokens, batch 4" in proc.stdout


def test_zero3_generation_gathers_parameters_once_per_rollout_not_per_token():
    proc = run_stage(["tests/zero3_gathers.py"], launcher=2)
    counts = json.loads(proc.stdout.split("GATHERS ")[1].splitlines()[0])
    assert counts["4"] > 0 and counts["16"] == counts["4"], counts  # 4x the tokens, the same all-gathers
