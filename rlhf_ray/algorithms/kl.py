"""Per-token KL estimators between the policy and the reference, and the KL-coefficient controllers."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

KLKind = Literal["k1", "k2", "k3"]

# k3 exponentiates the log-ratio: clamping it to [-20, 20] keeps exp() finite (e^20 ~ 5e8) when the
# policy has drifted far from the reference on a token; beyond the clamp the gradient is 0.
K3_LOG_RATIO_CLAMP = 20.0


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: KLKind = "k3") -> Tensor:
    """Per-token estimate of KL(p || q) from tokens sampled from p (Schulman 2020, "Approximating KL
    divergence"): p is the policy (`logprobs`), q the reference (`ref_logprobs`).

    k1 = log p - log q (unbiased, high variance, can be negative);
    k2 = 0.5 (log p - log q)^2 (biased, low variance, >= 0);
    k3 = q/p - 1 - log(q/p) (unbiased, low variance, >= 0); log(q/p) is clamped to [-20, 20].
    Positions where both log-probs are 0 (padding) give 0 for every kind."""
    log_ratio = logprobs - ref_logprobs  # log p - log q
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        log_q_over_p = (-log_ratio).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        return torch.exp(log_q_over_p) - 1.0 - log_q_over_p
    raise ValueError(
        f"kl estimator kind={kind!r} is not one of 'k1', 'k2', 'k3' (see algorithm.kl_estimator)"
    )


class FixedKLController:
    """A constant KL coefficient; `update` is a no-op (kept so callers treat both controllers alike)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"):
    e = clip(KL / target - 1, -0.2, 0.2); coef <- coef * (1 + e * n_steps / horizon).
    The coefficient grows while the measured KL is above `target` and shrinks while it is below."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0:
            raise ValueError(f"adaptive KL target={target} must be > 0 (set algorithm.kl_target, e.g. 0.1)")
        if horizon <= 0:
            raise ValueError(
                f"adaptive KL horizon={horizon} must be > 0 (set algorithm.kl_horizon, e.g. 10000)"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """Adapt the coefficient to the KL measured over the last `n_steps` samples; returns the new value."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the coefficient only: target and horizon come from the (possibly edited) config."""
        self.value = float(state["value"])
