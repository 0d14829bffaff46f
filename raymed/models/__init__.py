"""Model registry (timm-style): ``@register_model("name")`` backbones, wrapped with one head per dataset.

Every model is a :class:`FedModel`: a shared ``backbone`` (images → feature vector) and ``heads``, one
linear head per dataset/task, so a federation of several modalities trains one backbone. Parameter
names are ``backbone.*`` and ``heads.<flag>.*``; methods such as FedPer select by these prefixes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from raymed.data.tasks import TaskSpec

BackboneFactory = Callable[[int, int], tuple[nn.Module, int]]  # (in_channels, spatial_dims) -> (module, dim)
MODELS: dict[str, BackboneFactory] = {}


def register_model(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    def wrap(factory: BackboneFactory) -> BackboneFactory:
        MODELS[name] = factory
        return factory

    return wrap


class FedModel(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, tasks: dict[str, TaskSpec], in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.backbone = backbone
        self.heads = nn.ModuleDict({flag: nn.Linear(feature_dim, t.num_outputs) for flag, t in tasks.items()})

    def forward(self, x: torch.Tensor, dataset: str) -> torch.Tensor:
        return self.heads[dataset](self.backbone(x))

    def state_keys(self, datasets: list[str]) -> list[str]:
        """State entries a client holding ``datasets`` trains: the backbone and those datasets' heads."""
        own = tuple(f"heads.{d}." for d in datasets)
        return [k for k in self.state_dict() if not k.startswith("heads.") or k.startswith(own)]


def build_model(name: str, tasks: dict[str, TaskSpec], seed: int) -> FedModel:
    """Build model ``name`` for ``tasks``; the same seed gives the same initial weights in every process."""
    spatial = {t.spatial_dims for t in tasks.values()}
    if len(spatial) != 1:
        raise ValueError("cannot mix 2D and 3D tasks in one model")
    in_channels = max(t.channels for t in tasks.values())  # gray images are repeated to fit RGB models
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, dim = MODELS[name](in_channels, spatial.pop())
        return FedModel(backbone, dim, tasks, in_channels)


# Register the built-in backbones.
from raymed.models import cnn, resnet  # noqa: E402,F401
