"""FedKIM — "FedKIM: Adaptive Federated Knowledge Injection into Medical Foundation Models"
(EMNLP 2024), https://arxiv.org/abs/2408.10276 (official code: github.com/XiaochenWang-PSU/FedKIM)

Clients train lightweight local models; the federation's knowledge is injected into a central
model on the server through M3OE, a multi-task multi-modal mixture of LoRA experts
(:mod:`~raymed.methods.fedkim.model` holds both models; :mod:`~raymed.methods.fedkim.instructions`
turns every dataset into questions and answers).

Client k holding dataset d (one modality), round t:

    start from the central model's encoders ψ_t (injection's other half) and the heads w_t
    E epochs of SGD on  F_k(ψ, h_d) + (μ/2)·‖(ψ, h_d) − (ψ_t, w_t)‖²        (μ = 0: FedAvg; μ > 0: FedProx)
    send Δ_k for its encoder (its input kind: image or volume) and its head; never data

Server, round t:

    ψ̄, w_{t+1} = FedAvg of the clients' encoders and heads (each averaged over the clients that train it)
    inject:     the central model's encoders ← ψ̄
    train the central model for ``server_epochs`` on the server's own split (``data.server_fraction``):
        x → tokens = proj_kind(pool_P(ψ_kind(x)));  LM input [tokens ‖ E(question) ‖ E(answer)]
        L = CE(answer tokens)
        every adapted LM linear:  y = W0 x + Σ_e g_e(m, τ) · (α/r) · B_e A_e x
        g(m, τ) = softmax(W_g · mean_i CrossAttn(E(m), E(τ))_i)       m: modality description,
                                                                      τ: task description
        trained: encoders ψ, projections, gate, experts A_e/B_e; the language model W0 stays frozen
    ψ_{t+1} = the central model's encoders (sent to the next round's clients)

The central model answers each task's test questions by greedy decoding: the trained tasks, a new
task sentence on a seen modality, and a seen task on a held-out modality (``data.held_out``).

Differences from the official code, on purpose: its gate is computed densely although its config
says top-2, and its MoE-LoRA layers never apply α/r. Here the scaling α/r is applied, and the gate
is dense (``top_k: null``, the default) or top-k (``top_k: k``: the k largest logits renormalised).
Baselines of the paper's table: ``inject: false`` (the central model trained on the server's split
alone) and ``experts: 1`` (FedAvg-injected encoders and a single LoRA: the gate's weight is 1).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator

from raymed.config import ExperimentConfig, ModelConfig
from raymed.data.tasks import TaskSpec
from raymed.errors import ConfigError
from raymed.methods.base import ClientContext, ClientUpdate, Method, ServerState, WeightedMean, Weights, local_sgd, register_method
from raymed.methods.fedavg import FedAvgParams, apply_mean_update, client_weight
from raymed.methods.fedkim.instructions import CATALOGUE, answer_metrics, examples, strings, tasks_of
from raymed.methods.fedkim.model import CentralModel, CentralSpec, LocalModel
from raymed.methods.fedprox import proximal_penalty
from raymed.data.shards import ShardSet
from raymed.tasks.report import text as reports
from raymed.tasks.report.model import pretrain_lm

IN_CHANNELS = 3  # every encoder takes RGB; gray images (and volumes) are repeated to fit


class FedKIMParams(FedAvgParams):
    mu: float = Field(0.0, ge=0, description="μ: clients' FedProx proximal weight (0: FedAvg)")
    inject: bool = Field(True, description="load the federation's encoders into the central model every round")
    experts: int = Field(4, ge=1, description="E, LoRA experts per adapted layer (1: a single LoRA)")
    top_k: int | None = Field(None, ge=1, description="gate: the k largest expert logits only (None: dense)")
    server_epochs: int = Field(1, ge=0, description="central-model epochs on the server's split per round")
    question_len: int = Field(24, ge=4, description="question tokens (longer questions are cut)")
    answer_len: int = Field(8, ge=2, description="answer tokens generated at most (EOS included)")

    @model_validator(mode="after")
    def _k_within_experts(self) -> FedKIMParams:
        if self.top_k is not None and self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")
        return self


def is_encoder(key: str) -> bool:
    return key.startswith("encoders.")


@register_method
class FedKIM(Method):
    name = "fedkim"
    Params = FedKIMParams
    mixes_dimensions = True  # an encoder per input kind: 2D and 3D datasets in one federation
    uses_server_model = True
    central_loss = float("nan")  # the central model's mean training loss in the last round (reported with the scores)

    def check_config(self, cfg: ExperimentConfig) -> None:
        d = cfg.data
        if d.task != "classification":
            raise ConfigError("strategy fedkim asks questions of classification and VQA datasets: set data.task=classification")
        unknown = [f for f in d.datasets + d.held_out if f not in CATALOGUE]
        if unknown:
            raise ConfigError(f"strategy fedkim has no question for {', '.join(unknown)}; its datasets: {', '.join(CATALOGUE)}")
        if cfg.model.head != "per_dataset":
            raise ConfigError("strategy fedkim's clients each train their own dataset's head: set model.head=per_dataset")
        if d.server_fraction <= 0:
            raise ConfigError("strategy fedkim trains its central model on the server's own split: set data.server_fraction > 0 (e.g. 0.1)")
        if cfg.model.decoder.lora_rank < 1:
            raise ConfigError("strategy fedkim's experts are LoRA experts: set model.decoder.lora_rank >= 1")
        if d.normalise != "fixed":
            raise ConfigError("strategy fedkim's central model reads images at the fixed scale its injected encoders were trained on: set data.normalise=fixed")

    # ---- models

    def build_model(self, cfg: ModelConfig, tasks: dict[str, TaskSpec], seed: int) -> LocalModel:
        return LocalModel(cfg.name, tasks, seed, IN_CHANNELS)

    def prepare(self, cfg: ExperimentConfig, shard_dir: str) -> ExperimentConfig:
        """The central model's language model, built once per (data, sizes, seed) beside the shards:
        a word-level tokenizer over the tasks' text and the server's questions and answers, and a GPT-2
        of ``model.decoder``'s size, pretrained on IU X-Ray report text when ``pretrain_epochs`` > 0.
        A given ``model.decoder.checkpoint`` (with its tokenizer) is used as it is."""
        d, p = cfg.model.decoder, self.params
        if d.checkpoint:
            return cfg
        shards = ShardSet(shard_dir)
        tasks = tasks_of(shards)
        vocabulary = [s for t in tasks for s in strings(t)]
        for task in tasks:
            if not task.held_out:
                ex = examples(task, shards, "server")
                vocabulary += ex.questions + ex.answers
        texts, source = [], "none"
        if d.pretrain_epochs:
            root = reports.find_root(cfg.data.report_root, "indiana_reports.csv")
            texts, source = reports.pretraining_text(root), reports.md5(root / "indiana_reports.csv")
        context = d.prefix_tokens + p.question_len + p.answer_len + 1
        identity = [1, sorted(set(vocabulary)), source, d.layers, d.width, d.heads, d.pretrain_epochs, cfg.data.report_len, context, cfg.seed]
        out = Path(shard_dir).parent / f"central-lm-{hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]}"
        if not (out / "config.json").is_file():
            pretrain_lm(texts, out, d, cfg.data.report_len, cfg.seed, extra=vocabulary, context=context)
        resolved = cfg.model_copy(deep=True)
        resolved.model.decoder.checkpoint = str(out.resolve())
        return resolved

    def build_server_model(self, cfg: ExperimentConfig, shards) -> CentralModel:
        if not cfg.model.decoder.checkpoint:
            raise ConfigError("strategy fedkim: the central language model was not prepared (model.decoder.checkpoint is empty)")
        p = self.params
        spec = CentralSpec(tuple(tasks_of(shards)), IN_CHANNELS, p.experts, p.top_k, p.question_len, p.answer_len)
        return CentralModel(cfg.model, spec, cfg.seed)

    # ---- server half

    def aggregate(self, state: ServerState, accumulator: WeightedMean) -> ServerState:
        return apply_mean_update(state, accumulator, self.params.server_lr)

    def server_update(self, state: ServerState, server, round_: int) -> ServerState:
        """Inject the averaged encoders into the central model, train it on the server's split, and
        hand its encoders to the next round's clients."""
        encoders = [k for k in state.weights if is_encoder(k)]
        if self.params.inject:
            server.load({k: state.weights[k] for k in encoders})
        self.central_loss = server.fit(self.params.server_epochs, round_) if self.params.server_epochs else float("nan")
        if not self.params.inject:
            return state
        return ServerState(weights={**state.weights, **server.read(encoders)}, round=state.round, extra=state.extra)

    def evaluate_server_model(self, server) -> dict[str, float]:
        """Every task's test questions answered by the central model: per-task scores, and the mean
        accuracy over the trained and over the held-out tasks."""
        by_task: dict[str, list] = {}
        for part in server.answer("test"):
            by_task.setdefault(part.task, []).append(part)
        out: dict[str, float] = {"central/train_loss": self.central_loss}
        accuracy: dict[bool, list[float]] = {False: [], True: []}
        for name, parts in by_task.items():
            scores = answer_metrics(
                [p for part in parts for p in part.predicted], [r for part in parts for r in part.reference], np.concatenate([part.closed for part in parts])
            )
            out.update({f"central/{name}/{metric}": value for metric, value in scores.items()})
            accuracy[parts[0].held_out].append(scores["acc"])
        for held_out, group in (("trained", False), ("held_out", True)):
            if accuracy[group]:
                out[f"central/{held_out}/acc"] = float(np.mean(accuracy[group]))
        return out

    # ---- client half

    def client_update(self, ctx: ClientContext, payload: Weights) -> ClientUpdate:
        ctx.load(payload)
        metrics = local_sgd(ctx, self._proximal(payload, ctx.device))
        return ClientUpdate(delta=ctx.delta_from(payload), weight=client_weight(self.params, ctx), metrics=metrics)

    def _proximal(self, payload: Weights, device: torch.device):
        return proximal_penalty(payload, self.params.mu, device)
