"""CNNs with normalisation, global average pooling and dropout, for 2D images and 3D volumes.

Three conv blocks (conv 3×3 → norm → ReLU → max-pool), widths 32, 64, 128 (halved in 3D), then
global average pooling and dropout before the head: a textbook small CNN that does not depend on the
image size (any square MedMNIST size, any own data) and has no 3,136×128 dense layer. One convolution
per block: two per block cost 2.5-4× the CPU time for at most two test images' difference on one seed
(benchmarks/README, "Backbone candidates"); on a 2D RGB input it has 93 k parameters and costs ~1.6×
``cnn`` per batch.

- ``cnn_gn``: GroupNorm (8 groups), which keeps no running statistics, so averaging it across
  clients is as well-defined as averaging any other weight (Hsieh et al., ICML 2020, "The Non-IID
  Data Quagmire": BatchNorm's statistics break under label skew, GroupNorm does not).
- ``cnn_bn``: BatchNorm, for FedBN-style studies (Li et al., ICLR 2021: https://arxiv.org/abs/2102.07623),
  where each client keeps its own normalisation layers. Its keys name the layer: every
  normalisation parameter and statistic is ``backbone.body.block<i>.norm1.*``.

Parameter names: ``backbone.body.block<i>.{conv1,norm1}.*`` and ``heads.<flag>.*``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from raymed.models.base import Backbone, register_model

WIDTHS = (32, 64, 128)
DROPOUT = 0.2


def _norm(kind: str, channels: int, spatial_dims: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)


def normalised_cnn(in_channels: int, spatial_dims: int, norm: str, widths: tuple[int, ...] = WIDTHS, dropout: float = DROPOUT) -> Backbone:
    conv, pool = (nn.Conv2d, nn.MaxPool2d) if spatial_dims == 2 else (nn.Conv3d, nn.MaxPool3d)
    widths = widths if spatial_dims == 2 else tuple(w // 2 for w in widths)
    blocks, channels = [], in_channels
    for i, width in enumerate(widths, start=1):
        layers = OrderedDict(conv1=conv(channels, width, 3, padding=1, bias=False), norm1=_norm(norm, width, spatial_dims), relu1=nn.ReLU(inplace=True))
        channels = width
        if i < len(widths):  # 28 → 14 → 7: the last block keeps its map (the tokens some methods attend over)
            layers["pool"] = pool(2)
        blocks.append((f"block{i}", nn.Sequential(layers)))
    body = nn.Sequential(OrderedDict(blocks))
    gap = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
    return Backbone(body, nn.Sequential(gap, nn.Flatten(), nn.Dropout(dropout)), token_dim=channels, feature_dim=channels)


@register_model("cnn_gn")
def cnn_group_norm(in_channels: int, spatial_dims: int) -> Backbone:
    return normalised_cnn(in_channels, spatial_dims, "group")


@register_model("cnn_bn")
def cnn_batch_norm(in_channels: int, spatial_dims: int) -> Backbone:
    return normalised_cnn(in_channels, spatial_dims, "batch")
