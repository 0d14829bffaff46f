"""Model registry (timm-style): ``@register_model("name")`` backbones, wrapped with one head per dataset.

Every model is a :class:`FedModel`: a shared ``backbone`` (images → feature vector, and → spatial
tokens for methods that attend over them) and ``heads``, one per dataset/task, so a federation of
several modalities trains one backbone. Parameter names are ``backbone.*`` and ``heads.<flag>.*``;
methods such as FedPer select by these prefixes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from raymed.data.tasks import ModelInput, TaskSpec


class Backbone(nn.Module):
    """``body`` maps images to a feature map (B×C×spatial); ``pool`` maps that map to a vector."""

    def __init__(self, body: nn.Module, pool: nn.Module, token_dim: int, feature_dim: int):
        super().__init__()
        self.body, self.pool = body, pool
        self.token_dim, self.feature_dim = token_dim, feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(images))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The feature map as a sequence of spatial tokens, B×(H·W)×C."""
        return self.body(images).flatten(2).transpose(1, 2)


BackboneFactory = Callable[[int, int], Backbone]  # (in_channels, spatial_dims) -> backbone
MODELS: dict[str, BackboneFactory] = {}


def register_model(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    def wrap(factory: BackboneFactory) -> BackboneFactory:
        MODELS[name] = factory
        return factory

    return wrap


# ---------------------------------------------------------------------------------------------------
# Heads: (features, model input) -> output. The input is there for heads that need more than the
# features: the super-resolution head adds its residual to the enlarged image, the VQA head reads
# the question.


class LinearHead(nn.Linear):
    def forward(self, features: torch.Tensor, x: ModelInput | None = None) -> torch.Tensor:
        return super().forward(features)


class SuperResolutionHead(nn.Linear):
    """Full-size image = enlarged low-resolution input + a residual decoded from the features."""

    def __init__(self, feature_dim: int, task: TaskSpec):
        super().__init__(feature_dim, task.num_outputs)
        self.shape = (task.channels,) + (task.image_size,) * task.spatial_dims
        nn.init.zeros_(self.weight)  # start at the bicubic estimate
        nn.init.zeros_(self.bias)

    def forward(self, features: torch.Tensor, x: ModelInput | None = None) -> torch.Tensor:
        residual = super().forward(features).view(len(features), *self.shape)
        return x[:, : self.shape[0]] + residual


class VQAHead(nn.Module):
    """Answer logits from image features and the question's mean word embedding."""

    def __init__(self, feature_dim: int, task: TaskSpec, word_dim: int = 64, hidden: int = 256):
        super().__init__()
        self.words = nn.Embedding(task.question_vocab, word_dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(feature_dim + word_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, task.num_classes))

    def forward(self, features: torch.Tensor, x: ModelInput) -> torch.Tensor:
        question = x[1]
        mask = (question > 0).unsqueeze(-1).float()
        words = (self.words(question) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.mlp(torch.cat([features, words], dim=1))


def make_head(task: TaskSpec, feature_dim: int) -> nn.Module:
    if task.kind == "superres":
        return SuperResolutionHead(feature_dim, task)
    if task.kind == "vqa":
        return VQAHead(feature_dim, task)
    return LinearHead(feature_dim, task.num_outputs)


def images_of(x: ModelInput) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


SHARED_HEAD = "shared"  # heads.shared.*: the one head of model.head=shared


def make_heads(tasks: dict[str, TaskSpec], feature_dim: int) -> nn.ModuleDict:
    """One head per dataset, or the one head over the union of their classes (``model.head=shared``,
    whose tasks carry ``union_classes``)."""
    union = {t.union_classes for t in tasks.values()}
    if union and 0 not in union:
        return nn.ModuleDict({SHARED_HEAD: LinearHead(feature_dim, union.pop())})
    return nn.ModuleDict({flag: make_head(t, feature_dim) for flag, t in tasks.items()})


class FedModel(nn.Module):
    def __init__(self, backbone: Backbone, feature_dim: int, tasks: dict[str, TaskSpec], in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.backbone = backbone
        self.heads = make_heads(tasks, feature_dim)

    def head_key(self, dataset: str) -> str:
        """The name under ``heads`` of the head that serves ``dataset``."""
        return SHARED_HEAD if SHARED_HEAD in self.heads else dataset

    def head(self, dataset: str) -> nn.Module:
        return self.heads[self.head_key(dataset)]

    def features(self, x: ModelInput) -> torch.Tensor:
        return self.backbone(images_of(x))

    def forward(self, x: ModelInput, dataset: str) -> torch.Tensor:
        return self.head(dataset)(self.features(x), x)

    def predict(self, x: ModelInput, dataset: str) -> torch.Tensor:
        """What evaluation scores (the outputs; the report model generates text here instead)."""
        return self(x, dataset)

    def state_keys(self, datasets: list[str]) -> list[str]:
        """State entries a client holding ``datasets`` trains: all but other datasets' heads."""
        own = tuple(f"heads.{self.head_key(d)}." for d in datasets)
        return [k for k in self.state_dict() if not k.startswith("heads.") or k.startswith(own)]


def build_backbone(name: str, tasks: dict[str, TaskSpec]) -> tuple[Backbone, int]:
    """Backbone ``name`` for ``tasks`` (unseeded) and the channel count its input is expanded to."""
    spatial = {t.spatial_dims for t in tasks.values()}
    if len(spatial) != 1:
        raise ValueError("cannot mix 2D and 3D tasks in one model")
    in_channels = max(t.channels for t in tasks.values())  # gray images are repeated to fit RGB models
    return MODELS[name](in_channels, spatial.pop()), in_channels


def build_model(name: str, tasks: dict[str, TaskSpec], seed: int) -> FedModel:
    """Build model ``name`` for ``tasks``; the same seed gives the same initial weights in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, in_channels = build_backbone(name, tasks)
        return FedModel(backbone, backbone.feature_dim, tasks, in_channels)


# Register the built-in backbones.
from raymed.models import cnn, resnet  # noqa: E402,F401
