"""FedAvgM — Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", 2019, https://arxiv.org/abs/1909.06335

FedAvg with momentum on the server: the mean client update is a pseudo-gradient, accumulated in a
velocity that damps the round-to-round swings non-IID clients cause:

    Δ_t = Σ_k w_k Δ_k / Σ_k w_k          (FedAvg's mean update; w_k: ``weighting``)
    u_t = β u_{t−1} + Δ_t,   u_{−1} = 0
    w_{t+1} = w_t + η · u_t

β = 0 and η = 1 recover FedAvg. The paper pairs β = 0.9 with a smaller η (effective step η/(1 − β));
the defaults here are β = 0.9, η = 1.0 as Flower's FedAvgM. The velocity lives in
``ServerState.extra`` and is checkpointed with it. Parameters no client sent keep their weights and
velocity; integer entries (BatchNorm's batch counter) take the plain mean step.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from raymed.methods.base import ServerState, WeightedMean, register_method
from raymed.methods.fedavg import FedAvg, FedAvgParams


class FedAvgMParams(FedAvgParams):
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
            if not np.issubdtype(np.asarray(w).dtype, np.floating):
                weights[key] = w + delta
                continue
            u = p.server_momentum * velocity.get(key, np.zeros_like(delta)) + delta
            weights[key] = (w + p.server_lr * u).astype(np.asarray(w).dtype)
            velocity[key] = u
        return ServerState(weights=weights, round=state.round, extra={**state.extra, "velocity": velocity})
