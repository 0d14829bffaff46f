"""FedAdam, FedYogi, FedAdagrad — Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
https://arxiv.org/abs/2003.00295 (Algorithm 2, FedOpt with an adaptive server optimiser)

Clients train as in FedAvg; the server treats the mean client update as a pseudo-gradient and
steps an adaptive optimiser along it, so rarely-moving parameters still get a full-sized step and
noisy ones a damped one:

    Δ_t = Σ_k w_k Δ_k / Σ_k w_k                       (FedAvg's mean update; w_k: ``weighting``)
    m_t = β₁ m_{t−1} + (1 − β₁) Δ_t
    FedAdagrad:  v_t = v_{t−1} + Δ_t²
    FedYogi:     v_t = v_{t−1} − (1 − β₂) Δ_t² · sign(v_{t−1} − Δ_t²)
    FedAdam:     v_t = β₂ v_{t−1} + (1 − β₂) Δ_t²
    w_{t+1} = w_t + η · m_t / (√v_t + τ)

with m_{−1} = 0 and v_{−1} = τ² (the paper's v_{−1} ≥ τ²), no bias correction (as the paper).
η (``server_lr``) is the server's step; the paper tunes it per task (10^-2.5 to 10^0 for its CNNs).
The moments live in ``ServerState.extra`` and are checkpointed with it, so a resumed run continues
with them. Parameters no client sent this round (another dataset's head) keep their weights and
moments (the server holds floating-point state only).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from raymed.methods.base import ServerState, WeightedMean, register_method
from raymed.methods.fedavg import FedAvg, FedAvgParams


class FedOptParams(FedAvgParams):
    server_lr: float = Field(0.01, gt=0, description="η, the server optimiser's step along m_t / (√v_t + τ)")
    beta1: float = Field(0.9, ge=0, lt=1, description="β₁, decay of the first moment m_t")
    beta2: float = Field(0.99, ge=0, lt=1, description="β₂, decay of the second moment v_t (FedAdam, FedYogi)")
    tau: float = Field(1e-3, gt=0, description="τ, the adaptivity: larger is closer to server momentum SGD")


def second_moment(rule: str, v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    """v_t from v_{t−1} and the pseudo-gradient Δ_t under ``rule`` (adagrad, yogi, adam)."""
    square = delta * delta
    if rule == "adagrad":
        return v + square
    if rule == "yogi":
        return v - (1 - beta2) * square * np.sign(v - square)
    return beta2 * v + (1 - beta2) * square


class FedOpt(FedAvg):
    """FedAvg's clients with an adaptive server step; subclasses name the second-moment rule."""

    Params = FedOptParams
    rule: ClassVar[str]

    def aggregate(self, state: ServerState, accumulator: WeightedMean) -> ServerState:
        p = self.params
        weights = dict(state.weights)
        first, second = dict(state.extra.get("m", {})), dict(state.extra.get("v", {}))
        for key, delta in accumulator.mean().items():
            w = weights[key]
            delta = delta.astype(np.float32)
            m = p.beta1 * first.get(key, np.zeros_like(delta)) + (1 - p.beta1) * delta
            v = second_moment(self.rule, second.get(key, np.full_like(delta, p.tau**2)), delta, p.beta2)
            weights[key] = (w + p.server_lr * m / (np.sqrt(v) + p.tau)).astype(np.asarray(w).dtype)
            first[key], second[key] = m, v
        return ServerState(weights=weights, round=state.round, extra={**state.extra, "m": first, "v": second})


@register_method
class FedAdam(FedOpt):
    name = "fedadam"
    rule = "adam"


@register_method
class FedYogi(FedOpt):
    name = "fedyogi"
    rule = "yogi"


@register_method
class FedAdagrad(FedOpt):
    name = "fedadagrad"
    rule = "adagrad"
