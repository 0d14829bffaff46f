"""MAFM3 — Qazi et al., "MAFM^3: Modular Adaptation of Foundation Models for Multi-Modal Medical AI",
2025, https://arxiv.org/abs/2511.11212 (code: https://github.com/Areeb2735/CTscan_prognosis_VLM), federated.

A frozen foundation model grows new skills through small modules that are selected by the input's
metadata at inference, never by retraining it. Each dataset is a (task, modality) pair (task: the
dataset's own, e.g. "retina" grading; modality: its imaging modality, :data:`MODALITIES`):

    within-model LoRA   on every dense layer after the patch embedding, one low-rank module per
                        (task, modality):   h ↦ (W0 + (α/r) B_{τ,μ} A_{τ,μ}) h        (W0 frozen)
    patch embedding     the foundation's first layer, frozen, for modalities it was trained on; a new,
                        trained one per new modality μ (e.g. RGB fundus on a gray-trained model),
                        initialised by inflating W0 over the new channels: W_μ[:, c] = Σ_c' W0[:, c'] / C_μ
    post-model head     one per task (a new task: retina grading read as a prognosis, a hazard per
                        grade trained with the discrete-time survival loss and scored with the
                        C-index; see :mod:`raymed.data.tasks`)

    inference on x with metadata (τ, μ):  head_τ( F_{W0 + ΔW_{τ,μ}}( embed_μ(x) ) )

Federated: a client trains only the modules of its own (task, modality) pairs (the LoRA module,
the head, and a new modality's patch embedding) and sends only those; the server averages each
module over the clients that trained it. The foundation's weights are never trained or sent: every
process loads them from the same file, so they stay bit-identical.

The foundation is ``foundation``: a raymed run folder (e.g. a fedavg run on the gray datasets) or its
``model.safetensors``; without one, a ``foundation_model`` is pretrained centrally on the pooled
training rows of ``foundation_datasets`` (:mod:`raymed.models.pretrained`). ``lora=false`` is the
ablation with heads and patch embeddings alone.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from raymed.config import ExperimentConfig, ModelConfig
from raymed.data.tasks import ModelInput, TaskSpec
from raymed.errors import ConfigError
from raymed.methods.base import Method, register_method
from raymed.methods.fedavg import FedAvg, FedAvgParams
from raymed.models import FedModel, images_of
from raymed.models.experts import DENSE, add_experts, set_route
from raymed.models.pretrained import load_model, resolve_pretrained

# The imaging modality of each MedMNIST dataset (the metadata that selects modules).
MODALITIES = {
    "pneumoniamnist": "xray", "chestmnist": "xray", "breastmnist": "ultrasound", "retinamnist": "fundus",
    "dermamnist": "dermatoscopy", "pathmnist": "pathology", "octmnist": "oct", "bloodmnist": "microscopy",
    "tissuemnist": "microscopy", "organamnist": "ct", "organcmnist": "ct", "organsmnist": "ct",
    "organmnist3d": "ct", "nodulemnist3d": "ct", "adrenalmnist3d": "ct", "fracturemnist3d": "ct",
    "vesselmnist3d": "mra", "synapsemnist3d": "electron_microscopy",
}  # fmt: skip


def modality_of(flag: str) -> str:
    return MODALITIES.get(flag, flag)


def module_of(flag: str) -> str:
    """The (task, modality) module name of a dataset, e.g. ``retina_fundus``."""
    return f"{flag.removesuffix('mnist')}_{modality_of(flag)}"


class MAFM3Params(FedAvgParams):
    rank: int = Field(8, ge=1, description="r, rank of every (task, modality) LoRA module")
    alpha: float = Field(16.0, gt=0, description="α: modules are scaled by α/r")
    lora: bool = Field(True, description="false: heads and new patch embeddings only (ablation)")
    foundation: str | None = Field(None, description="a raymed run folder or model.safetensors (None: pretrain one)")
    foundation_datasets: list[str] = Field(default_factory=lambda: ["pneumoniamnist", "breastmnist"], description="what a pretrained foundation learns")
    foundation_model: str = Field("cnn", description="backbone of the foundation pretrained when none is given")
    foundation_epochs: int = Field(3, ge=1, description="epochs of that central pretraining")


class PatchEmbedding(nn.Module):
    """The first layer, chosen by modality: the foundation's (frozen) for the modalities it knows, a new
    trained one for each new modality (:attr:`modality` is set by the model before each forward)."""

    def __init__(self, foundation: nn.Module, channels: int, new: dict[str, int]):
        super().__init__()
        self.foundation, self.channels = foundation, channels
        self.new = nn.ModuleDict({m: inflate(foundation, c) for m, c in new.items()})
        self.modality: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.modality in self.new:
            layer = self.new[self.modality]
            return layer(x[:, : layer.weight.shape[1]])
        return self.foundation(x[:, : self.channels])  # gray images come repeated to the widest modality's channels


@torch.no_grad()
def inflate(layer: nn.Module, channels: int) -> nn.Module:
    """A copy of the conv ``layer`` taking ``channels`` inputs, each weighted Σ W0 / channels, so a gray
    image repeated over the channels gives the foundation's response at the start."""
    new = type(layer)(channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=layer.bias is not None)
    new.weight.copy_(layer.weight.sum(dim=1, keepdim=True).expand_as(new.weight) / channels)
    if layer.bias is not None:
        new.bias.copy_(layer.bias)
    return new


