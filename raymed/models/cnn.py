"""Small CNNs for 28×28 (or 28³) MedMNIST images: two conv blocks and a feature layer.

``cnn`` (32, 64 channels, 128 features; 0.42 M parameters on 2D RGB) is the default client model;
``cnn_large`` (64, 128 channels, 256 features; 1.7 M) is four times its size, for teacher/student
comparisons (LoRKD's teacher).
"""

from __future__ import annotations

from torch import nn

from raymed.models.base import Backbone, register_model


class PoolTo(nn.Module):
    """Adaptive average pooling to a ``grid``-sized map; the identity when the map is that size
    already (28×28 inputs), which ``nn.AdaptiveAvgPool*d`` would still compute, forward and back."""

    def __init__(self, grid: int, spatial_dims: int):
        super().__init__()
        self.grid = grid
        self.pool = nn.AdaptiveAvgPool2d(grid) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(grid)

    def forward(self, x):
        return x if all(size == self.grid for size in x.shape[2:]) else self.pool(x)


def two_block_cnn(in_channels: int, spatial_dims: int, widths: tuple[int, int], features: int) -> Backbone:
    conv, pool = (nn.Conv2d, nn.MaxPool2d) if spatial_dims == 2 else (nn.Conv3d, nn.MaxPool3d)
    width = widths if spatial_dims == 2 else (widths[0] // 2, widths[1] // 2)
    grid = 7  # 28 → 14 → 7 after two poolings; larger inputs are pooled down to the same grid
    body = nn.Sequential(
        conv(in_channels, width[0], 3, padding=1),
        nn.ReLU(inplace=True),
        pool(2),
        conv(width[0], width[1], 3, padding=1),
        nn.ReLU(inplace=True),
        pool(2),
        PoolTo(grid, spatial_dims),
    )
    head = nn.Sequential(nn.Flatten(), nn.Linear(width[1] * grid**spatial_dims, features), nn.ReLU(inplace=True))
    return Backbone(body, head, token_dim=width[1], feature_dim=features)


@register_model("cnn")
def small_cnn(in_channels: int, spatial_dims: int) -> Backbone:
    return two_block_cnn(in_channels, spatial_dims, (32, 64), 128)


@register_model("cnn_large")
def large_cnn(in_channels: int, spatial_dims: int) -> Backbone:
    return two_block_cnn(in_channels, spatial_dims, (64, 128), 256)
