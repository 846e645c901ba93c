import json
import math
import os

import pytest
import torch

import builtin
import data
import models
from conftest import assert_one_line_error, run_stage
from models import end_scores, load_reward_model, save_reward_model
from reward import evaluate, pairwise_loss


def test_pairwise_loss_matches_hand_computation():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(2.0))) / 2  # -log sigmoid(x) = log(1 + e^-x)
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    assert pairwise_loss(torch.tensor([3.0]), torch.tensor([3.0])).item() == pytest.approx(math.log(2), rel=1e-6)


def test_accuracy_counting_ties_are_wrong():
    # first tokens as scores: pairs (1, 0), (0, 2), (5, 5) tie, (2, -1) -> 2 of 4 right
    pairs = [(1, 0), (0, 2), (5, 5), (2, 1)]
    batch = {
        "input_ids": torch.tensor([[c, 0] for c, _ in pairs] + [[r, 0] for _, r in pairs]),
        "attention_mask": torch.ones(8, 2, dtype=torch.long),
    }
    out = evaluate(StubEngine(), lambda: [(batch, 4)], type("Args", (), {"eval_iters": 0})(), torch.device("cpu"))
    assert out["eval_accuracy"] == 0.5
    assert out["eval_chosen_score"] == pytest.approx(8 / 4) and out["eval_rejected_score"] == pytest.approx(8 / 4)
    assert out["score_std"] == pytest.approx(math.sqrt((1 + 0 + 25 + 4) / 4 - 2.0**2))


def test_end_scores_reads_last_real_token_including_truncated_rows(tmp_path):
    tok = models.load_tokenizer("tiny:gpt2")
    full = data.encode_row(tok, "Human: x\n\nAssistant:", [" y z"], 64)[0][0]["input_ids"]
    cut = full[:-2]  # a row cut short (as a generated answer without EOS)
    assert full[-1] == tok.eos_token_id and cut[-1] != tok.eos_token_id
    for left in (False, True):
        mask = data.pad([[1] * len(full), [1] * len(cut)], 0, left=left)
        values = torch.arange(mask.numel(), dtype=torch.float).view(mask.shape)
        width = mask.shape[1]
        expected = (
            [values[0, width - 1], values[1, width - 1]]
            if left
            else [values[0, len(full) - 1], values[1, len(cut) - 1]]
        )
        assert end_scores(values, mask).tolist() == [float(e) for e in expected]


