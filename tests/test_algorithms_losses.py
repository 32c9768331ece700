"""Losses: hand-computed values, float64 python loops on seeded random batches, masking and padding
edge cases, and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_ray.algorithms import (
    aggregate_loss,
    bradley_terry_loss,
    dpo_loss,
    ppo_policy_loss,
    sft_loss,
    value_loss,
    value_loss_stats,
)


def _close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def _softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


# ---- aggregation ---------------------------------------------------------------------------------------
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
AGG_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # last row: no token


def test_aggregate_token_mean():
    assert aggregate_loss(PER_TOKEN, AGG_MASK, "token-mean").item() == pytest.approx(10 / 4)


def test_aggregate_seq_mean_token_mean_skips_empty_rows():
    # row means 2 and 4; the empty row does not count
    assert aggregate_loss(PER_TOKEN, AGG_MASK, "seq-mean-token-mean").item() == pytest.approx(3.0)


def test_aggregate_seq_mean_token_sum_divides_by_constant():
    # row sums 6, 4, 0 over T = 3, then the mean over the 3 rows
    assert aggregate_loss(PER_TOKEN, AGG_MASK, "seq-mean-token-sum").item() == pytest.approx(10 / 9)
    assert aggregate_loss(PER_TOKEN, AGG_MASK, "seq-mean-token-sum", max_len=4).item() == pytest.approx(
        10 / 12
    )


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregate_all_masked_is_zero_even_with_inf_padding(agg):
    per_token = torch.tensor([[float("inf"), 1.0], [2.0, float("nan")]])
    assert aggregate_loss(per_token, torch.zeros(2, 2), agg).item() == 0.0


def test_aggregate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate_loss(PER_TOKEN, AGG_MASK, "sum")


# ---- PPO policy loss -----------------------------------------------------------------------------------
def _ratios(*r):
    return torch.tensor([[math.log(v) for v in r]]), torch.zeros(1, len(r))


def test_ppo_policy_loss_hand_values():
    logprobs, old = _ratios(1.5, 0.5, 1.0, 1.1)
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0]])
    loss, stats = ppo_policy_loss(logprobs, old, adv, torch.ones(1, 4), clip_eps=0.2)
    # per token: max(-1.5, -1.2) = -1.2 (clipped); max(0.5, 0.8) = 0.8 (clipped); -2; 1.1
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.0 + 1.1) / 4)
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx(4.1 / 4)
    # k3(old || new) = r - 1 - log r: 0.094535 + 0.193147 + 0 + 0.004690
    assert stats["approx_kl"] == pytest.approx(0.07309297316186401, rel=1e-5)
    assert stats["ratio_max"] == pytest.approx(1.5) and stats["ratio_min"] == pytest.approx(0.5)
    assert stats["dual_clip_frac"] == 0.0


def test_ppo_policy_loss_clip_higher():
    logprobs, old = _ratios(1.5, 0.5, 1.0, 1.1)
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0]])
    loss, stats = ppo_policy_loss(logprobs, old, adv, torch.ones(1, 4), clip_eps=0.2, clip_eps_high=0.6)
    # upper clip 1.6: token 0 is no longer clipped (-1.5); the lower clip still binds token 1
    assert loss.item() == pytest.approx((-1.5 + 0.8 - 2.0 + 1.1) / 4)
    assert stats["clip_frac"] == pytest.approx(0.25)


def test_ppo_dual_clip_hand_values():
    logprobs, old = _ratios(5.0, 2.0, 5.0)
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    loss, stats = ppo_policy_loss(logprobs, old, adv, torch.ones(1, 3), clip_eps=0.2, dual_clip=3.0)
    # A<0: min(max(5, 1.2), 3) = 3 and min(max(2, 1.2), 3) = 2; A>0 untouched: max(-5, -1.2) = -1.2
    assert loss.item() == pytest.approx((3.0 + 2.0 - 1.2) / 3)
    assert stats["dual_clip_frac"] == pytest.approx(1 / 3)
    without, _ = ppo_policy_loss(logprobs, old, adv, torch.ones(1, 3), clip_eps=0.2)
    assert without.item() == pytest.approx((5.0 + 2.0 - 1.2) / 3)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(logprobs, old, adv, torch.ones(1, 3), dual_clip=0.5)


def test_ppo_padding_and_prompt_are_ignored_and_gradients_flow_only_to_unclipped_tokens():
    # prompt token, 4 response tokens (ratios 1.5, 0.5, 1.0, 1.1), one pad with a wild log-ratio
    logprobs = torch.tensor(
        [[3.0, math.log(1.5), math.log(0.5), 0.0, math.log(1.1), 50.0]], requires_grad=True
    )
    old = torch.tensor([[-9.0, 0.0, 0.0, 0.0, 0.0, -50.0]])
    adv = torch.tensor([[7.0, 1.0, -1.0, 2.0, -1.0, -7.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask)
    assert loss.item() == pytest.approx(-0.325)
    assert stats["clip_frac"] == pytest.approx(0.5) and stats["ratio_max"] == pytest.approx(1.5)
    loss.backward()
    # d(-r A)/d logp = -r A / 4 on the unclipped tokens; 0 on clipped, prompt and pad tokens
    _close(logprobs.grad, [[0.0, 0.0, 0.0, -0.5, 1.1 / 4, 0.0]])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_ppo_policy_loss_matches_python_loop(agg, dual_clip):
    g = torch.Generator().manual_seed(11)
    batch, length = 5, 8
    old = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3
    logprobs = (old + 0.6 * torch.randn(batch, length, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(batch, length, generator=g, dtype=torch.float64)
    mask = torch.zeros(batch, length, dtype=torch.float64)
    spans = [(0, 0), (2, 3), (1, 8), (3, 6), (0, 5)]  # an empty row, a one-token row, right padding
    for b, (s, e) in enumerate(spans):
        mask[b, s:e] = 1.0
    loss, stats = ppo_policy_loss(
        logprobs, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28, dual_clip=dual_clip, agg=agg
    )

    rows, clipped, kls, n = [], 0, 0.0, 0
    for b, (s, e) in enumerate(spans):
        row = []
        for t in range(s, e):
            r = math.exp(logprobs[b, t].item() - old[b, t].item())
            a = adv[b, t].item()
            term = max(-r * a, -min(max(r, 0.8), 1.28) * a)
            clipped += -min(max(r, 0.8), 1.28) * a > -r * a
            if dual_clip is not None and a < 0:
                term = min(term, -dual_clip * a)
            row.append(term)
            kls += r - 1 - math.log(r)
            n += 1
        rows.append(row)
    if agg == "token-mean":
        expected = sum(sum(r) for r in rows) / n
    elif agg == "seq-mean-token-mean":
        expected = sum(sum(r) / len(r) for r in rows if r) / sum(1 for r in rows if r)
    else:
        expected = sum(sum(r) / length for r in rows) / batch
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert stats["clip_frac"] == pytest.approx(clipped / n, abs=1e-12)
    assert stats["approx_kl"] == pytest.approx(kls / n, abs=1e-12)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad.abs().sum() > 0
    assert (logprobs.grad[mask == 0] == 0).all()


def test_ppo_huge_log_ratio_stays_finite():
    logprobs = torch.tensor([[0.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-200.0, -1.0]])
    loss, stats = ppo_policy_loss(logprobs, old, torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2))
    loss.backward()
    assert math.isfinite(loss.item()) and math.isfinite(stats["approx_kl"])
    assert torch.isfinite(logprobs.grad).all()


# ---- value loss ----------------------------------------------------------------------------------------
def test_value_loss_hand_values():
    values = torch.tensor([[1.0, 2.0, 5.0]])
    old = torch.tensor([[0.5, 2.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # token 0: max((1-2)^2, (0.7-2)^2) = 1.69; token 1: 1; token 2 is padding
    assert value_loss(values, old, returns, mask, clip=0.2).item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert value_loss(values, old, returns, mask).item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    stats = value_loss_stats(values, old, returns, mask, clip=0.2)
    assert stats["vf_clip_frac"] == pytest.approx(0.5)
    assert stats["value_mean"] == pytest.approx(1.5) and stats["value_error"] == pytest.approx(1.0)


def test_value_loss_matches_python_loop_and_has_gradient():
    g = torch.Generator().manual_seed(12)
    values = torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    old = values.detach() + 0.5 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    returns = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0]])
    loss = value_loss(values, old, returns, mask, clip=0.2)
    terms = []
    for b in range(4):
        for t in range(6):
            if mask[b, t]:
                v, o, r = values[b, t].item(), old[b, t].item(), returns[b, t].item()
                vc = o + min(max(v - o, -0.2), 0.2)
                terms.append(max((v - r) ** 2, (vc - r) ** 2))
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), abs=1e-12)
    loss.backward()
    assert torch.isfinite(values.grad).all() and values.grad.abs().sum() > 0
    assert (values.grad[mask == 0] == 0).all()


# ---- reward model, DPO, SFT ----------------------------------------------------------------------------
def test_bradley_terry_hand_values():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # (-log sigmoid(2) - log sigmoid(0)) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(0.4100375958014589)
    # margin 2: (-log sigmoid(0) - log sigmoid(-2)) / 2
    assert bradley_terry_loss(chosen, rejected, margin=2.0).item() == pytest.approx(1.410037595801459)
    per_pair = bradley_terry_loss(chosen, rejected, margin=torch.tensor([2.0, 0.0]))
    assert per_pair.item() == pytest.approx(math.log(2.0))


def test_bradley_terry_gradient_pushes_scores_apart():
    chosen = torch.tensor([0.3, -1.0], requires_grad=True)
    rejected = torch.tensor([0.1, 2.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    # d/dc of -log sigmoid(c - r) / 2 = -(1 - sigmoid(c - r)) / 2
    assert chosen.grad[0].item() == pytest.approx(-(1 - 1 / (1 + math.exp(-0.2))) / 2)


def test_dpo_sigmoid_hand_values():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-3.0])
    rc, rr = torch.tensor([-2.0]), torch.tensor([-2.0])
    # h = (-1 + 2) - (-3 + 2) = 2; beta h = 0.2
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert losses.item() == pytest.approx(0.5981388693815918)
    assert chosen_r.item() == pytest.approx(0.1) and rejected_r.item() == pytest.approx(-0.1)
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.6181388693815918)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((2.0 - 5.0) ** 2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge")


def test_dpo_matches_python_loop_and_rewards_are_detached():
    g = torch.Generator().manual_seed(13)
    pc, pr, rc, rr = (-5 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    pc.requires_grad_(True)
    losses, chosen_r, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.2)
    for i in range(6):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        expected = 0.8 * _softplus(-0.3 * h) + 0.2 * _softplus(0.3 * h)
        assert losses[i].item() == pytest.approx(expected, abs=1e-12)
    assert not chosen_r.requires_grad
    losses.sum().backward()
    assert (pc.grad < 0).all()  # raising the chosen log-prob lowers the loss


def test_ipo_matches_python_loop_and_hand_derived_gradient():
    # IPO (Azar et al. 2023): loss = (h - 1/(2 beta))^2, h = (pc - rc) - (pr - rr); so
    # dloss/dpc = dloss/drr = 2 (h - 1/(2 beta)) and dloss/dpr = dloss/drc = -2 (h - 1/(2 beta)).
    g = torch.Generator().manual_seed(17)
    beta = 0.25  # target gap 1/(2 beta) = 2: some pairs below it, some above
    pc, pr, rc, rr = (
        (-5 * torch.rand(8, generator=g, dtype=torch.float64)).requires_grad_(True) for _ in range(4)
    )
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    losses.sum().backward()
    below = 0
    for i in range(8):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        gap = h - 1.0 / (2.0 * beta)
        below += gap < 0
        assert losses[i].item() == pytest.approx(gap * gap, abs=1e-12)
        assert pc.grad[i].item() == pytest.approx(2 * gap, abs=1e-12)
        assert rr.grad[i].item() == pytest.approx(2 * gap, abs=1e-12)
        assert pr.grad[i].item() == pytest.approx(-2 * gap, abs=1e-12)
        assert rc.grad[i].item() == pytest.approx(-2 * gap, abs=1e-12)
        assert chosen_r[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), abs=1e-12)
        assert rejected_r[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()), abs=1e-12)
    assert 0 < below < 8  # the gradient's sign flips across the target gap, both sides exercised
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    # Independent of the hand derivation: central finite differences in float64.
    inputs = tuple(t.detach().requires_grad_(True) for t in (pc, pr, rc, rr))
    assert torch.autograd.gradcheck(
        lambda *x: dpo_loss(*x, beta=beta, loss_type="ipo")[0], inputs, eps=1e-6, atol=1e-7
    )


def test_sft_loss_hand_values_and_ignores_masked_labels():
    logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens: -log(1/4) per token
    logits[0, 1] = torch.tensor([0.0, math.log(3.0), 0.0, -100.0])  # p(1) = 3/5
    labels = torch.tensor([[-100, 1, 2]])  # the masked label is an ignore id, never gathered
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    assert sft_loss(logits, labels, mask).item() == pytest.approx((-math.log(0.6) + math.log(4.0)) / 2)


def test_sft_loss_matches_cross_entropy_and_has_gradient():
    g = torch.Generator().manual_seed(14)
    logits = torch.randn(3, 5, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    ours = sft_loss(logits, labels, mask)
    ref = F.cross_entropy(logits.reshape(-1, 11), torch.where(mask.bool(), labels, -100).reshape(-1))
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)
    ours.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[mask == 0] == 0).all() and logits.grad[mask == 1].abs().sum() > 0
