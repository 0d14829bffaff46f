"""FedBN — Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization", ICLR 2021, https://arxiv.org/abs/2102.07623

FedAvg in which every normalisation layer — its affine parameters and its running statistics —
stays on the client, so each hospital normalises with its own scanner's statistics (feature shift),
while every other layer, heads included, is averaged:

    client k:  w_k ← (w_t without norm layers) ∪ N_k   (N_k: its own norm layers; the seeded
               initial ones on first participation)
               E epochs (or K steps) of SGD on F_k
               send Δ_k = w_k − w_t over the non-norm parameters;  keep N_k
    server:    w_{t+1} = w_t + η_s · Σ w_k Δ_k / Σ w_k   over the non-norm parameters

The normalisation layers are found by module type (BatchNorm, InstanceNorm, GroupNorm, LayerNorm),
not by name. As in the paper there is no single global model (each client's norm layers are its
own): FedBN is evaluated through each client's model on its held-out split. A model without
normalisation layers (``cnn``) is refused: FedBN would be FedAvg. Use ``cnn_bn`` (BatchNorm),
``resnet18``, or ``cnn_gn``/``resnet18_gn``.
"""

from __future__ import annotations

import torch
from torch import nn

from raymed.config import ExperimentConfig, ModelConfig
from raymed.data.tasks import TaskSpec
from raymed.errors import ConfigError
from raymed.methods.base import register_method
from raymed.methods.fedavg import FedAvgParams
from raymed.methods.fedper import FedPer
from raymed.models import FedModel

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)  # _NormBase: BatchNorm*d, InstanceNorm*d


def normalisation_keys(model: torch.nn.Module) -> set[str]:
    """State keys (parameters and buffers) of every normalisation layer of ``model``."""
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            local = [k for k, _ in module.named_parameters(recurse=False)] + [k for k, _ in module.named_buffers(recurse=False)]
            keys |= {f"{name}.{k}" for k in local}
    return keys


@register_method
class FedBN(FedPer):
    name = "fedbn"
    Params = FedAvgParams

    def __init__(self, params=None):
        super().__init__(params)
        self.local_keys: set[str] = set()

    def check_config(self, cfg: ExperimentConfig) -> None:
        if cfg.data.task == "report":
            raise ConfigError("strategy fedbn: the report decoder normalises with LayerNorm inside a transformer; use strategy.name=fedmrg or fedper")

    def build_model(self, cfg: ModelConfig, tasks: dict[str, TaskSpec], seed: int) -> FedModel:
        model = super().build_model(cfg, tasks, seed)
        self.local_keys = normalisation_keys(model)
        return model

    def check_model(self, cfg: ExperimentConfig, model: torch.nn.Module) -> None:
        if not normalisation_keys(model):
            raise ConfigError(
                f"strategy fedbn: model {cfg.model.name} has no normalisation layers, so FedBN would be FedAvg; "
                f"set model.name=cnn_bn (BatchNorm), resnet18, cnn_gn or resnet18_gn"
            )

    def is_personal(self, key: str) -> bool:
        return key in self.local_keys
