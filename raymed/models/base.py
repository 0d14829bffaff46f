"""The model registry and its parts (timm-style): ``@register_model("name")`` backbones, wrapped with one head per dataset.

Every model is a :class:`FedModel`: a shared ``backbone`` (images → feature vector, and → spatial
tokens for methods that attend over them) and ``heads``, one per dataset/task, so a federation of
several modalities trains one backbone. Parameter names are ``backbone.*`` and ``heads.<flag>.*``;
methods such as FedPer select by these prefixes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
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


class SuperResolutionHead(nn.Module):
    """Full-size image = enlarged low-resolution input + a residual decoded from the spatial feature
    map (B×C×g×g): a 3×3 convolution, then sub-pixel steps (a 3×3 convolution to 4× the channels and
    PixelShuffle ×2; Shi et al., CVPR 2016) until the map reaches the image size (a bilinear resize
    where it overshoots), then a 3×3 convolution to the image's channels. That last convolution starts
    at zero, so training starts from the bicubic estimate. It reads where the features are, not one
    vector per image: a linear map from a pooled vector to every pixel is a bottleneck, not a decoder."""

    reads_map = True  # the model hands it the feature map, not the pooled features

    def __init__(self, map_channels: int, grid: int, task: TaskSpec, width: int = 32):
        super().__init__()
        self.size, self.channels = task.image_size, task.channels
        layers: list[nn.Module] = [nn.Conv2d(map_channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(max(0, math.ceil(math.log2(self.size / grid)))):
            layers += [nn.Conv2d(width, 4 * width, 3, padding=1), nn.PixelShuffle(2), nn.ReLU(inplace=True)]
        self.decode = nn.Sequential(*layers)
        self.out = nn.Conv2d(width, self.channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, feature_map: torch.Tensor, x: ModelInput | None = None) -> torch.Tensor:
        h = self.decode(feature_map)
        if h.shape[-1] != self.size:
            h = F.interpolate(h, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return images_of(x)[:, : self.channels] + self.out(h)


def reads_map(head: nn.Module) -> bool:
    """Whether ``head`` decodes the spatial feature map (super-resolution) rather than the pooled features."""
    return getattr(head, "reads_map", False)


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


def make_head(task: TaskSpec, feature_dim: int, map_shape: tuple[int, int] | None = None) -> nn.Module:
    """The head of ``task`` over ``feature_dim`` features, or (super-resolution) over the feature map
    of ``map_shape`` (channels, grid side)."""
    if task.kind == "superres":
        if map_shape is None:
            raise ValueError("a super-resolution head needs the feature map's shape")
        return SuperResolutionHead(*map_shape, task)
    if task.kind == "vqa":
        return VQAHead(feature_dim, task)
    return LinearHead(feature_dim, task.num_outputs)


def images_of(x: ModelInput) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


SHARED_HEAD = "shared"  # heads.shared.*: the one head of model.head=shared


def make_heads(tasks: dict[str, TaskSpec], feature_dim: int, map_shape: tuple[int, int] | None = None) -> nn.ModuleDict:
    """One head per dataset, or the one head over the union of their classes (``model.head=shared``,
    whose tasks carry ``union_classes``)."""
    union = {t.union_classes for t in tasks.values()}
    if union and 0 not in union:
        return nn.ModuleDict({SHARED_HEAD: LinearHead(feature_dim, union.pop())})
    return nn.ModuleDict({flag: make_head(t, feature_dim, map_shape) for flag, t in tasks.items()})


@torch.no_grad()
def feature_grid(backbone: Backbone, in_channels: int, image_size: int) -> int:
    """The side of the backbone's feature map for square images of ``image_size``."""
    training = backbone.training
    backbone.eval()  # no batch-norm statistics move
    side = backbone.body(torch.zeros(1, in_channels, image_size, image_size)).shape[-1]
    backbone.train(training)
    return int(side)


class FedModel(nn.Module):
    def __init__(self, backbone: Backbone, feature_dim: int, tasks: dict[str, TaskSpec], in_channels: int, map_channels: int | None = None):
        """``map_channels``: the channels of :meth:`feature_map` (the backbone's token width unless a
        subclass maps it elsewhere)."""
        super().__init__()
        self.in_channels = in_channels
        self.backbone = backbone
        map_shape = None
        if sizes := {t.image_size for t in tasks.values() if t.kind == "superres"}:
            map_shape = (map_channels or backbone.token_dim, feature_grid(backbone, in_channels, max(sizes)))
        self.heads = make_heads(tasks, feature_dim, map_shape)

    def head_key(self, dataset: str) -> str:
        """The name under ``heads`` of the head that serves ``dataset``."""
        return SHARED_HEAD if SHARED_HEAD in self.heads else dataset

    def head(self, dataset: str) -> nn.Module:
        return self.heads[self.head_key(dataset)]

    def features(self, x: ModelInput) -> torch.Tensor:
        return self.backbone(images_of(x))

    def feature_map(self, x: ModelInput) -> torch.Tensor:
        """The spatial features (B×C×g×g) a decoding head reads."""
        return self.backbone.body(images_of(x))

    def forward(self, x: ModelInput, dataset: str) -> torch.Tensor:
        head = self.head(dataset)
        return head(self.feature_map(x) if reads_map(head) else self.features(x), x)

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
