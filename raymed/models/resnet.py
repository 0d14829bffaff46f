"""ResNet-18 adapted to 28×28 inputs: torchvision's network with a 3×3 stride-1 stem and no max-pool
(as in MedMNIST v2's benchmarks), any channel count; the 3D variant is torchvision's R3D-18 with the
same stem change. The spatial tokens are the last stage's feature map (4×4 at 28×28).

``resnet18_gn`` is the same network with every BatchNorm replaced by GroupNorm (32 groups), the
larger option for federations: no running statistics to average across clients (Hsieh et al., ICML
2020)."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18
from torchvision.models.video import r3d_18

from raymed.models.base import Backbone, register_model


def _group_norm(module: nn.Module) -> nn.Module:
    """``module`` with each BatchNorm layer replaced, in place, by a GroupNorm over the same channels."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm2d, nn.BatchNorm3d)):
            setattr(module, name, nn.GroupNorm(min(32, child.num_features), child.num_features))
        else:
            _group_norm(child)
    return module


@register_model("resnet18_gn")
def resnet18_group_norm(in_channels: int, spatial_dims: int) -> Backbone:
    return _group_norm(resnet18_small(in_channels, spatial_dims))


@register_model("resnet18")
def resnet18_small(in_channels: int, spatial_dims: int) -> Backbone:
    if spatial_dims == 2:
        net = resnet18(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        body = nn.Sequential(net.conv1, net.bn1, net.relu, net.layer1, net.layer2, net.layer3, net.layer4)
    else:
        net = r3d_18(weights=None)
        net.stem[0] = nn.Conv3d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        body = nn.Sequential(net.stem, net.layer1, net.layer2, net.layer3, net.layer4)
    return Backbone(body, nn.Sequential(net.avgpool, nn.Flatten()), token_dim=512, feature_dim=512)
