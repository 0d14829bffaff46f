"""LoRKD — Gu et al., "LoRKD: Low-Rank Knowledge Decomposition for Medical Foundation Models", CVPR 2024,
https://arxiv.org/abs/2404.17184 (code: https://github.com/MediaBrain-SJTU/LoRKD), federated.

A foundation model (the teacher, trained on all tasks) is decomposed into a light student: a shared
backbone W0 plus, on every dense layer, a low-rank expert per task (:mod:`raymed.models.experts`)

    g_t(h) = (W0 + ΔW_t) h,    ΔW_t = (α/r) B_t A_t,   A_t Kaiming-initialised, B_t = 0,

and a head per task. Training routes each sample to its task's expert (the knowledge-separation
convolution: per-sample weights W0 + ΔW_{t_i} in one grouped convolution), so a sample's gradient
reaches only its own task's expert (gradient separation). The loss distils the teacher:

    L = L_task(f_t(x), y) + λ · T² · KL( σ(z^T_t(x) / T) ‖ σ(f_t(x) / T) )

with σ a softmax over classes (binary, multi-class, grades under ``task.ordinal_loss=ce``, VQA) or a
sigmoid per output (cumulative ordinal thresholds, multi-label, prognosis hazards). The released MedMNIST script multiplies this KL term by 0; here
λ (``lam``) and T (``temperature``) are real parameters, and λ = 0 is the "KL off" ablation.
Deployment switches to one task's knowledge and fuses it: W = W0 + ΔW_t, a plain network the size
of the student; evaluation here scores exactly that fused network.

Federated (one task, a MedMNIST dataset or modality, per client, as ``data.partition=modality``):

    client k (task t):  (W0, norms, ΔW_t, head_t) ← server;  E epochs of SGD on L with the frozen teacher
                        send Δ of W0, normalisation layers, ΔW_t and head_t
    server:             W0, norms ← FedAvg over all clients;  ΔW_t, head_t ← FedAvg over the owners of t

With ``expert_sharing=client`` an expert never leaves its client (it is the client's state, as FedPer's
heads): only W0, the norms and the heads are sent, and evaluation is on each client's held-out rows.

The teacher is ``teacher``: a raymed run folder (e.g. a fedavg run of ``model.name=cnn_large``) or its
``model.safetensors``; without one, a ``teacher_model`` is pretrained centrally on the clients'
pooled training rows for ``teacher_epochs`` epochs (:mod:`raymed.models.pretrained`), standing for a
foundation model trained on all tasks as in the paper.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from raymed.config import ExperimentConfig, ModelConfig
from raymed.data.tasks import ModelInput, TaskSpec
from raymed.errors import ConfigError
from raymed.methods.base import ClientContext, ClientUpdate, Method, ServerState, Weights, local_sgd, register_method
from raymed.methods.fedavg import FedAvg, FedAvgParams, client_weight
from raymed.models import Backbone, FedModel, build_backbone, images_of
from raymed.models.experts import add_experts, fuse, set_route
from raymed.models.pretrained import load_model, resolve_pretrained


class LoRKDParams(FedAvgParams):
    rank: int = Field(8, ge=1, description="r, rank of every task expert")
    alpha: float = Field(16.0, gt=0, description="α: experts are scaled by α/r")
    lam: float = Field(1.0, ge=0, description="λ, weight of the KL transfer loss (0: KL off)")
    temperature: float = Field(2.0, gt=0, description="T, distillation temperature")
    expert_sharing: Literal["task", "client"] = Field("task", description="task: averaged over the task's owners; client: never sent")
    teacher: str | None = Field(None, description="a raymed run folder or model.safetensors (None: pretrain one)")
    teacher_model: str = Field("cnn_large", description="backbone of the teacher pretrained when none is given")
    teacher_epochs: int = Field(3, ge=1, description="epochs of that central pretraining")


def is_expert(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def distillation_loss(task: TaskSpec, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) of the outputs softened by T, mean over the batch."""
    s, t = student / temperature, teacher / temperature
    if task.single_label or task.kind == "vqa":
        kl = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), log_target=True, reduction="batchmean")
    else:  # one Bernoulli per output: KL(p ‖ q) = p log(p/q) + (1−p) log((1−p)/(1−q))
        p = torch.sigmoid(t)
        kl = (p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))).sum(dim=1).mean()
    return temperature**2 * kl


