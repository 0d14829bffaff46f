"""Centralised training — the upper bound every federated table is read against.

One model trained on the pooled training rows of every client, through the same engine, data, model,
recipe and evaluation as the federated runs: the run is a federation of one client that holds all
the rows (``clients.num`` 1, ``fraction`` 1, an ``iid`` partition: set by :meth:`Central.configure`,
so the saved config says so). Each round is ``clients.local_epochs`` passes over the pooled rows, and
unlike a federated client the one optimiser keeps its state (momentum, Adam's moments) from round to
round, as a centralised training loop does:

    round t:  w ← w_t;  E epochs of SGD on F(w) = (1/n) Σ_{i∈D} ℓ(w; x_i, y_i), optimiser state kept
    server:   w_{t+1} = w                                                (the one client's weights)

``clients.lr_schedule`` then decays the learning rate per round, i.e. per ``local_epochs`` epochs.
Its validation-selected test metrics are the centralised reference beside FedAvg's in
``benchmarks/medmnist_reference.py``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from raymed.config import ExperimentConfig
from raymed.methods.base import ClientContext, ClientUpdate, Method, ServerState, WeightedMean, Weights, local_optimizer, local_sgd, register_method, trained_parameters
from raymed.methods.fedavg import apply_mean_update

_SEP = "::"  # optimiser state key: "<parameter name>::<state entry>"


class CentralParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Accepted so that a federated config (the embedded default sets it) runs centrally as it is.
    weighting: Literal["examples", "uniform"] = Field("examples", description="no effect: the mean of one client's update is that update")


@register_method
class Central(Method):
    name = "central"
    Params = CentralParams

    def configure(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """One client holding every training row, training in every round."""
        data = cfg.data.model_copy(update={"partition": "iid", "alpha": None})
        clients = cfg.clients.model_copy(update={"num": 1, "fraction": 1.0, "availability": 1.0, "availability_trace": None})
        return cfg.model_copy(update={"data": data, "clients": clients})

    def aggregate(self, state: ServerState, accumulator: WeightedMean) -> ServerState:
        return apply_mean_update(state, accumulator, 1.0)

    def client_update(self, ctx: ClientContext, payload: Weights) -> ClientUpdate:
        ctx.load(payload)
        params = trained_parameters(ctx)
        optimizer = local_optimizer(params.values(), ctx.train, ctx.lr)
        load_optimizer_state(optimizer, params, ctx.state or {})
        metrics = local_sgd(ctx, optimizer=optimizer)
        return ClientUpdate(delta=ctx.delta_from(payload), weight=ctx.num_train, metrics=metrics, state=optimizer_state(optimizer, params))


def optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]) -> Weights:
    """The optimiser's per-parameter state (momentum buffers, Adam's moments and step) as arrays."""
    out = {}
    for name, param in params.items():
        for key, value in optimizer.state.get(param, {}).items():
            out[f"{name}{_SEP}{key}"] = torch.as_tensor(value).detach().cpu().numpy().copy()
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], saved: Weights) -> None:
    """Give a fresh optimiser the state :func:`optimizer_state` saved."""
    for key, value in saved.items():
        name, entry = key.split(_SEP, 1)
        if name in params:
            param = params[name]
            tensor = torch.from_numpy(np.array(value))
            optimizer.state[param][entry] = tensor if entry == "step" else tensor.to(param.device, param.dtype)
