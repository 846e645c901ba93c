"""The PPO formulas of ppo.py against hand computations and naive loops."""

import math

import pytest
import torch

import data
from models import response_mask
from ppo import (
    adaptive_kl_coef,
    advantages_and_returns,
    aggregate,
    compute_rewards,
    gae,
    group_advantages,
    kl_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    merge_experiences,
    policy_loss,
    shape_scores,
    value_loss,
)

EOS, PAD = 1, 0


def naive_gae(rewards, values, length, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V_length = 0."""
    adv = []
    for t in range(length):
        total = 0.0
        for j in range(length - t):
            k = t + j
            next_v = values[k + 1] if k + 1 < length else 0.0
            total += (gamma * lam) ** j * (rewards[k] + gamma * next_v - values[k])
        adv.append(total)
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_naive_loop(gamma, lam):
    torch.manual_seed(0)
    lengths = [5, 1, 3]
    mask = data.pad([[1] * n for n in lengths], 0).float()
    rewards, values = torch.randn(mask.shape), torch.randn(mask.shape)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        expected = naive_gae(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert adv[b, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert ret[b, :n].tolist() == pytest.approx([a + v for a, v in zip(expected, values[b, :n].tolist())], abs=1e-5)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(3.0)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0, 4.5])
    w = masked_whiten(x, mask)
    vals = w[mask.bool()]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert vals.std().item() == pytest.approx(1.0, abs=1e-4)  # unbiased variance, as whitened
    assert (w[~mask.bool()] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    assert kept.mean().item() == pytest.approx(3.0, abs=1e-5)


def test_policy_loss_hand_computed():
    old = torch.zeros(1, 2)
    logprobs = torch.full((1, 2), math.log(1.5))  # ratio 1.5 on both tokens
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, clipfrac, approx_kl = policy_loss(logprobs, old, adv, mask, cliprange=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(1.5, 1.2) = 1.5
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert clipfrac.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(0.5 * math.log(1.5) ** 2)
    masked = policy_loss(logprobs, old, adv, torch.tensor([[1.0, 0.0]]), 0.2)[0]
    assert masked.item() == pytest.approx(-1.2)


def test_value_loss_hand_computed():
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[2.0, 0.0]])
    loss, clipfrac = value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 1: max((1-2)^2, (0.2-2)^2) = 3.24 (clipped is worse); token 2: max(0.01, 0.01) = 0.01
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -2.0, -0.2])
    d = logp - ref
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx(d.tolist())
    k3 = kl_penalty(logp, ref, "k3")
    assert k3.tolist() == pytest.approx([math.exp(-v) - 1 + v for v in d.tolist()])
    assert (k3 >= 0).all() and k3[1].item() == 0.0
    # both estimate KL(p || q): on samples from p, their means approach the exact value
    torch.manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    x = torch.multinomial(p, 200000, replacement=True)
    exact = (p * (p / q).log()).sum().item()
    for est in ("k1", "k3"):
        assert kl_penalty(p.log()[x], q.log()[x], est).mean().item() == pytest.approx(exact, abs=0.01)


def test_response_mask_keeps_first_eos_and_masks_after():
    response = torch.tensor([[5, 6, EOS, PAD, PAD], [5, EOS, 7, EOS, 8], [5, 6, 7, 8, 9], [EOS, PAD, PAD, PAD, PAD]])
    assert response_mask(response, EOS).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_reward_lands_on_eos_or_last_token():
    # left-padded prompts of different lengths followed by responses of different lengths
    response = torch.tensor([[5, 6, EOS, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD]])
    mask = response_mask(response, EOS).float()
    logprobs, ref = torch.full((3, 4), -1.0), torch.full((3, 4), -1.5)
    has_eos = torch.tensor([True, False, True])
    scores = shape_scores(torch.tensor([2.0, -9.0, 0.5]), has_eos, None, clip_reward_value=5.0, missing_eos_penalty=0.0)
    rewards, kl = compute_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    per_token = -0.1 * 0.5
    expected = [
        [per_token, per_token, per_token + 2.0, 0.0],  # score on the EOS itself
        [per_token, per_token, per_token, per_token - 5.0],  # no EOS: last token, score clipped
        [per_token + 0.5, 0.0, 0.0, 0.0],
    ]  # EOS as the only token
    assert rewards.tolist() == [pytest.approx(r) for r in expected]
    assert kl.tolist() == [pytest.approx(r) for r in (mask * 0.5).tolist()]


def test_logprobs_from_logits_temperature_and_fp32():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 3))
    out = logprobs_from_logits(logits, labels, temperature=0.7)
    expected = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert out.dtype == torch.float32 and torch.allclose(out, expected)


def test_adaptive_kl_coef_moves_toward_target():
    up = adaptive_kl_coef(
        0.1, kl=12.0, target=6.0, n_samples=1000
    )  # KL too high: coefficient up, error clipped at +0.2
    assert up == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_coef(up, kl=3.0, target=6.0, n_samples=1000) < up
    assert adaptive_kl_coef(0.1, kl=100.0, target=None, n_samples=1000) == 0.1  # no target: fixed


def test_policy_loss_ignores_padded_slots_whatever_their_log_ratio():
    # a padded slot holding garbage (log-ratio 1000: exp() overflows to inf) must not make the loss NaN
    logprobs, old = torch.tensor([[math.log(1.5), 100.0]]), torch.tensor([[0.0, -900.0]])
    adv, mask = torch.tensor([[1.0, 5.0]]), torch.tensor([[1.0, 0.0]])
    loss, clipfrac, approx_kl = policy_loss(logprobs, old, adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(-1.2) and clipfrac.item() == 1.0
    assert approx_kl.item() == pytest.approx(0.5 * math.log(1.5) ** 2)


def test_missing_eos_penalty_applies_after_the_clip():
    raw, has_eos = torch.tensor([-10.0, 10.0, 1.0, -10.0]), torch.tensor([False, False, True, True])
    shaped = shape_scores(raw, has_eos, None, clip_reward_value=5.0, missing_eos_penalty=1.0)
    assert shaped.tolist() == [-6.0, 4.0, 1.0, -5.0]  # a low score still feels the whole penalty
    stats = {"score_mean": 2.0, "score_std": 4.0}  # standardised first: (x - 2) / 4
    assert shape_scores(raw, has_eos, stats, 5.0, 1.0).tolist() == [-4.0, 1.0, -0.25, -3.0]


def test_kl_from_logits_is_the_exact_kl_and_never_negative():
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    kl = kl_from_logits(p.log().view(1, 1, 3), q.log().view(1, 1, 3))
    assert kl.shape == (1, 1) and kl.item() == pytest.approx(exact, rel=1e-5)
    torch.manual_seed(0)
    a, b = torch.randn(4, 6, 11), torch.randn(4, 6, 11)
    assert (kl_from_logits(a, b) >= 0).all() and kl_from_logits(a, a).abs().max().item() < 1e-6
    # temperature: the KL of the tempered distributions
    t = kl_from_logits(a, b, temperature=2.0)
    assert torch.allclose(t, kl_from_logits(a / 2, b / 2), atol=1e-6)


def _exp(query_lens, response_lens, seed):
    g = torch.Generator().manual_seed(seed)
    tq, tr = max(query_lens), max(response_lens)
    q_mask = data.pad([[1] * n for n in query_lens], 0, left=True)
    mask = data.pad([[1] * n for n in response_lens], 0).float()
    return {
        "query": q_mask * 7,
        "query_mask": q_mask,
        "response": mask.long() * 5,
        "mask": mask,
        "rewards": torch.randn(len(query_lens), tr, generator=g) * mask,
        "values": torch.randn(len(query_lens), tr, generator=g) * mask,
        "scores": torch.randn(len(query_lens), generator=g),
        "gen_seconds": 0.5,
        "width": tq,
    }


def test_generation_batches_merge_into_one_rollout_whitened_as_a_whole():
    # two generation batches of different widths; the second holds a single response
    a, b = _exp([3, 5], [4, 2], seed=0), _exp([2], [6], seed=1)
    exp = merge_experiences([a, b], pad_id=0)
    assert exp["query"].shape == (3, 5) and exp["response"].shape == (3, 6) and exp["scores"].shape == (3,)
    assert exp["query_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]  # left padding kept
    assert exp["mask"].sum(1).tolist() == [4, 2, 6]
    assert torch.equal(exp["rewards"][2], b["rewards"][0]) and torch.equal(exp["rewards"][0, :4], a["rewards"][0])
    adv, ret = advantages_and_returns(exp["rewards"], exp["values"], exp["mask"], _args())
    raw, _ = gae(exp["rewards"], exp["values"], exp["mask"], 1.0, 0.95)
    assert torch.allclose(adv, masked_whiten(raw, exp["mask"]))  # whitened over all 12 tokens of the rollout
    # a one-response generation batch whitened on its own would lose its sign and scale; over the rollout it keeps them
    alone = masked_whiten(gae(b["rewards"], b["values"], b["mask"], 1.0, 0.95)[0], b["mask"])
    assert not torch.allclose(adv[2], alone[0], atol=1e-3)


def _args(**kw):
    base = dict(whiten_rewards=False, advantage_estimator="gae", n_samples_per_prompt=4, gamma=1.0, lam=0.95)
    return type("Args", (), {**base, **kw})()


# one group of 4 responses to one prompt, lengths 3, 1, 2, 3; scores on the last token, a small KL reward per token
LENGTHS, SCORES, KL_REWARD = [3, 1, 2, 3], [1.0, 0.0, 0.0, 3.0], -0.1


def _group():
    mask = data.pad([[1] * n for n in LENGTHS], 0).float()
    rewards = KL_REWARD * mask
    for b, n in enumerate(LENGTHS):
        rewards[b, n - 1] += SCORES[b]
    return rewards, mask


def test_group_estimators_match_hand_computation():
    rewards, mask = _group()
    totals = [SCORES[b] + KL_REWARD * n for b, n in enumerate(LENGTHS)]  # R = score - KL penalty: 0.7, -0.1, -0.2, 2.7
    mean = sum(totals) / 4
    std = math.sqrt(sum((t - mean) ** 2 for t in totals) / 3)  # unbiased, as torch.std
    expected = {
        "grpo": [(t - mean) / (std + 1e-6) for t in totals],
        "dr_grpo": [t - mean for t in totals],
        "rloo": [t - (sum(totals) - t) / 3 for t in totals],
    }
    for estimator, want in expected.items():
        adv, _ = advantages_and_returns(rewards, torch.zeros_like(rewards), mask, _args(advantage_estimator=estimator))
        for b, n in enumerate(LENGTHS):  # the same advantage on every token of a response, 0 after it
            assert adv[b, :n].tolist() == pytest.approx([want[b]] * n, abs=1e-5), estimator
            assert (adv[b, n:] == 0).all()
    two_groups = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0]), 2, "dr_grpo")  # groups of 2
    assert two_groups.tolist() == [-0.5, 0.5] * 2 + [0, 0]


def test_reinforce_pp_is_the_whitened_discounted_return():
    rewards, mask = _group()
    args = _args(advantage_estimator="reinforce_pp", gamma=0.5)
    adv, returns = advantages_and_returns(rewards, torch.zeros_like(rewards), mask, args)
    # return at t = sum over later tokens of 0.5^(s - t) r_s; response 0: r = [-0.1, -0.1, 0.9]
    assert returns[0, :3].tolist() == pytest.approx([-0.1 + 0.5 * -0.1 + 0.25 * 0.9, -0.1 + 0.5 * 0.9, 0.9])
    assert returns[1, 0].item() == pytest.approx(-0.1)
    assert torch.allclose(adv, masked_whiten(returns, mask), atol=1e-6)


def test_loss_aggregation_modes():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(loss, mask, "token-mean", 5).item() == pytest.approx((1 + 2 + 3 + 4) / 4)  # every token
    assert aggregate(loss, mask, "seq-mean-token-mean", 5).item() == pytest.approx((2.0 + 4.0) / 2)  # every sequence
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", 5).item() == pytest.approx((6 + 4) / (2 * 5))  # Dr. GRPO
    # the policy loss uses the mode: with advantages 1 and no ratio change it is -1 per token whatever the mode
    lp = torch.zeros(2, 3)
    dr_grpo = policy_loss(lp, lp, torch.ones(2, 3), mask, 0.2, "seq-mean-token-sum-norm", 5)[0]
    assert dr_grpo.item() == pytest.approx(-4 / 10)


def test_distributed_whitening_uses_every_ranks_statistics(monkeypatch):
    import common

    x, mask = torch.tensor([[1.0, 2.0, 3.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # a second rank holding [5, 6, 7]: the global mean is 4, the unbiased variance (9+4+1+1+4+9) / 5 = 5.6
    other = [18.0, 25.0 + 36 + 49, 3.0]
    monkeypatch.setattr(common, "world_size", lambda: 2)
    monkeypatch.setattr(common, "all_reduce_sum", lambda values, device: [a + b for a, b in zip(values, other)])
    out = masked_whiten(x, mask, distributed=True)
    assert out[0, :3].tolist() == pytest.approx([(v - 4) / math.sqrt(5.6) for v in (1, 2, 3)], rel=1e-5)
    assert out[0, 3].item() == 0.0
