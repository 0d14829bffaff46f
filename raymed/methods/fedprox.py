"""FedProx — Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
https://arxiv.org/abs/1812.06127

FedAvg with a proximal term in every client's local objective, which keeps local models near the
global one under heterogeneous data:

    client k:  w_k ← w_t;  E epochs of SGD on  h_k(w; w_t) = F_k(w) + (μ/2) · ‖w − w_t‖²
               send Δ_k = w_k − w_t
    server:    w_{t+1} = w_t + η_s · Σ n_k Δ_k / Σ n_k        (as FedAvg)

μ = 0 recovers FedAvg exactly. The proximal term covers the parameters the client trains.
"""

from __future__ import annotations

import torch
from pydantic import Field

from raymed.methods.base import ClientContext, ClientUpdate, Weights, local_sgd, register_method
from raymed.methods.fedavg import FedAvg, FedAvgParams


class FedProxParams(FedAvgParams):
    mu: float = Field(0.01, ge=0, description="μ, weight of the proximal term (μ/2)·‖w − w_t‖²")


@register_method
class FedProx(FedAvg):
    name = "fedprox"
    Params = FedProxParams

    def client_update(self, ctx: ClientContext, payload: Weights) -> ClientUpdate:
        ctx.load(payload)
        trained = set(ctx.trained_keys)
        anchored = [
            (p, torch.as_tensor(payload[name]).to(ctx.device))
            for name, p in ctx.model.named_parameters()
            if name in trained and name in payload
        ]
        mu = self.params.mu

        def proximal_term() -> torch.Tensor:
            return 0.5 * mu * sum((p - w_t).pow(2).sum() for p, w_t in anchored)

        metrics = local_sgd(ctx, penalty=proximal_term if mu > 0 else None)
        return ClientUpdate(delta=ctx.delta_from(payload), weight=ctx.num_train, metrics=metrics)
