"""A small CNN for 28×28 (or 28³) MedMNIST images: two conv blocks and a 128-d feature layer."""

from __future__ import annotations

from torch import nn

from raymed.models import Backbone, register_model


@register_model("cnn")
def small_cnn(in_channels: int, spatial_dims: int) -> Backbone:
    conv, pool, adaptive = (
        (nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d) if spatial_dims == 2 else (nn.Conv3d, nn.MaxPool3d, nn.AdaptiveAvgPool3d)
    )
    width = (32, 64) if spatial_dims == 2 else (16, 32)
    grid = 7  # 28 → 14 → 7 after two poolings; larger inputs are pooled down to the same grid
    body = nn.Sequential(
        conv(in_channels, width[0], 3, padding=1),
        nn.ReLU(inplace=True),
        pool(2),
        conv(width[0], width[1], 3, padding=1),
        nn.ReLU(inplace=True),
        pool(2),
        adaptive(grid),
    )
    head = nn.Sequential(nn.Flatten(), nn.Linear(width[1] * grid**spatial_dims, 128), nn.ReLU(inplace=True))
    return Backbone(body, head, token_dim=width[1], feature_dim=128)
