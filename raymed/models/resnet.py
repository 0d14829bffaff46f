"""ResNet-18 adapted to 28×28 inputs: torchvision's network with a 3×3 stride-1 stem and no max-pool
(as in MedMNIST v2's benchmarks), any channel count; the 3D variant is torchvision's R3D-18 with the
same stem change."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18
from torchvision.models.video import r3d_18

from raymed.models import register_model


@register_model("resnet18")
def resnet18_small(in_channels: int, spatial_dims: int) -> tuple[nn.Module, int]:
    if spatial_dims == 2:
        net = resnet18(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    else:
        net = r3d_18(weights=None)
        net.stem[0] = nn.Conv3d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.fc = nn.Identity()
    return net, 512