@pytest.mark.parametrize("family", sorted(builtin.TINY_FAMILIES))  # BLOOM's ALiBi and the rotary families too
def test_score_same_for_left_and_right_padding(family):
    tok = models.load_tokenizer(f"tiny:{family}")
    model, _ = load_reward_model(f"tiny:{family}", tok)
    model.eval()
    seqs = [
        data.encode_row(tok, data.format_prompt("sort: b a"), [" a b"], 64)[0][0]["input_ids"],
        data.encode_row(tok, data.format_prompt("sort: d c b a"), [" a b c d"], 64)[0][0]["input_ids"],
    ]
    with torch.no_grad():
        right = model.score(data.pad(seqs, tok.pad_token_id), data.pad([[1] * len(s) for s in seqs], 0))
        left = model.score(
            data.pad(seqs, tok.pad_token_id, left=True), data.pad([[1] * len(s) for s in seqs], 0, left=True)
        )
        alone = torch.cat([model.score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    assert torch.allclose(right, alone, atol=1e-5) and torch.allclose(left, alone, atol=1e-5)


def test_save_reload_gives_identical_scores_and_stats(tmp_path):
    tok = models.load_tokenizer("tiny:opt")
    model, stats = load_reward_model("tiny:opt", tok)
    assert stats is None
    torch.nn.init.normal_(model.v_head.weight)
    model.v_head.bias.data.fill_(0.7)
    ids = torch.randint(2, 250, (3, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = model.eval().score(ids, mask)
    save_reward_model(model, tok, str(tmp_path / "rm"), {"args.json": {}}, stats={"score_mean": 1.5, "score_std": 2.0})
    again, stats = load_reward_model(str(tmp_path / "rm"), tok)
    with torch.no_grad():
        after = again.eval().score(ids, mask)
    assert torch.equal(before, after)
    assert stats == {"score_mean": 1.5, "score_std": 2.0}
    assert json.load(open(tmp_path / "rm" / "config.json"))["architectures"] == ["OPTModel"]


def test_reward_two_ranks_zero3_from_tiny(tmp_path):
    out = str(tmp_path / "rm")
    proc = run_stage(
        [
            "reward.py",
            "--model_name_or_path",
            "tiny:gpt2",
            "--max_steps",
            "4",
            "--zero_stage",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--eval_iters",
            "2",
            "--output_dir",
            out,
        ],
        launcher=2,
    )
    assert "ranks 2 = global batch 8 pairs" in proc.stdout
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for key in (
        "eval_accuracy_start",
        "eval_accuracy",
        "eval_chosen_score",
        "eval_rejected_score",
        "score_mean",
        "score_std",
        "train_seconds",
    ):
        assert math.isfinite(metrics[key]), key
    for kind in builtin.SORT_ERROR_KINDS:  # builtin:sort classifies its rejected answers: accuracy per kind
        assert 0.0 <= metrics[f"eval_accuracy_{kind}"] <= 1.0, kind
    tok = models.load_tokenizer(out)
    model, stats = load_reward_model(out, tok)
    assert stats["score_std"] == pytest.approx(metrics["score_std"])


def test_dataset_without_pairs_is_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("train", "eval"):
        (tmp_path / "data" / f"{name}.json").write_text(json.dumps([{"prompt": "hi", "chosen": "yes"}] * 5))
    proc = run_stage(
        [
            "reward.py",
            "--model_name_or_path",
            "tiny:gpt2",
            "--data_path",
            "local/jsonfile",
            "--data_split",
            "1,1,1",
            "--output_dir",
            str(tmp_path / "o"),
        ],
        cwd=str(tmp_path),
        check=False,
    )
    assert_one_line_error(proc, "--data_path local/jsonfile", "no chosen/rejected pairs")


def test_sort_error_kinds_are_read_off_the_answers():
    kind = lambda rejected: builtin.sort_error_kind("sort: d b a c", "a b c d", rejected)
    assert [kind(x) for x in ("a b d c", "b a c d", "a b c e", "a b d", "a b c d e", "a c b d")] == [
        "last_two_swapped",
        "adjacent_swap",
        "replaced_letter",
        "dropped_letter",
        "added_letter",
        "adjacent_swap",
    ]
    import random

    rng = random.Random(0)  # every corruption the demo draws is one of the five kinds, never the right answer
    kinds = {
        builtin.sort_error_kind("", "a c e g h", " ".join(builtin._corrupt(rng, list("acegh")))) for _ in range(500)
    }
    assert kinds == set(builtin.SORT_ERROR_KINDS)


class StubEngine:
    """Scores = the first token id of each row, so a test decides which pairs are judged right."""

    def __call__(self, ids, mask):
        return ids[:, :1].float().expand(ids.shape)

    def eval(self):
        pass

    def train(self):
        pass


def test_per_kind_pairwise_accuracy_matches_a_hand_count():
    # 4 pairs: (chosen first token, rejected first token, kind); chosen wins when its token is larger
    pairs = [(5, 1, "swap"), (2, 3, "swap"), (4, 2, "swap"), (1, 9, "replaced")]
    batch = {
        "input_ids": torch.tensor([[c, 0] for c, _, _ in pairs] + [[r, 0] for _, r, _ in pairs]),
        "attention_mask": torch.ones(8, 2, dtype=torch.long),
        "kind": [k for _, _, k in pairs],
    }
    args = type("Args", (), {"eval_iters": 0})()
    out = evaluate(StubEngine(), lambda: [(batch, 4)], args, torch.device("cpu"), kinds=["replaced", "swap"])
    assert out["eval_accuracy"] == pytest.approx(2 / 4)
    assert out["eval_accuracy_swap"] == pytest.approx(2 / 3) and out["eval_accuracy_replaced"] == 0.0
