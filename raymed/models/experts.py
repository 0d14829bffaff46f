"""Low-rank experts on dense layers, routed per sample: LoRKD's task experts, MAFM3's (task, modality) modules.

A wrapped layer keeps its base weight W0 (a Conv1d/2d/3d or a Linear) and adds named experts, each a
low-rank update (LoRA, Hu et al. 2021, https://arxiv.org/abs/2106.09685)

    ΔW_e = (α / r) · B_e A_e,    A_e ∈ R^{r × fan_in} Kaiming-uniform,  B_e ∈ R^{out × r} zero,

so every expert starts at ΔW_e = 0. For a convolution fan_in = in·k^d and B_e A_e is reshaped to W0's
shape (the factorisation of peft's LoRA conv: A a k×k convolution to r channels, B a 1×1 one).
Sample i routed to expert t_i sees  y_i = (W0 + ΔW_{t_i}) ∗ x_i + b.

- One expert in the batch: one convolution (or matmul) with W0 + ΔW_t.
- Several: LoRKD's knowledge-separation convolution. The batch is folded into the channels and each
  sample is convolved with its own weight W0 + ΔW_{t_i} in one grouped convolution (groups = batch
  size); linears add (α/r)·B_{t_i} A_{t_i} x_i with batched matmuls. Either way the gradient of sample
  i reaches expert t_i and no other.
- Experts absent from a batch are not computed at all: their gradient is None, not merely zero.

:func:`fuse` folds one expert into plain layers (W = W0 + ΔW_t) for deployment. peft's LoRA runs one
adapter per forward while training (mixed-adapter batches only at inference, by splitting the
batch), so per-sample routing is written here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DENSE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LowRankExperts(nn.Module):
    """``base`` (W0, b) plus experts ``names``; :attr:`route` (expert index per sample, set by the
    owning model before each forward) picks each sample's expert; None runs the base layer alone."""

    def __init__(self, base: nn.Module, names: Sequence[str], rank: int, alpha: float):
        super().__init__()
        if not isinstance(base, DENSE):
            raise TypeError(f"low-rank experts wrap Conv1d/2d/3d or Linear layers, not {type(base).__name__}")
        if isinstance(base, nn.Linear) is False and (base.groups != 1 or base.padding_mode != "zeros"):
            raise ValueError("low-rank experts need an ungrouped, zero-padded convolution")
        self.base = base
        self.names = list(names)
        self.scale = alpha / rank
        out, fan_in = base.weight.shape[0], base.weight[0].numel()
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(rank, fan_in)) for n in self.names})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.zeros(out, rank)) for n in self.names})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.route: torch.Tensor | None = None

    def delta(self, name: str) -> torch.Tensor:
        """ΔW of expert ``name``, in W0's shape."""
        return (self.scale * self.lora_B[name] @ self.lora_A[name]).view_as(self.base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route is None:
            return self.base(x)
        present = self.route.unique()  # sorted expert indices
        if len(present) == 1:
            return self._dense(x, self.base.weight + self.delta(self.names[int(present[0])]))
        slot = torch.searchsorted(present, self.route)  # each sample's position among the present experts
        if isinstance(self.base, nn.Linear):
            a = torch.stack([self.lora_A[self.names[int(i)]] for i in present])[slot]  # B×r×in
            b = torch.stack([self.lora_B[self.names[int(i)]] for i in present])[slot]  # B×out×r
            low = torch.einsum("b...i,bri->b...r", x, a)
            return self.base(x) + self.scale * torch.einsum("b...r,bor->b...o", low, b)
        weights = self.base.weight + torch.stack([self.delta(self.names[int(i)]) for i in present])[slot]  # B×out×in×k…
        n, conv = len(x), self.base
        bias = conv.bias.repeat(n) if conv.bias is not None else None
        y = _CONV[x.dim() - 2](
            x.reshape(1, -1, *x.shape[2:]), weights.reshape(-1, *weights.shape[2:]), bias, conv.stride, conv.padding, conv.dilation, groups=n
        )
        return y.view(n, -1, *y.shape[2:])

    def _dense(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, nn.Linear):
            return F.linear(x, weight, self.base.bias)
        return self.base._conv_forward(x, weight, self.base.bias)


def add_experts(module: nn.Module, names: Sequence[str], rank: int, alpha: float, skip: Sequence[str] = ()) -> list[str]:
    """Wrap every dense layer of ``module`` (except the paths in ``skip``) in :class:`LowRankExperts`,
    in place; returns the wrapped layers' paths. Grouped (depthwise) convolutions stay as they are."""
    wrapped = []
    for path, layer in list(module.named_modules()):
        if path in skip or not isinstance(layer, DENSE) or (not isinstance(layer, nn.Linear) and layer.groups != 1):
            continue
        parent, _, attr = path.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, LowRankExperts(layer, names, rank, alpha))
        wrapped.append(path)
    return wrapped


def set_route(module: nn.Module, route: torch.Tensor | None) -> None:
    """Route every expert layer of ``module``: expert index per sample (None: base layers only)."""
    for layer in module.modules():
        if isinstance(layer, LowRankExperts):
            layer.route = route


@torch.no_grad()
def fuse(module: nn.Module, name: str) -> nn.Module:
    """A copy of ``module`` whose expert layers are plain layers with W = W0 + ΔW_name."""
    fused = copy.deepcopy(module)
    for path, layer in list(fused.named_modules()):
        if isinstance(layer, LowRankExperts):
            plain = layer.base
            plain.weight.add_(layer.delta(name))
            parent, _, attr = path.rpartition(".")
            setattr(fused.get_submodule(parent) if parent else fused, attr, plain)
    return fused
