"""Every tiny:<model_type> family through all three steps, with and without LoRA (default target layers
of each family), in one process per family to keep it fast."""

import json
import os
import subprocess
import sys

import pytest

import builtin
from conftest import ROOT, write_sort_rows

DRIVER = """
import json, os, sys
import builtin, ppo, reward, sft
family, demo = sys.argv[1], {k: v.split() for k, v in builtin.DEMO_RECIPE.items()}
small = ['--max_steps', '2', '--data_path', 'sort.jsonl', '--data_split', '1,1,1']
sft_small = [*demo['sft.py'], '--per_device_train_batch_size', '4', '--eval_max_new_tokens', '4']
sft.main(['--model_name_or_path', f'tiny:{family}', *small, *sft_small,
          '--output_dir', 's1'])
sft.main(['--model_name_or_path', f'tiny:{family}', *small, *sft_small,
          '--lora_dim', '4', '--only_optimize_lora', '--output_dir', 's1_lora'])
reward.main(['--model_name_or_path', 's1', *demo['reward.py'], *small, '--per_device_train_batch_size', '4',
             '--max_steps', '8', '--output_dir', 's2'])
reward.main(['--model_name_or_path', 's1', *demo['reward.py'], *small, '--per_device_train_batch_size', '4',
             '--max_steps', '8', '--lora_dim', '4',
             '--output_dir', 's2_lora'])
common = [*demo['ppo.py'], '--actor', 's1', '--reward', 's2', '--max_steps', '1', '--data_path', 'sort.jsonl',
          '--data_split', '1,1,1',
          '--per_device_generation_batch_size', '8',
          '--per_device_training_batch_size', '4', '--max_answer_seq_len', '6']
ppo.main([*common, '--output_dir', 's3'])
ppo.main([*common, '--actor_lora_dim', '4', '--critic_lora_dim', '4', '--only_optimize_lora',
          '--output_dir', 's3_lora'])
for out in ('s1', 's1_lora', 's2', 's2_lora', 's3', 's3_lora'):
    print('METRICS', out, json.dumps(json.load(open(os.path.join(out, 'metrics.json')))))
"""


@pytest.mark.parametrize("family", sorted(builtin.TINY_FAMILIES))
def test_family_runs_all_three_steps_with_and_without_lora(family, tmp_path):
    write_sort_rows(str(tmp_path / "sort.jsonl"), easy_pairs=True)  # small evals, no greedy accuracy evals: fast
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, family],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = {
        line.split()[1]: json.loads(line.split(" ", 2)[2])
        for line in proc.stdout.splitlines()
        if line.startswith("METRICS")
    }
    assert set(metrics) == {"s1", "s1_lora", "s2", "s2_lora", "s3", "s3_lora"}
    for out in ("s1", "s1_lora"):  # two SFT steps at the demo's lr already lower held-out perplexity
        assert metrics[out]["eval_perplexity"] < metrics[out]["eval_perplexity_start"], out
    for out in ("s2", "s2_lora"):  # eight steps learn that an answer beats "?" on held-out pairs
        assert metrics[out]["eval_loss"] < metrics[out]["eval_loss_start"], out
    for out in ("s3", "s3_lora"):
        assert metrics[out]["eval_kl_start"] == pytest.approx(0.0, abs=1e-4)  # actor == reference at the start
        assert metrics[out]["eval_kl"] > 0  # one update moved the actor (the exact KL is positive when it differs)
        assert all(v == v for v in metrics[out].values() if isinstance(v, float)), metrics[out]  # no NaN
    lora = [line for line in proc.stdout.splitlines() if line.startswith("lora: ")]
    assert len(lora) == 4, lora  # step 1, step 2, step 3's actor and critic: each found its family's decoder layers
    assert all(int(line.split()[1]) >= builtin.TINY_LAYERS for line in lora), lora


@pytest.mark.parametrize("family", sorted(builtin.TINY_FAMILIES))
def test_reward_head_width_comes_from_the_config(family):
    import models

    tok = models.load_tokenizer(f"tiny:{family}")
    model, _ = models.load_reward_model(f"tiny:{family}", tok)
    ids = tok(["Human: hi\n\nAssistant: yo"], return_tensors="pt")
    assert model.score(ids["input_ids"], ids["attention_mask"]).shape == (1,)
    cfg = model.config
    want = cfg.word_embed_proj_dim if family == "opt" else cfg.hidden_size
    assert model.v_head.in_features == want
    if family == "opt":
        assert cfg.word_embed_proj_dim != cfg.hidden_size  # OPT's projection really is exercised
