"""train.py: the whole pipeline with tiny budgets, its report, skipping and resuming."""

import json
import os
import re
import sys

import builtin
import train
from conftest import ROOT, run_stage

FAST = [
    "--step1-args",
    "--max_steps 4 --per_device_train_batch_size 8 --eval_max_new_tokens 12",
    "--step2-args",
    "--max_steps 4 --per_device_train_batch_size 4 --eval_iters 2",
    "--step3-args",
    "--max_steps 2 --per_device_generation_batch_size 8 --per_device_training_batch_size 4 --max_answer_seq_len 12",
    "--checkpoint-interval",
    "1",
]


def test_pipeline_end_to_end_report_matches_metrics_and_rerun_skips(tmp_path):
    out = str(tmp_path / "out")
    proc = run_stage(["train.py", "--output-dir", out, *FAST])
    for i in (1, 2, 3):
        assert f"[train] step {i} done in" in proc.stdout
    report = open(os.path.join(out, "report.md")).read()
    m = [json.load(open(os.path.join(out, d, "metrics.json"))) for d in ("step1_sft", "step2_reward", "step3_ppo")]
    assert (
        f"| step 1: eval perplexity | {m[0]['eval_perplexity_start']:.4f} | {m[0]['eval_perplexity']:.4f} |" in report
    )
    assert f"| step 2: pairwise accuracy | {m[1]['eval_accuracy_start']:.4f} | {m[1]['eval_accuracy']:.4f} |" in report
    assert f"| step 3: accuracy (greedy) | {m[2]['eval_accuracy_start']:.4f} | {m[2]['eval_accuracy']:.4f} |" in report
    assert f"| step 3: KL to reference | {m[2]['eval_kl_start']:.4f} | {m[2]['eval_kl']:.4f} |" in report
    gain = 100 * (m[2]["eval_accuracy"] - m[2]["eval_accuracy_start"])
    assert f"({gain:+.1f} points)" in report
    assert "| prompt | SFT | RLHF |" in report
    kinds = [k[14:] for k in m[1] if k.startswith("eval_accuracy_") and not k.endswith("_start")]
    assert kinds  # builtin:sort classifies its rejected answers; the report has a row per kind
    for k in kinds:
        row = (
            f"| step 2: pairwise accuracy, rejected = {k.replace('_', ' ')} | {m[1][f'eval_accuracy_{k}_start']:.4f} |"
        )
        assert row in report
    rows = [json.loads(line) for line in open(os.path.join(out, "step3_ppo", "eval_generations.jsonl"))]
    hacked = sum(not r["correct"] and r["score"] > r["reference_score"] for r in rows)
    assert f"Reward hacking: {hacked} of {len(rows)} RLHF answers are wrong yet scored above the correct" in report
    log = open(os.path.join(out, "step3_ppo", "log.csv")).read()
    assert f"0,eval_accuracy,{m[2]['eval_accuracy_start']}" in log  # the accuracy curve starts at the SFT policy
    for png in ("step3_ppo.png", "step1_loss.png", "step2_loss.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000 and f"![{png}]({png})" in report
    for d in ("step1_sft", "step2_reward", "step3_ppo"):
        assert os.path.getsize(os.path.join(out, d, "training.log")) > 0
    again = run_stage(["train.py", "--output-dir", out, *FAST])
    assert (
        again.stdout.count("is complete, skipped") == 3 and "done in" not in again.stdout.split("[train] all done")[0]
    )
    os.remove(os.path.join(out, "step3_ppo", "metrics.json"))  # step 3 interrupted after its checkpoint at step 1
    resumed = run_stage(["train.py", "--output-dir", out, *FAST])
    assert "resumed from" in resumed.stdout and "after step 1" in resumed.stdout and "step 2/2" in resumed.stdout
    assert "step 1/2" not in resumed.stdout
    after = json.load(open(os.path.join(out, "step3_ppo", "metrics.json")))
    assert {k: v for k, v in after.items() if k != "train_seconds"} == {
        k: v for k, v in m[2].items() if k != "train_seconds"
    }


def test_step3_resumes_from_its_checkpoint_and_force_starts_over(tmp_path):
    args = train.parse_args(["--output-dir", str(tmp_path)])
    assert "--resume" not in train.step_command(3, args)
    ckpt = tmp_path / "step3_ppo" / "checkpoints"
    (ckpt / "step_25").mkdir(parents=True)
    (ckpt / "latest").write_text("step_25")
    assert "--resume" in train.step_command(3, args)
    assert "--resume" not in train.step_command(3, train.parse_args(["--output-dir", str(tmp_path), "--force"]))


def test_step_commands_pass_models_stages_and_extra_args(tmp_path):
    args = train.parse_args(
        [
            "--output-dir",
            str(tmp_path),
            "--actor-model",
            "tiny:opt",
            "--reward-model",
            "tiny:llama",
            "--actor-zero-stage",
            "3",
            "--reward-zero-stage",
            "2",
            "--step3-args",
            "--kl_coef 0.05",
        ]
    )
    c1, c2, c3 = (train.step_command(i, args) for i in (1, 2, 3))
    assert c1[c1.index("--model_name_or_path") + 1] == "tiny:opt" and c1[c1.index("--zero_stage") + 1] == "3"
    assert c2[c2.index("--model_name_or_path") + 1] == "tiny:llama" and c2[c2.index("--zero_stage") + 1] == "2"
    assert c3[c3.index("--actor") + 1] == os.path.join(str(tmp_path), "step1_sft")
    assert c3[c3.index("--critic_zero_stage") + 1] == "2" and c3[-2:] == ["--kl_coef", "0.05"]
    assert not any("--chat_template" in c for c in (c1, c2, c3))
    chat = train.parse_args(["--output-dir", str(tmp_path), "--chat-template"])
    assert all("--chat_template" in train.step_command(i, chat) for i in (1, 2, 3))  # one choice for all three steps
    assert train.launcher(train.parse_args(["--num-gpus", "2"])) == ["deepspeed", "--num_gpus", "2"]
    assert train.launcher(train.parse_args(["--num-gpus", "0"])) == [sys.executable]


def test_reward_fn_skips_step_2_and_passes_the_estimator_through(tmp_path):
    args = train.parse_args(["--output-dir", str(tmp_path), "--reward-fn", "checker", "--advantage-estimator", "grpo",
                             "--n-samples-per-prompt", "4"])  # fmt: skip
    assert args.step == [1, 3]  # no reward model to train
    c3 = train.step_command(3, args)
    assert c3[c3.index("--reward_fn") + 1] == "checker" and "--reward" not in c3
    assert c3[c3.index("--advantage_estimator") + 1] == "grpo" and c3[c3.index("--n_samples_per_prompt") + 1] == "4"


def test_algo_dpo_runs_step_1_then_dpo_and_reports_it(tmp_path):
    args = train.parse_args(["--output-dir", str(tmp_path), "--algo", "dpo"])
    assert args.step == [1, 3] and train.stage(3, args) == ("dpo.py", "dpo")
    c3 = train.step_command(3, args)
    assert c3[0].endswith("dpo.py") and c3[c3.index("--model_name_or_path") + 1] == os.path.join(
        str(tmp_path), "step1_sft"
    )
    assert c3[c3.index("--rpo_alpha") + 1] == "1"  # the demo's DPO keeps the chosen answers' NLL (README, DPO)
    plain = train.step_command(3, train.parse_args(["--algo", "dpo", "--step3-args", "--rpo_alpha 0"]))
    assert plain[-2:] == ["--rpo_alpha", "0"]  # after ours: argparse keeps the last one given
    os.makedirs(tmp_path / "dpo")
    metrics = {
        "eval_accuracy_start": 0.5,
        "eval_accuracy": 0.75,
        "eval_reward_accuracy_start": 0.0,
        "eval_reward_accuracy": 0.9,
    }
    json.dump(metrics, open(tmp_path / "dpo" / "metrics.json", "w"))
    report = train.build_report(args, {1: 0.0, 3: 1.0})
    assert (
        "SFT 50.0% -> DPO 75.0% (+25.0 points)" in report
        and "| step 3: implicit reward accuracy | 0.0000 | 0.9000 |" in report
    )


def test_readme_recipe_table_is_builtin_demo_recipe():
    readme = open(os.path.join(ROOT, "README.md")).read()  # its table of the demo's flags (Defaults) agrees
    rows = re.findall(r"^\| `(\w+\.py) --[^|]*\|[^|]*\| ([^|]*) \|$", readme, re.M)  # (script, the demo's column)
    table = {}
    for script, cell in rows:
        table.setdefault(script, []).extend(re.findall(r"[0-9.e-]+", cell))
    recipe = {script: flags.split()[1::2] for script, flags in builtin.DEMO_RECIPE.items()}  # the values, in order
    assert table == recipe
