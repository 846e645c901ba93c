"""What the field added since DeepSpeed-Chat (issue 28), against hand computations on groups of 4 responses: DAPO's
clip-higher, dynamic sampling and overlong shaping, GSPO's sequence-level ratio, truncated importance sampling."""

import argparse
import math
import types

import pytest
import torch

import ppo

# one group of 4 responses, one token each: policy / old log-ratios and advantages
LOG_RATIO = torch.tensor([[math.log(0.5)], [math.log(0.9)], [math.log(1.5)], [math.log(1.1)]])
ADV, MASK = torch.tensor([[1.0], [1.0], [1.0], [-1.0]]), torch.ones(4, 1)


def test_clip_higher_lets_an_unlikely_token_rise_further():
    loss = lambda **kw: ppo.policy_loss(LOG_RATIO, torch.zeros(4, 1), ADV, MASK, 0.2, **kw)[0].item()
    # per token max(-A r, -A clip(r, 1 - 0.2, 1 + eps_high)): -0.5 (r 0.5), -0.9, -min(1.5, 1 + eps_high), +1.1
    assert loss() == pytest.approx((-0.5 - 0.9 - 1.2 + 1.1) / 4)  # symmetric: the default, as before
    assert loss(cliprange_high=0.28) == pytest.approx((-0.5 - 0.9 - 1.28 + 1.1) / 4)


def test_gspo_clips_one_length_normalised_ratio_per_response():
    # 4 responses of 2, 1, 3 and 2 tokens; token log-ratios; one advantage per response (a group estimator's)
    lr = torch.tensor([[0.1, 0.3, 0.0], [-0.5, 0.0, 0.0], [0.05, 0.05, 0.05], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]).float()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])[:, None] * mask
    s = [math.exp(0.2), math.exp(-0.5), math.exp(0.05), 1.0]  # exp(mean token log-ratio), response by response
    per_seq = [max(-a * r, -a * min(max(r, 0.8), 1.2)) for a, r in zip((1, 1, -1, -1), s)]  # -1.2 (clipped), ...
    loss, clipfrac, _ = ppo.policy_loss(lr, torch.zeros(4, 3), adv, mask, 0.2, "seq-mean-token-mean", level="sequence")
    assert loss.item() == pytest.approx(sum(per_seq) / 4, rel=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 8)  # response 0's two tokens: its ratio 1.22 is clipped at 1.2


def test_truncated_importance_weights_scale_each_tokens_loss():
    old, sampler = torch.tensor([[-1.0, -2.0, -0.5, 0.0]]), torch.tensor([[-1.5, -1.0, -0.5, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last slot is padding: weight 1, never exp(9)
    w = ppo.tis_weights(old, sampler, mask, cap=1.5)
    assert w[0].tolist() == pytest.approx([1.5, math.exp(-1.0), 1.0, 1.0])  # min(e^0.5 = 1.65, 1.5), e^-1, 1, pad
    zero = torch.zeros(1, 4)
    loss = ppo.policy_loss(zero, zero, torch.ones(1, 4), mask, 0.2, weights=w)[0]  # ratio 1: token losses -A = -1
    assert loss.item() == pytest.approx(-(1.5 + math.exp(-1.0) + 1.0) / 3)


def test_dynamic_sampling_keeps_the_groups_that_carry_signal():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # 3 groups of 4
    assert ppo.keep_groups(scores, 4).tolist() == [False, True, False]  # all right, mixed, all wrong


def test_overlong_penalty_is_soft_over_the_buffer():
    lengths = torch.tensor([10.0, 48.0, 50.0, 58.0, 64.0])  # max 64 tokens, a buffer of the last 16
    assert ppo.overlong_penalty(lengths, 64, 16).tolist() == pytest.approx([0, 0, -2 / 16, -10 / 16, -1])


class FakeTrainer:
    """generate_experience returns the next batch of preset scores (groups of 2): what refill_groups sees."""

    def __init__(self, batches):
        self.batches, self.device = list(batches), torch.device("cpu")
        self.args = argparse.Namespace(n_samples_per_prompt=2, seed=1, dynamic_sampling_max_batches=2,
                                       per_device_generation_batch_size=2)  # fmt: skip
        self.tokenizer = types.SimpleNamespace(pad_token_id=0)

    def generate_experience(self, batch):
        return experience(self.batches.pop(0))


def experience(scores):
    scores = torch.tensor(scores)
    return {"scores": scores, "mask": torch.ones(len(scores), 3), "gen_seconds": 1.0}


def test_refill_replaces_dropped_groups_and_keeps_the_rollout_size():
    prompts = {"ids": [[5, 6]] * 10, "instructions": ["q"] * 10}
    first = experience([1.0, 1.0, 0.0, 1.0])  # group 0 all right: dropped; group 1 kept
    trainer = FakeTrainer([[0.0, 0.0, 1.0, 0.0]])  # one extra batch: group 0 dropped, group 1 kept
    out, m = ppo.refill_groups(trainer, [first], prompts, step=0)
    assert m == {"dropped_groups": 2, "extra_batches": 1}
    assert [x["scores"].tolist() for x in out] == [[0.0, 1.0], [1.0, 0.0]]  # two kept groups: 4 sequences again
    trainer = FakeTrainer([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])  # never a useful group: stop at 2 extra
    out, m = ppo.refill_groups(trainer, [first], prompts, step=0)
    assert m == {"dropped_groups": 5, "extra_batches": 2}
    assert sum(len(x["scores"]) for x in out) == 4 and out[0]["scores"].tolist() == [0.0, 1.0]  # + a dropped group
    assert sum(x["gen_seconds"] for x in out) == 1.0  # a dropped group filling in is not counted twice
