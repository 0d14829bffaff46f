"""FedProx — Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
https://arxiv.org/abs/1812.06127

FedAvg with a proximal term in every client's local objective, which keeps local models near the
global one under heterogeneous data:

    client k:  w_k ← w_t;  E epochs of SGD on  h_k(w; w_t) = F_k(w) + (μ/2) · ‖w − w_t‖²
               send Δ_k = w_k − w_t
    server:    w_{t+1} = w_t + η_s · Σ n_k Δ_k / Σ n_k        (as FedAvg)

μ = 0 recovers FedAvg exactly. The proximal term covers the parameters the client trains; the local
loop (sequential or vectorised) and the aggregation are FedAvg's.
"""

from __future__ import annotations

import torch
from pydantic import Field

from raymed.methods.base import Penalty, Weights, register_method
from raymed.methods.fedavg import FedAvg, FedAvgParams


class FedProxParams(FedAvgParams):
    mu: float = Field(0.01, ge=0, description="μ, weight of the proximal term (μ/2)·‖w − w_t‖²")


def proximal_penalty(payload: Weights, mu: float, device: torch.device) -> Penalty | None:
    """(μ/2)·‖w − w_t‖² over the trained parameters that came down, as a function of them (None: μ = 0)."""
    if mu == 0:
        return None
    anchor = {k: torch.as_tensor(v).to(device) for k, v in payload.items()}

    def proximal_term(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * mu * sum((p - anchor[k]).pow(2).sum() for k, p in params.items() if k in anchor)

    return proximal_term


@register_method
class FedProx(FedAvg):
    name = "fedprox"
    Params = FedProxParams

    def local_penalty(self, payload: Weights, device: torch.device) -> Penalty | None:
        return proximal_penalty(payload, self.params.mu, device)