class LoRKDModel(FedModel):
    """The student: backbone with a low-rank expert per task on every dense layer, a head per task, and
    the frozen teacher (never trained, never sent)."""

    def __init__(self, backbone: Backbone, tasks: dict[str, TaskSpec], in_channels: int, rank: int, alpha: float, teacher: FedModel):
        super().__init__(backbone, backbone.feature_dim, tasks, in_channels)
        self.task_index = {flag: i for i, flag in enumerate(tasks)}  # expert i belongs to task i
        add_experts(self.backbone, list(tasks), rank, alpha)
        self.teacher = teacher.requires_grad_(False).eval()
        self.unsent_keys = frozenset(f"teacher.{k}" for k in teacher.state_dict())

    def train(self, mode: bool = True) -> LoRKDModel:
        super().train(mode)
        self.teacher.eval()  # its normalisation statistics stay as trained
        return self

    def features(self, x: ModelInput, route: torch.Tensor | None = None) -> torch.Tensor:
        """Features with sample i routed to expert ``route[i]`` (mixed tasks in one batch are fine)."""
        set_route(self.backbone, route)
        return self.backbone(images_of(x))

    def forward(self, x: ModelInput, dataset: str) -> torch.Tensor:
        route = torch.full((len(images_of(x)),), self.task_index[dataset], device=images_of(x).device)
        return self.head(dataset)(self.features(x, route), x)

    def fused(self, dataset: str) -> FedModel:
        """The deployed network of one task: W = W0 + ΔW_t on every layer and that task's head."""
        plain = FedModel(fuse(self.backbone, dataset), self.backbone.feature_dim, {}, self.in_channels)
        plain.heads[self.head_key(dataset)] = self.head(dataset)
        return plain

    def predict(self, x: ModelInput, dataset: str) -> torch.Tensor:
        return self.fused(dataset)(x, dataset)

    def state_keys(self, datasets: list[str]) -> list[str]:
        """What a client with ``datasets`` trains: W0, the norms, its tasks' experts and heads."""
        own = {f"heads.{self.head_key(d)}." for d in datasets}
        keys = []
        for key in self.state_dict():
            if key in self.unsent_keys or (key.startswith("heads.") and not key.startswith(tuple(own))):
                continue
            if is_expert(key) and key.rsplit(".", 1)[1] not in datasets:
                continue
            keys.append(key)
        return keys


@register_method
class LoRKD(FedAvg):
    """FedAvg's server (a per-key weighted mean), with the distilling client update below."""

    name = "lorkd"
    Params = LoRKDParams
    client_updates = Method.client_updates  # one client at a time: FedAvg's vectorised update has no teacher

    def check_config(self, cfg: ExperimentConfig) -> None:
        if cfg.data.task != "classification":
            raise ConfigError(f"strategy lorkd distils classifiers: set data.task=classification (got {cfg.data.task})")

    def prepare(self, cfg: ExperimentConfig, shard_dir: str) -> ExperimentConfig:
        """The teacher: the given run's model file, or one pretrained once beside the shards."""
        p = self.params
        return resolve_pretrained(cfg, shard_dir, "teacher", cfg.data.datasets, p.teacher_model, p.teacher_epochs)

    def build_model(self, cfg: ModelConfig, tasks: dict[str, TaskSpec], seed: int) -> LoRKDModel:
        if not self.params.teacher:
            raise ConfigError("strategy lorkd: no teacher was prepared (strategy.teacher is empty)")
        teacher = load_model(self.params.teacher, "strategy.teacher", needs=list(tasks))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone, in_channels = build_backbone(cfg.name, tasks)
            model = LoRKDModel(backbone, tasks, in_channels, self.params.rank, self.params.alpha, teacher)
        if teacher.in_channels != in_channels:
            raise ConfigError(f"strategy.teacher takes {teacher.in_channels}-channel images and the student {in_channels}; train the teacher on the same datasets")
        return model

    # ---- server half

    def init_state(self, initial_weights: Weights) -> ServerState:
        private = self.params.expert_sharing == "client"
        return ServerState(weights={k: v for k, v in initial_weights.items() if not (private and is_expert(k))})

    def eval_weights(self, state: ServerState) -> Weights | None:
        return None if self.params.expert_sharing == "client" else state.weights

    # ---- client half

    @property
    def personal_state(self) -> bool:  # type: ignore[override]
        return self.params.expert_sharing == "client"

    def load_personalised(self, ctx: ClientContext, payload: Weights) -> None:
        ctx.load(payload)
        if self.params.expert_sharing == "client":
            ctx.load(ctx.own_state(is_expert))

    def client_update(self, ctx: ClientContext, payload: Weights) -> ClientUpdate:
        self.load_personalised(ctx, payload)
        model: LoRKDModel = ctx.model
        p = self.params

        def objective(flag: str, x: ModelInput, y: torch.Tensor) -> torch.Tensor:
            logits = model(x, flag)
            loss = ctx.tasks[flag].loss(logits, y)
            if p.lam:
                with torch.no_grad():
                    teacher = model.teacher(x, flag)
                loss = loss + p.lam * distillation_loss(ctx.tasks[flag], logits, teacher, p.temperature)
            return loss

        metrics = local_sgd(ctx, objective=objective)
        if p.expert_sharing == "task":
            return ClientUpdate(delta=ctx.delta_from(payload), weight=client_weight(self.params, ctx), metrics=metrics)
        experts = [k for k in ctx.trained_keys if is_expert(k)]
        shared = [k for k in ctx.trained_keys if not is_expert(k)]
        return ClientUpdate(delta=ctx.delta_from(payload, shared), weight=client_weight(self.params, ctx), metrics=metrics, state=ctx.read(experts))
