"""WideResNet-34-10 as used by TRADES (Zhang et al. 2019) and the robustness literature (≈46.2 M).

Pre-activation blocks, widths 16 / 160 / 320 / 640, five blocks per group. Module names follow
TRADES' ``wideresnet.py`` (``block1.layer.0.convShortcut`` …) so its checkpoints load; TRADES' unused
``sub_block1`` is left out (it never runs in the forward). Imports ``torch``, :mod:`deqrobust.nn`
and :mod:`deqrobust.errors`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DEQInputError
from ..nn import input_normalization


class WideBasic(nn.Module):
    """Pre-activation block ``BN–ReLU–conv–BN–ReLU–(dropout)–conv`` with a 1×1 shortcut on width change."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = cin == cout
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """``n`` wide blocks; the first changes width/stride."""

    def __init__(self, n: int, cin: int, cout: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(WideBasic(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop_rate) for i in range(n))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen for 32×32 inputs, returning logits for inputs in [0, 1]."""

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ConfigError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.in_channels = in_channels
        self.normalize = input_normalization(mean, std, in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise DEQInputError(f"expected input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        return self.fc(out.mean(dim=(2, 3)))


def wrn34_10(
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    drop_rate: float = 0.0,
) -> WideResNet:
    """TRADES' WideResNet-34-10 (46,160,474 parameters for 10 classes and 3 input channels).

    Example:
        >>> import torch
        >>> model = wrn34_10(num_classes=10)
        >>> sum(p.numel() for p in model.parameters())
        46160474
    """
    return WideResNet(34, 10, num_classes, in_channels, drop_rate, mean, std)
