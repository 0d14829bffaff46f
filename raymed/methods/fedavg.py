"""FedAvg — McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017, https://arxiv.org/abs/1602.05629

Round t, with sampled clients S_t and n_k local training examples at client k:

    client k:  w_k ← w_t;  E epochs of SGD on  F_k(w) = (1/n_k) Σ_{i∈D_k} ℓ(w; x_i, y_i)
               send Δ_k = w_k − w_t
    server:    w_{t+1} = w_t + η_s · Σ_{k∈S_t} n_k Δ_k / Σ_{k∈S_t} n_k

With the server learning rate η_s = 1 this is the paper's weighted model average
w_{t+1} = Σ n_k w_k / Σ n_k. ``weighting: uniform`` replaces n_k by 1 (the mean of the client
objectives rather than of the examples): with ``clients.local_steps`` every client takes the same
number of steps, and n_k-weighting would let the clients with the most rows, here the largest
modality, drive the shared layers alone. raymed's defaults are K = 20 local steps and the uniform
mean (``weighting: examples`` with ``clients.local_epochs`` is the paper's). Parameters a client does not train (the heads of datasets it does not
hold) are not sent, so each head is averaged over the clients that hold its dataset.
"""

from __future__ import annotations

import torch
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from raymed.methods.base import (
    ClientContext,
    ClientUpdate,
    Method,
    Penalty,
    ServerState,
    WeightedMean,
    Weights,
    local_sgd,
    register_method,
)
from raymed.methods.vectorised import local_sgd_many, subtract


class FedAvgParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(1.0, gt=0, description="η_s, the step the server takes along the mean update")
    weighting: Literal["examples", "uniform"] = Field(
        "uniform",
        description="a client's weight in the mean update: 1 (every client alike: under clients.local_steps, the default, each takes the "
        "same steps), or n_k, its training rows (the paper's, for local_epochs)",
    )


def client_weight(params: FedAvgParams, ctx: ClientContext) -> float:
    """The client's weight in the server's mean (``weighting``): n_k or 1."""
    return float(ctx.num_train) if params.weighting == "examples" else 1.0


def apply_mean_update(state: ServerState, accumulator: WeightedMean, server_lr: float) -> ServerState:
    """w_{t+1} = w_t + η_s · mean Δ (keys no client sent stay as they were)."""
    weights = dict(state.weights)
    for key, mean_delta in accumulator.mean().items():
        weights[key] = weights[key] + server_lr * mean_delta
    return ServerState(weights=weights, round=state.round, extra=state.extra)


@register_method
class FedAvg(Method):
    name = "fedavg"
    Params = FedAvgParams

    def local_penalty(self, payload: Weights, device: torch.device) -> Penalty | None:
        """An extra term of the local objective (none here; FedProx adds its proximal term)."""
        return None

    def client_update(self, ctx: ClientContext, payload: Weights) -> ClientUpdate:
        ctx.load(payload)
        metrics = local_sgd(ctx, self.local_penalty(payload, ctx.device))
        return ClientUpdate(delta=ctx.delta_from(payload), weight=client_weight(self.params, ctx), metrics=metrics)

    def client_updates(self, ctxs: list[ClientContext], payload: Weights) -> list[ClientUpdate]:
        if not ctxs:
            return []
        trained = local_sgd_many(ctxs, [payload] * len(ctxs), self.local_penalty(payload, ctxs[0].device))
        return [
            ClientUpdate(delta=subtract(weights, payload), weight=client_weight(self.params, ctx), metrics=metrics)
            for ctx, (weights, metrics) in zip(ctxs, trained)
        ]

    def aggregate(self, state: ServerState, accumulator: WeightedMean) -> ServerState:
        return apply_mean_update(state, accumulator, self.params.server_lr)