class MAFM3Model(FedModel):
    def __init__(self, foundation: FedModel, tasks: dict[str, TaskSpec], p: MAFM3Params):
        backbone = foundation.backbone.requires_grad_(False)
        known = {modality_of(flag) for flag in foundation.heads}
        in_channels = max([foundation.in_channels, *(t.channels for t in tasks.values())])
        super().__init__(backbone, backbone.feature_dim, tasks, in_channels)  # new heads, seeded by the caller
        self.modules_of = {flag: module_of(flag) for flag in tasks}
        self.names = sorted(set(self.modules_of.values()))
        first = next(path for path, layer in backbone.named_modules() if isinstance(layer, DENSE))
        if p.lora:
            add_experts(backbone, self.names, p.rank, p.alpha, skip=[first])
        new = {modality_of(f): t.channels for f, t in tasks.items() if modality_of(f) not in known}
        parent, _, attr = first.rpartition(".")
        self.patch = PatchEmbedding(backbone.get_submodule(first), foundation.in_channels, new)
        setattr(backbone.get_submodule(parent) if parent else backbone, attr, self.patch)
        self.new_embedding_prefix = f"backbone.{first}.new."
        self.unsent_keys = frozenset(f"backbone.{k}" for k, v in backbone.named_parameters() if not v.requires_grad) | frozenset(
            f"backbone.{k}" for k, v in backbone.named_buffers()
        )

    def train(self, mode: bool = True) -> MAFM3Model:
        super().train(mode)
        for layer in self.backbone.modules():  # the foundation's normalisation statistics stay as trained
            if isinstance(layer, nn.modules.batchnorm._NormBase):
                layer.eval()
        return self

    def forward(self, x: ModelInput, dataset: str) -> torch.Tensor:
        """The modules of the dataset's (task, modality), chosen from its metadata."""
        images = images_of(x)
        self.patch.modality = modality_of(dataset)
        set_route(self.backbone, torch.full((len(images),), self.names.index(self.modules_of[dataset]), device=images.device))
        return self.head(dataset)(self.backbone(images), x)

    def state_keys(self, datasets: list[str]) -> list[str]:
        """A client's modules: its (task, modality) LoRA modules, heads, and new patch embeddings."""
        mine = {self.modules_of[d] for d in datasets}
        own = (*(f"heads.{self.head_key(d)}." for d in datasets), *(f"{self.new_embedding_prefix}{modality_of(d)}." for d in datasets))
        return [k for k in self.state_dict() if k.startswith(own) or (".lora_" in k and k.rsplit(".", 1)[1] in mine)]

    def foundation_state(self) -> dict[str, torch.Tensor]:
        """The foundation's backbone weights under their names in the foundation model (for checks)."""
        rename = lambda k: k.replace(".base.", ".").replace(".foundation.", ".")  # noqa: E731
        return {rename(k): v for k, v in self.state_dict().items() if k in self.unsent_keys}


@register_method
class MAFM3(FedAvg):
    name = "mafm3"
    Params = MAFM3Params

    def check_config(self, cfg: ExperimentConfig) -> None:
        if cfg.data.task != "classification":
            raise ConfigError(f"strategy mafm3 adds classification and prognosis modules: set data.task=classification (got {cfg.data.task})")
        missing = [f for f in self.params.foundation_datasets if f not in cfg.data.datasets]
        if not self.params.foundation and missing:
            raise ConfigError(
                f"strategy.foundation_datasets lists {', '.join(missing)}, which data.datasets lacks: the foundation is pretrained on "
                f"those rows; add them to data.datasets or give strategy.foundation a raymed run folder"
            )

    def prepare(self, cfg: ExperimentConfig, shard_dir: str) -> ExperimentConfig:
        """The foundation: the given run's model file, or one pretrained once beside the shards."""
        p = self.params
        return resolve_pretrained(cfg, shard_dir, "foundation", p.foundation_datasets, p.foundation_model, p.foundation_epochs)

    def build_model(self, cfg: ModelConfig, tasks: dict[str, TaskSpec], seed: int) -> MAFM3Model:
        if not self.params.foundation:
            raise ConfigError("strategy mafm3: no foundation model was prepared (strategy.foundation is empty)")
        foundation = load_model(self.params.foundation, "strategy.foundation")
        first = next(layer for layer in foundation.backbone.modules() if isinstance(layer, DENSE))
        if {t.spatial_dims for t in tasks.values()} != {first.weight.dim() - 2}:
            raise ConfigError(f"strategy.foundation takes {first.weight.dim() - 2}D images; data.datasets must all be {first.weight.dim() - 2}D")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MAFM3Model(foundation, tasks, self.params)

    # Server and client halves are FedAvg's: a client's trained keys are its own modules
    # (MAFM3Model.state_keys), so only those train and travel, and the per-key weighted mean averages
    # each module over the clients that trained it.
    client_updates = Method.client_updates  # one client at a time (the routed modules have no vectorised form)
