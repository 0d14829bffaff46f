"""FedPer — Arivazhagan et al., "Federated Learning with Personalization Layers", 2019,
https://arxiv.org/abs/1912.00818

The model is split into base layers (shared, federated) and personalisation layers (here the task
heads, ``heads.*``), which never leave the client:

    client k:  base ← w_t^B;  head ← its own P_k (the seeded initial head on first participation)
               E epochs of SGD on F_k over (base, head)
               send Δ_k = base_k − w_t^B;  keep P_k ← head
    server:    w_{t+1}^B = w_t^B + η_s · Σ n_k Δ_k / Σ n_k

The server never holds, receives or evaluates a head, so there is no global model to test: FedPer is
evaluated through each client's personalised model (base + own head) on its held-out split.
"""

from __future__ import annotations

from pydantic import Field

from raymed.config import ExperimentConfig
from raymed.errors import ConfigError

from raymed.methods.base import (
    ClientContext,
    ClientUpdate,
    Method,
    ServerState,
    WeightedMean,
    Weights,
    local_sgd,
    register_method,
)
from raymed.methods.fedavg import FedAvgParams, apply_mean_update, client_weight
from raymed.methods.vectorised import local_sgd_many, subtract


class FedPerParams(FedAvgParams):
    personal_layers: list[str] = Field(
        default_factory=lambda: ["heads."], description="name prefixes of the personalisation layers"
    )


@register_method
class FedPer(Method):
    name = "fedper"
    Params = FedPerParams
    personal_state = True

    def check_config(self, cfg: ExperimentConfig) -> None:
        if cfg.data.task == "report" and "heads." in self.params.personal_layers:
            raise ConfigError(
                "strategy fedper: the report model has no heads.*; set strategy.personal_layers to its own prefixes "
                "(e.g. [decoder.]) or use strategy.name=fedmrg, whose specialised adapters stay on the clients"
            )

    def is_personal(self, key: str) -> bool:
        return key.startswith(tuple(self.params.personal_layers))

    # ---- server half

    def init_state(self, initial_weights: Weights) -> ServerState:
        return ServerState(weights={k: v for k, v in initial_weights.items() if not self.is_personal(k)})

    def aggregate(self, state: ServerState, accumulator: WeightedMean) -> ServerState:
        return apply_mean_update(state, accumulator, self.params.server_lr)

    def eval_weights(self, state: ServerState) -> Weights | None:
        return None  # the server has no heads: only personalised models exist

    # ---- client half

    def load_personalised(self, ctx: ClientContext, payload: Weights) -> None:
        ctx.load(payload)
        ctx.load(ctx.own_state(self.is_personal))

    def client_update(self, ctx: ClientContext, payload: Weights) -> ClientUpdate:
        self.load_personalised(ctx, payload)
        metrics = local_sgd(ctx)
        return self._update(ctx, payload, ctx.read(ctx.trained_keys), metrics)

    def client_updates(self, ctxs: list[ClientContext], payload: Weights) -> list[ClientUpdate]:
        trained = local_sgd_many(ctxs, [{**payload, **ctx.own_state(self.is_personal)} for ctx in ctxs])
        return [self._update(ctx, payload, weights, metrics) for ctx, (weights, metrics) in zip(ctxs, trained)]

    def _update(self, ctx: ClientContext, payload: Weights, trained: Weights, metrics: dict) -> ClientUpdate:
        """Send the shared layers' change; keep the personal layers as the client's state."""
        shared = [k for k in trained if not self.is_personal(k)]
        personal = {k: v for k, v in trained.items() if self.is_personal(k)}
        return ClientUpdate(delta=subtract(trained, payload, shared), weight=client_weight(self.params, ctx), metrics=metrics, state=personal)
