"""Building blocks of the multiscale DEQ (MDEQ, Bai et al. 2020; locuslab/mdeq, classification variant).

``f``-side: :class:`ResidualBlock` (one per resolution branch), :func:`fuse_layer` (branch j -> i),
:class:`PostFuse`. Head-side: :class:`Bottleneck` (HRNet increase block). Group counts are clipped to
a divisor of the channel count (``gcd``), so small models can keep the paper's nominal ``groups``.
Imports ``torch`` and :mod:`deqrobust.nn` only.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from torch import Tensor, nn

from ..nn import VariationalDropout2d, weight_norm


def group_norm(channels: int, groups: int, affine: bool = True) -> nn.GroupNorm:
    """``GroupNorm`` with ``gcd(channels, groups)`` groups (the requested count when it divides)."""
    return nn.GroupNorm(math.gcd(channels, max(1, groups)), channels, affine=affine)


def conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=bias)


class ResidualBlock(nn.Module):
    """MDEQ's BasicBlock of one branch (weight-normed convs, expansion 5).

    ``out = GN3(ReLU(GN2(drop(conv2(ReLU(GN1(conv1(z))))) + injection) + z))``.
    """

    def __init__(self, channels: int, groups: int, dropout: float = 0.0, expand: int = 5) -> None:
        super().__init__()
        hidden = expand * channels
        self.conv1 = weight_norm(conv3x3(channels, hidden))
        self.gn1 = group_norm(hidden, groups)
        self.relu = nn.ReLU()
        self.conv2 = weight_norm(conv3x3(hidden, channels))
        self.drop = VariationalDropout2d(dropout)
        self.gn2 = group_norm(channels, groups)
        self.gn3 = group_norm(channels, groups)

    def forward(self, z: Tensor, injection: Optional[Tensor] = None) -> Tensor:
        out = self.relu(self.gn1(self.conv1(z)))
        out = self.drop(self.conv2(out))
        if injection is not None:
            out = out + injection
        out = self.gn2(out) + z
        return self.gn3(self.relu(out))


def fuse_layer(channels: Sequence[int], source: int, target: int, groups: int) -> nn.Module:
    """Map branch ``source`` (resolution /2^source) onto branch ``target``.

    Lower resolution (``source > target``): 1×1 conv + GN + nearest upsample by 2^(source-target).
    Higher resolution: (target-source) stride-2 3×3 convs with GN, ReLU between them; intermediate
    convs keep the source's channels. Same branch: identity.
    """
    cin, cout = channels[source], channels[target]
    if source == target:
        return nn.Identity()
    if source > target:
        return nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size=1, bias=False),
            group_norm(cout, groups),
            nn.Upsample(scale_factor=2 ** (source - target), mode="nearest"),
        )
    steps = target - source
    layers: list[nn.Module] = []
    for k in range(steps):
        last = k == steps - 1
        out = cout if last else cin
        layers += [conv3x3(cin, out, stride=2), group_norm(out, groups)]
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PostFuse(nn.Sequential):
    """ReLU, weight-normed 1×1 conv, non-affine GroupNorm (as MDEQ's post-fuse layers).

    ``norm=False`` drops the GroupNorm: ``f`` then ends without its final normalisation (a fixed-point
    study lever; MDEQ always normalises).
    """

    def __init__(self, channels: int, groups: int, norm: bool = True) -> None:
        layers: list[nn.Module] = [nn.ReLU(), weight_norm(nn.Conv2d(channels, channels, kernel_size=1, bias=False))]
        if norm:
            layers.append(group_norm(channels, groups, affine=False))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """HRNet/ResNet bottleneck (expansion 4); 1×1 conv + BN projection shortcut when the channels change."""

    expansion = 4

    def __init__(self, cin: int, planes: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample: nn.Module = nn.Identity()
        if cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))
