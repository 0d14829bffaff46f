"""Ditto — Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021, https://arxiv.org/abs/2012.04221 (Algorithm 1)

Two models per client: the global one, trained and averaged as in FedAvg, and a personal model v_k
that never leaves the client, trained on the client's own objective pulled towards the global model:

    client k:  w_k ← w_t;  local SGD on F_k                       send Δ_k = w_k − w_t
               v_k ← its own v_k (w_t on first participation)
               local SGD on  F_k(v) + (λ/2) · ‖v − w_t‖²           keep v_k
    server:    w_{t+1} = w_t + η_s · Σ w_k Δ_k / Σ w_k             (FedAvg)

λ = 0 trains purely local models; large λ keeps v_k at the global model (SGD takes the pull as an
explicit step, so lr·λ must stay under 2: refused otherwise). The personal model is
evaluated on the client's held-out rows (``personal/...``), the global one on the test splits
(``global/...``). Both local loops follow ``clients.local_steps``/``local_epochs``, so a client does
twice FedAvg's local work; v_k lives in the client-state store (memory or disk) between rounds.
"""

from __future__ import annotations

from pydantic import Field

from raymed.config import ExperimentConfig
from raymed.errors import ConfigError
from raymed.methods.base import ClientContext, ClientUpdate, Method, Weights, local_sgd, register_method
from raymed.methods.fedavg import FedAvg, FedAvgParams, client_weight
from raymed.methods.fedprox import proximal_penalty


class DittoParams(FedAvgParams):
    lam: float = Field(0.1, ge=0, description="λ, the pull (λ/2)·‖v − w_t‖² of each personal model towards the global one")


@register_method
class Ditto(FedAvg):
    name = "ditto"
    Params = DittoParams
    personal_state = True  # the personal model v_k: a client never sampled has none yet

    def check_config(self, cfg: ExperimentConfig) -> None:
        # SGD takes the pull as an explicit step, v ← v − lr·λ·(v − w_t): past lr·λ = 2 it overshoots and grows.
        if cfg.clients.lr * self.params.lam >= 2:
            raise ConfigError(
                f"strategy ditto: clients.lr × lam = {cfg.clients.lr:g} × {self.params.lam:g} ≥ 2, where the pull towards the global "
                f"model overshoots and the personal models diverge; lower strategy.lam below {2 / cfg.clients.lr:g} (the paper: 0.01-2)"
            )

    def client_update(self, ctx: ClientContext, payload: Weights) -> ClientUpdate:
        ctx.load(payload)
        metrics = local_sgd(ctx)
        delta = ctx.delta_from(payload)
        ctx.load(ctx.state if ctx.state is not None else payload)
        personal = local_sgd(ctx, proximal_penalty(payload, self.params.lam, ctx.device))
        return ClientUpdate(
            delta=delta, weight=client_weight(self.params, ctx), metrics={**metrics, "personal_loss": personal["train_loss"]},
            state=ctx.read(ctx.trained_keys),
        )

    client_updates = Method.client_updates  # one client after another: FedAvg's vectorised form does not apply

    def load_personalised(self, ctx: ClientContext, payload: Weights) -> None:
        ctx.load(payload)
        if ctx.state is not None:
            ctx.load(ctx.state)
