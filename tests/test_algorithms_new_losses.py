"""Issue 13's pure functions against float64 values computed by hand: the seq-mean-token-sum-norm
aggregation, asymmetric clipping, the GSPO loss (value and gradient), DAPO's overlong penalty and group
selection, rollout-vs-trainer correction (TIS, MIS, ratio statistics), pass@k and mean@k. No Ray."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algorithms import (
    aggregate_loss,
    gspo_policy_loss,
    informative_groups,
    mean_at_k,
    mis_mask,
    overlong_penalty,
    pass_at_k,
    ppo_policy_loss,
    ratio_stats,
    sequence_log_ratio,
    sequence_tis_weights,
    token_tis_weights,
)

F64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def close(actual, expected, atol=1e-12):
    torch.testing.assert_close(
        actual, t(expected) if not torch.is_tensor(expected) else expected, atol=atol, rtol=0
    )


# ---- aggregation ---------------------------------------------------------------------------------------
PER_TOKEN = t([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
AGG_MASK = t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_seq_mean_token_sum_norm_divides_by_the_constant():
    # row sums 6, 4, 0 over the constant (T = 3, or max_len = 8), mean over the 3 rows
    close(aggregate_loss(PER_TOKEN, AGG_MASK, "seq-mean-token-sum-norm"), 10 / 9)
    close(aggregate_loss(PER_TOKEN, AGG_MASK, "seq-mean-token-sum-norm", max_len=8), 10 / 24)
    # unlike token-mean (10 / 4) and seq-mean-token-mean ((2 + 4) / 2), a longer answer weighs more
    close(aggregate_loss(PER_TOKEN, AGG_MASK, "token-mean"), 10 / 4)
    close(aggregate_loss(PER_TOKEN, AGG_MASK, "seq-mean-token-mean"), 3.0)
    assert aggregate_loss(PER_TOKEN, torch.zeros(3, 3), "seq-mean-token-sum-norm").item() == 0.0


def test_unknown_mode_lists_all_four():
    with pytest.raises(ValueError, match="'token-mean'.*'seq-mean-token-sum-norm'"):
        aggregate_loss(PER_TOKEN, AGG_MASK, "sum")


# ---- asymmetric clipping (DAPO clip-higher; clip_eps is the lower bound) -----------------------------------
def test_asymmetric_clip_hand_values():
    # ratios 0.8 (A = -1) and 1.25 (A = +1); bounds [1 - 0.1, 1 + 0.3] = [0.9, 1.3]
    old = t([[0.0, 0.0]])
    logprobs = torch.log(t([[0.8, 1.25]]))
    adv, mask = t([[-1.0, 1.0]]), torch.ones(1, 2, dtype=F64)
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.1, clip_eps_high=0.3)
    # token 1: max(0.8, 0.9) = 0.9 (clipped below); token 2: max(-1.25, -1.25) = -1.25 (inside the band)
    close(loss, (0.9 - 1.25) / 2)
    assert stats["clip_frac"] == 0.5
    # symmetric 0.2: token 1 inside [0.8, 1.2] -> 0.8, token 2 clipped above -> -1.2
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    close(loss, (0.8 - 1.2) / 2)
    assert stats["clip_frac"] == 0.5


# ---- GSPO --------------------------------------------------------------------------------------------------
GSPO_LP = t([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
GSPO_OLD = t([[-1.1, -1.8, 5.0], [-0.6, -0.6, -0.6]])  # 5.0 sits on padding: must not count
GSPO_ADV = t([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]])
GSPO_MASK = t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


def test_gspo_hand_values():
    # s_0 = exp(mean(0.1, -0.2)) = exp(-0.05): below 1 - 0.02 with A > 0, so the unclipped term is the min
    # s_1 = exp(mean(0.1, 0.1, 0.1)) = exp(0.1) = 1.10517 > 1 + 0.03 with A = 2: clipped at 1.03
    s0, s1 = math.exp(-0.05), math.exp(0.1)
    lp = GSPO_LP.clone().requires_grad_(True)
    loss, stats = gspo_policy_loss(lp, GSPO_OLD, GSPO_ADV, GSPO_MASK, clip_eps=0.02, clip_eps_high=0.03)
    close(loss, (-s0 * 1.0 + -1.03 * 2.0) / 2)  # seq-mean-token-mean: the mean over the 2 sequences
    assert stats["clip_frac"] == 0.5
    assert stats["ratio_mean"] == pytest.approx((s0 + s1) / 2, abs=1e-12)
    assert (stats["ratio_max"], stats["ratio_min"]) == (pytest.approx(s1), pytest.approx(s0))
    assert stats["pg_loss"] == pytest.approx(loss.item())
    # d loss / d lp_{0,t} = (1/2) * (-A_0) * s_0 * (1/2): the sequence ratio's gradient spread over its
    # two tokens; the clipped sequence gets none, nor does padding
    loss.backward()
    close(lp.grad, t([[-s0 / 4, -s0 / 4, 0.0], [0.0, 0.0, 0.0]]))


def test_gspo_other_aggregations_and_on_policy():
    s0 = math.exp(-0.05)
    per_seq = [-s0, -1.03 * 2.0]
    loss, _ = gspo_policy_loss(GSPO_LP, GSPO_OLD, GSPO_ADV, GSPO_MASK, 0.02, 0.03, agg="token-mean")
    close(loss, (2 * per_seq[0] + 3 * per_seq[1]) / 5)
    loss, _ = gspo_policy_loss(
        GSPO_LP, GSPO_OLD, GSPO_ADV, GSPO_MASK, 0.02, 0.03, agg="seq-mean-token-sum-norm", max_len=4
    )
    close(loss, (2 * per_seq[0] / 4 + 3 * per_seq[1] / 4) / 2)
    # old == new: every ratio 1, the loss is minus the mean sequence advantage
    loss, stats = gspo_policy_loss(GSPO_LP, GSPO_LP, GSPO_ADV, GSPO_MASK)
    close(loss, -(1.0 + 2.0) / 2)
    assert stats["clip_frac"] == 0.0 and stats["ratio_mean"] == 1.0


def test_gspo_ignores_empty_rows_and_refuses_dual_clip():
    mask = t([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    loss, stats = gspo_policy_loss(GSPO_LP, GSPO_OLD, GSPO_ADV, mask, 0.02, 0.03)
    close(loss, -math.exp(-0.05))  # the empty row counts in no mean
    assert stats["ratio_mean"] == pytest.approx(math.exp(-0.05))
    with pytest.raises(ValueError, match="dual_clip"):
        gspo_policy_loss(GSPO_LP, GSPO_OLD, GSPO_ADV, mask, dual_clip=3.0)


# ---- DAPO: overlong penalty, dynamic sampling's selection -----------------------------------------------
def test_overlong_penalty_hand_values():
    # max_len 10, buffer 4: the band is (6, 10]; penalty 0.5 at 10
    lengths = torch.tensor([3, 6, 7, 9, 10])
    close(overlong_penalty(lengths.to(F64), 10, 4, 0.5), [0.0, 0.0, -0.125, -0.375, -0.5])
    assert overlong_penalty(lengths, 10, 4, 0.5).dtype == torch.get_default_dtype()  # integer lengths
    close(overlong_penalty(t([12.0]), 10, 4, 0.5), [-0.5])  # past the limit: the full penalty
    close(overlong_penalty(lengths.to(F64), 10, 0), [0.0] * 5)  # buffer 0: off
    with pytest.raises(ValueError, match="overlong_buffer"):
        overlong_penalty(lengths, 10, 11)


def test_informative_groups():
    kept, dropped = informative_groups(t([1, 1, 0, 1, 2, 2, 3, 0]), group_size=2)
    assert kept.tolist() == [2, 3, 6, 7] and dropped == 2
    kept, dropped = informative_groups(t([0.5, 0.5, 0.5]), group_size=3)
    assert kept.tolist() == [] and kept.dtype == torch.long and dropped == 1
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        informative_groups(t([1, 2, 3]), group_size=2)


# ---- rollout-vs-trainer correction -------------------------------------------------------------------------
TRAINER = t([[-1.0, -2.0, 0.0], [-0.2, -0.3, -0.4]])
# log-ratios trainer - rollout: (0.5, -1.0, pad) and (0, 0.05, 0.95)
ROLLOUT = t([[-1.5, -1.0, -9.0], [-0.2, -0.35, -1.35]])
CMASK = t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


def test_token_tis_weights():
    w = token_tis_weights(TRAINER, ROLLOUT, CMASK, cap=2.0)
    close(w, [[math.exp(0.5), math.exp(-1.0), 0.0], [1.0, math.exp(0.05), 2.0]])  # e^0.95 = 2.586 capped


def test_sequence_tis_weights_and_log_ratio():
    close(sequence_log_ratio(TRAINER, ROLLOUT, CMASK), [-0.5, 1.0])
    close(sequence_log_ratio(TRAINER, ROLLOUT, CMASK, geometric=True), [-0.25, 1.0 / 3])
    close(sequence_tis_weights(TRAINER, ROLLOUT, CMASK, cap=2.0), [math.exp(-0.5), 2.0])  # e = 2.718 capped
    close(
        sequence_tis_weights(TRAINER, ROLLOUT, CMASK, cap=2.0, geometric=True),
        [math.exp(-0.25), math.exp(1 / 3)],
    )


def test_mis_mask():
    # sequence ratios e^-0.5 = 0.607 (inside [0.5, 2]) and e = 2.718 (outside); geometric: 0.779, 1.396
    assert mis_mask(TRAINER, ROLLOUT, CMASK, 0.5, 2.0).tolist() == [True, False]
    assert mis_mask(TRAINER, ROLLOUT, CMASK, 0.5, 2.0, geometric=True).tolist() == [True, True]
    assert mis_mask(TRAINER, ROLLOUT, CMASK, 0.7, 3.0).tolist() == [False, True]
    with pytest.raises(ValueError, match="band"):
        mis_mask(TRAINER, ROLLOUT, CMASK, 1.2, 2.0)


def test_ratio_stats():
    ratios = [math.exp(0.5), math.exp(-1.0), 1.0, math.exp(0.05), math.exp(0.95)]
    stats = ratio_stats(TRAINER, ROLLOUT, CMASK)
    assert stats["rollout_ratio/mean"] == pytest.approx(sum(ratios) / 5, abs=1e-12)
    assert stats["rollout_ratio/max"] == pytest.approx(math.exp(0.95), abs=1e-12)
    assert stats["rollout_ratio/min"] == pytest.approx(math.exp(-1.0), abs=1e-12)
    assert stats["rollout_ratio/frac_outside"] == pytest.approx(3 / 5)  # 1.65, 0.37, 2.59 outside [0.9, 1.1]
    assert ratio_stats(TRAINER, ROLLOUT, torch.zeros(2, 3))["rollout_ratio/mean"] == 0.0


def test_weights_carry_no_gradient():
    lp = TRAINER.clone().requires_grad_(True)
    assert not token_tis_weights(lp, ROLLOUT, CMASK).requires_grad
    assert not sequence_tis_weights(lp, ROLLOUT, CMASK).requires_grad


# ---- pass@k, mean@k ----------------------------------------------------------------------------------------
def test_pass_at_k_hand_values():
    correct = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    # 1 - C(3,2)/C(5,2) = 1 - 3/10; no correct: 0; n - c = 1 < k = 2: 1; 1 - C(4,2)/C(5,2) = 1 - 6/10
    close(pass_at_k(correct, 2), [0.7, 0.0, 1.0, 0.4])
    close(pass_at_k(correct.bool(), 1), [0.4, 0.0, 0.8, 0.2])  # pass@1: the fraction correct
    close(pass_at_k(correct, 5), [1.0, 0.0, 1.0, 1.0])


def test_pass_at_k_matches_binomials_and_stays_finite():
    for n, c, k in [(10, 3, 4), (16, 0, 8), (16, 15, 1), (20, 7, 13)]:
        row = torch.zeros(1, n)
        row[0, :c] = 1
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(row, k).item() == pytest.approx(expected, abs=1e-12), (n, c, k)
    # C(200, 100) ~ 9e58: the product form needs no binomial; 1 - C(199,100)/C(200,100) = 1 - 100/200
    row = torch.zeros(1, 200)
    row[0, 0] = 1
    assert pass_at_k(row, 100).item() == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match="k=6"):
        pass_at_k(torch.zeros(2, 5), 6)


def test_mean_at_k():
    scores = t([[1.0, 0.0, 0.5, 0.5], [0.2, 0.4, 0.6, 0.8]])
    close(mean_at_k(scores, 2), [0.5, 0.5])
    with pytest.raises(ValueError, match="prompts, samples"):
        mean_at_k(t([1.0, 2.0]), 1)
