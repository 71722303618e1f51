"""ResNet-18 for 32×32 inputs, the deep baseline of Madry et al., TRADES and Bag-of-Tricks (≈11.2 M).

3×3 stride-1 stem conv, no max-pool, BasicBlocks [2, 2, 2, 2] with 64–512 channels, global average
pool, linear. Module names follow the widely used ``kuangliu/pytorch-cifar`` layout, so such
checkpoints load. Imports ``torch``, :mod:`deqrobust.nn` and :mod:`deqrobust.errors`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DEQInputError
from ..nn import input_normalization


class BasicBlock(nn.Module):
    """Post-activation residual block: two 3×3 conv–BN, projection shortcut on a shape change."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet returning logits for inputs in [0, 1] (normalisation, if any, is inside)."""

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.normalize = input_normalization(mean, std, in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        layers = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            strides = [1 if i == 0 else 2] + [1] * (blocks - 1)
            layer = []
            for stride in strides:
                layer.append(BasicBlock(cin, planes, stride))
                cin = planes
            layers.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise DEQInputError(f"expected input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(out.mean(dim=(2, 3)))


def resnet18(
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> ResNet:
    """The CIFAR ResNet-18 (11,173,962 parameters for 10 classes and 3 input channels).

    Example:
        >>> import torch
        >>> model = resnet18().eval()
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return ResNet((2, 2, 2, 2), num_classes, in_channels, mean, std)
