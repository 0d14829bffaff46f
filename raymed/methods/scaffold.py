"""SCAFFOLD — Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, https://arxiv.org/abs/1910.06378 (Algorithm 1, option II)

Control variates correct each client's drift towards its own optimum: the server keeps c, each
client its own c_k (client state, updated only when it is sampled), and every local step follows
the gradient corrected by their difference:

    client k:  y ← x_t;  K steps of  y ← y − η (g_k(y) − c_k + c)
               c_k⁺ = c_k − c + (x_t − y) / (K η)
               send Δy_k = y − x_t  and  Δc_k = c_k⁺ − c_k;  keep c_k ← c_k⁺
    server:    x_{t+1} = x_t + η_g · (1/|S|) Σ_{k∈S} Δy_k
               c ← c + (|S| / N) · (1/|S|) Σ_{k∈S} Δc_k

c_k starts at 0 (and c with it). The correction is the gradient of the linear term ⟨c − c_k, w⟩
added to the local objective, so it runs through the same local loop as every method (momentum and
weight decay included, where option II's (x_t − y)/(Kη) is then an estimate, as in most public
implementations). c goes down with the weights and Δc_k up with the update: twice FedAvg's traffic,
counted as such. Clients are weighted alike (the paper's mean). Keys a client does not train
(another dataset's head) are not corrected and not sent; for such a key |S| counts the clients that
sent it. N is the federation's number of clients (filled in before the run starts). The client's c_k
lives in the client-state store (memory or disk backend) between the rounds it is sampled in.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from raymed.config import ExperimentConfig, StrategyConfig
from raymed.data.shards import ShardSet
from raymed.errors import ConfigError
from raymed.methods.base import ClientContext, ClientUpdate, Method, ServerState, WeightedMean, Weights, local_sgd, register_method, trained_parameters
from raymed.methods.fedavg import FedAvg, FedAvgParams

CONTROL = "scaffold.c."  # prefix of the server's control variate in what goes down, and of Δc_k in what comes up


class ScaffoldParams(FedAvgParams):
    weighting: Literal["uniform"] = Field("uniform", description="clients alike, as the paper's means (n_k weighting does not apply)")
    num_clients: int | None = Field(None, ge=1, description="N, the federation's clients (filled in before the run starts)")


@register_method
class Scaffold(FedAvg):
    name = "scaffold"
    Params = ScaffoldParams

    def prepare(self, cfg: ExperimentConfig, shard_dir: str) -> ExperimentConfig:
        strategy = StrategyConfig(name=cfg.strategy.name, **{**cfg.strategy.params, "num_clients": ShardSet(shard_dir).num_clients})
        return cfg.model_copy(update={"strategy": strategy})

    # ---- server half

    def init_state(self, initial_weights: Weights) -> ServerState:
        return ServerState(weights=dict(initial_weights), extra={"control": {k: np.zeros_like(v) for k, v in initial_weights.items()}})

    def broadcast(self, state: ServerState) -> Weights:
        return {**state.weights, **{CONTROL + k: v for k, v in state.extra["control"].items()}}

    def aggregate(self, state: ServerState, accumulator: WeightedMean) -> ServerState:
        if self.params.num_clients is None:
            raise ConfigError("strategy scaffold: num_clients was not filled in; run it through raymed (the federation prepares it)")
        weights, control = dict(state.weights), dict(state.extra["control"])
        senders = accumulator.weights  # per key: the clients that sent it (each weighs 1)
        for key, mean in accumulator.mean().items():
            if key.startswith(CONTROL):
                name = key[len(CONTROL):]
                control[name] = control[name] + senders[key] / self.params.num_clients * mean
            else:
                weights[key] = weights[key] + self.params.server_lr * mean
        return ServerState(weights=weights, round=state.round, extra={**state.extra, "control": control})

    def eval_weights(self, state: ServerState) -> Weights | None:
        return state.weights

    # ---- client half

    def client_update(self, ctx: ClientContext, payload: Weights) -> ClientUpdate:
        x = {k: v for k, v in payload.items() if not k.startswith(CONTROL)}
        ctx.load(x)
        params = trained_parameters(ctx)
        c = {k: payload[CONTROL + k] for k in params}
        own = ctx.state if ctx.state is not None else {k: np.zeros_like(v) for k, v in c.items()}
        correction = {k: torch.as_tensor(c[k] - own[k]).to(ctx.device) for k in params}

        def drift_correction(trained: dict[str, torch.Tensor]) -> torch.Tensor:
            return sum((trained[k] * correction[k]).sum() for k in trained)  # ∇ = c − c_k

        steps = 0

        def counted(flag, xb, yb):
            nonlocal steps
            steps += 1
            return ctx.tasks[flag].loss(ctx.model(xb, flag), yb)

        metrics = local_sgd(ctx, drift_correction, counted)
        delta = ctx.delta_from(x)
        beta = ctx.train.momentum if ctx.train.optimizer == "sgd" else 0.0
        scale = (1.0 - beta) / (max(steps, 1) * ctx.lr)  # 1/(K η/(1 − β)): momentum SGD covers η/(1 − β) per unit gradient
        updated = {k: own[k] - c[k] - scale * delta[k] for k in params}  # (x − y)/(Kη) = −Δy/(Kη)
        delta.update({CONTROL + k: updated[k] - own[k] for k in params})
        return ClientUpdate(delta=delta, weight=1.0, metrics=metrics, state=updated)

    client_updates = Method.client_updates  # one client after another: FedAvg's vectorised form does not apply
