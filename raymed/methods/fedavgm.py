"""FedAvgM — Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", 2019, https://arxiv.org/abs/1909.06335

FedAvg with momentum on the server: the mean client update is a pseudo-gradient, accumulated in a
velocity that damps the round-to-round swings non-IID clients cause:

    Δ_t = Σ_k w_k Δ_k / Σ_k w_k          (FedAvg's mean update; w_k: ``weighting``)
    u_t = β u_{t−1} + Δ_t,   u_{−1} = 0
    w_{t+1} = w_t + η · u_t

β = 0 and η = 1 recover FedAvg. The paper reads the effective step as η/(1 − β) and finds it best
near 1, so the defaults are β = 0.9 with η = 0.1. (β = 0.9 with η = 1, a 10× effective step, was
measured to diverge on the embedded default's federation: benchmarks/README, "Strategies".) The velocity lives in
``ServerState.extra`` and is checkpointed with it. Parameters no client sent keep their weights and
velocity (the server holds floating-point state only).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from raymed.methods.base import ServerState, WeightedMean, register_method
from raymed.methods.fedavg import FedAvg, FedAvgParams


class FedAvgMParams(FedAvgParams):
    server_lr: float = Field(0.1, gt=0, description="η, the server's step along the velocity (effective step η/(1 − β))")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="β, the server's momentum on the mean update")


@register_method
class FedAvgM(FedAvg):
    name = "fedavgm"
    Params = FedAvgMParams

    def aggregate(self, state: ServerState, accumulator: WeightedMean) -> ServerState:
        p = self.params
        weights, velocity = dict(state.weights), dict(state.extra.get("velocity", {}))
        for key, delta in accumulator.mean().items():
            w = weights[key]
            u = p.server_momentum * velocity.get(key, np.zeros_like(delta)) + delta
            weights[key] = (w + p.server_lr * u).astype(np.asarray(w).dtype)
            velocity[key] = u
        return ServerState(weights=weights, round=state.round, extra={**state.extra, "velocity": velocity})
