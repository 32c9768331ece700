"""Masked statistics, log-probs/entropy from logits, KL estimators and controllers: hand-computed values,
float64 python references on seeded random inputs, and the edge cases (empty masks, inf in padding)."""

import math
import statistics

import pytest
import torch

from rlhf_ray.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
)
from rlhf_ray.algorithms import stats as stats_module

INF = float("inf")


def _random_batch(seed: int, batch: int = 5, length: int = 9):
    """Random values and a right-padded mask with a masked prompt region; row 0 fully masked."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, generator=g, dtype=torch.float64)
    mask = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(1, batch):
        start = int(torch.randint(0, length - 1, (1,), generator=g))
        end = int(torch.randint(start + 1, length + 1, (1,), generator=g))
        mask[b, start:end] = 1.0
    return x, mask


def _selected(x, mask):
    return [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t] != 0]


# ---- masked statistics ----------------------------------------------------------------------------
def test_masked_mean_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 4.0])
    assert masked_mean(x, mask.bool()).item() == pytest.approx(7 / 3)


def test_masked_mean_empty_mask_is_zero_and_ignores_inf_in_padding():
    x = torch.tensor([[1.0, INF], [float("nan"), -INF]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert masked_mean(x, mask).item() == 1.0
    assert masked_mean(x, mask, dim=1).tolist() == [1.0, 0.0]  # the all-masked row gives 0
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_var_is_bessel_corrected():
    x = torch.tensor([[1.0, 2.0, 99.0], [4.0, -7.0, INF]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # values 1, 2, 4: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9, / (3 - 1) = 7/3
    assert masked_var(x, mask).item() == pytest.approx(7 / 3)


def test_masked_var_fewer_than_two_elements_is_zero():
    x = torch.tensor([[3.0, 5.0]])
    assert masked_var(x, torch.tensor([[0.0, 1.0]])).item() == 0.0
    assert masked_var(x, torch.tensor([[0.0, 0.0]])).item() == 0.0


def test_masked_whiten_hand_values():
    x = torch.tensor([[1.0, 2.0, 4.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    scale = 1 / math.sqrt(7 / 3 + 1e-8)
    expected = [(v - 7 / 3) * scale for v in (1.0, 2.0, 4.0)]
    assert masked_whiten(x, mask)[0, :3].tolist() == pytest.approx(expected, rel=1e-6)
    unshifted = masked_whiten(x, mask, shift_mean=False)[0, :3]
    assert unshifted.tolist() == pytest.approx([e + 7 / 3 for e in expected], rel=1e-6)


def test_masked_whiten_empty_mask_gives_zeros():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = masked_whiten(x, torch.zeros(2, 2))
    assert torch.equal(out, torch.zeros(2, 2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_stats_match_python_reference(seed):
    x, mask = _random_batch(seed)
    values = _selected(x, mask)
    assert masked_mean(x, mask).item() == pytest.approx(statistics.fmean(values), abs=1e-12)
    assert masked_var(x, mask).item() == pytest.approx(statistics.variance(values), abs=1e-12)
    mean, std = statistics.fmean(values), math.sqrt(statistics.variance(values) + 1e-8)
    whitened = masked_whiten(x, mask)
    assert _selected(whitened, mask) == pytest.approx([(v - mean) / std for v in values], abs=1e-10)
    row_means = masked_mean(x, mask, dim=1)
    for b in range(x.shape[0]):
        row = _selected(x[b : b + 1], mask[b : b + 1])
        assert row_means[b].item() == pytest.approx(statistics.fmean(row) if row else 0.0, abs=1e-12)


def test_masked_mean_gradient_only_reaches_selected_positions():
    x = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    masked_mean(x, torch.tensor([[1.0, 1.0, 0.0]])).backward()
    assert x.grad.tolist() == [[0.5, 0.5, 0.0]]


# ---- log-probabilities and entropy -----------------------------------------------------------------
def test_logprobs_and_entropy_hand_values():
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0]]])  # softmax [1/4, 3/4] and [1/2, 1/2]
    labels = torch.tensor([[1, 0]])
    assert logprobs_from_logits(logits, labels)[0].tolist() == pytest.approx([math.log(0.75), math.log(0.5)])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(logits)[0].tolist() == pytest.approx([h, math.log(2.0)])


@pytest.mark.parametrize("chunk_elements", [1 << 24, 3000])  # one chunk, and many uneven chunks
def test_logprobs_match_log_softmax_gather(monkeypatch, chunk_elements):
    monkeypatch.setattr(stats_module, "_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 7, 1000, generator=g)).requires_grad_(True)
    labels = torch.randint(0, 1000, (4, 7), generator=g)
    ours = logprobs_from_logits(logits, labels)
    ref = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert ours.shape == (4, 7) and ours.dtype == torch.float32
    # to 1e-6 absolute + 1e-6 relative: one fp32 ulp at |log p| ~ 16 is already 1.9e-6
    assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-6)
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)
    (grad_ref,) = torch.autograd.grad(ref.sum(), logits)
    assert torch.allclose(grad_ours, grad_ref, atol=1e-6, rtol=0)


def test_logprobs_fp64_match_log_softmax_exactly():
    g = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(2, 6, 300, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 300, (2, 6), generator=g)
    ours = logprobs_from_logits(logits, labels)
    ref = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0)


def test_logprobs_bf16_logits_are_computed_in_fp32():
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(3, 5, 257, generator=g)).to(torch.bfloat16)
    labels = torch.randint(0, 257, (3, 5), generator=g)
    ours = logprobs_from_logits(logits, labels)
    ref = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


def test_entropy_matches_python_reference(monkeypatch):
    monkeypatch.setattr(stats_module, "_CHUNK_ELEMENTS", 40)  # 2 rows of 17 per chunk
    g = torch.Generator().manual_seed(2)
    logits = 2 * torch.randn(3, 4, 17, generator=g, dtype=torch.float64)
    ours = entropy_from_logits(logits)
    for b in range(3):
        for t in range(4):
            row = logits[b, t].tolist()
            z = sum(math.exp(v) for v in row)
            expected = -sum((math.exp(v) / z) * (v - math.log(z)) for v in row)
            assert ours[b, t].item() == pytest.approx(expected, abs=1e-12)


def test_entropy_with_minus_inf_logits_is_finite_with_finite_gradient():
    logits = torch.tensor([[0.0, -INF, 0.0, -INF]], requires_grad=True)
    h = entropy_from_logits(logits)
    assert h.item() == pytest.approx(math.log(2.0))
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()


# ---- KL estimators ---------------------------------------------------------------------------------
def test_kl_estimators_hand_values():
    logp = torch.tensor([math.log(0.5), -1.0])  # p = 0.5 / q = 0.25 on token 0; identical on token 1
    ref = torch.tensor([math.log(0.25), -1.0])
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx([0.6931471805599453, 0.0])
    assert kl_estimate(logp, ref, "k2").tolist() == pytest.approx([0.2402265069591007, 0.0])
    # k3 = q/p - 1 - log(q/p) = 0.5 - 1 + ln 2
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx([0.1931471805599453, 0.0])


def test_k3_clamps_the_log_ratio_to_20():
    logp = torch.tensor([0.0, -100.0])
    ref = torch.tensor([-100.0, 0.0])
    k3 = kl_estimate(logp, ref, "k3")
    assert torch.isfinite(k3).all()
    # log(q/p) = -100 -> -20: e^-20 - 1 + 20;  log(q/p) = +100 -> +20: e^20 - 1 - 20
    assert k3.tolist() == pytest.approx([19.000000002061153, 485165174.4097903], rel=1e-6)


def test_kl_estimators_match_python_reference():
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    k1, k2, k3 = (kl_estimate(logp, ref, k) for k in ("k1", "k2", "k3"))
    for b in range(4):
        for t in range(6):
            lp, lq = logp[b, t].item(), ref[b, t].item()
            assert k1[b, t].item() == pytest.approx(lp - lq, abs=1e-12)
            assert k2[b, t].item() == pytest.approx(0.5 * (lp - lq) ** 2, abs=1e-12)
            assert k3[b, t].item() == pytest.approx(math.exp(lq - lp) - 1 - (lq - lp), abs=1e-12)


def test_k1_and_k3_are_unbiased_estimates_of_kl_p_q():
    g = torch.Generator().manual_seed(4)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())  # 0.4564...
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[samples], q.log()[samples]
    assert kl_estimate(logp, logq, "k1").mean().item() == pytest.approx(true_kl, abs=0.01)
    assert kl_estimate(logp, logq, "k3").mean().item() == pytest.approx(true_kl, abs=0.01)
    assert (kl_estimate(logp, logq, "k3") >= 0).all()


def test_kl_estimate_rejects_unknown_kind():
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


# ---- KL controllers --------------------------------------------------------------------------------
def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 512) == 0.05 and ctl.value == 0.05
    restored = FixedKLController(1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == 0.05


def test_adaptive_controller_update_by_hand():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # error = 7/6 - 1 = 1/6 (inside the clip): 0.1 * (1 + (1/6) * 256 / 10000)
    assert ctl.update(7.0, 256) == pytest.approx(0.1 * (1 + (1 / 6) * 256 / 10000))
    assert ctl.value == pytest.approx(0.10042666666666667)
    # error = 3/6 - 1 = -0.5 -> clipped to -0.2
    ctl.update(torch.tensor(3.0), 1000)
    assert ctl.value == pytest.approx(0.10042666666666667 * (1 - 0.2 * 1000 / 10000))


def test_adaptive_controller_clips_error_at_plus_minus_02():
    high = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    high.update(60.0, 256)  # error 9 -> 0.2
    assert high.value == pytest.approx(0.1 * 1.00512)
    low = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    low.update(0.0, 256)  # error -1 -> -0.2
    assert low.value == pytest.approx(0.1 * 0.99488)


def test_adaptive_controller_state_round_trip_and_validation():
    ctl = AdaptiveKLController(0.2, target=1.0, horizon=100)
    ctl.update(2.0, 10)
    restored = AdaptiveKLController(0.2, target=1.0, horizon=100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value == pytest.approx(0.2 * 1.02)
    assert restored.update(2.0, 10) == pytest.approx(0.2 * 1.02 * 1.02)
    with pytest.raises(ValueError, match="kl_target"):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
