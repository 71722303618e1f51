"""The multiscale deep equilibrium classifier (MDEQ) of docs/method.md §12, as in locuslab/mdeq (cls variant).

``x -> stem (two 3×3 conv–BN–ReLU, no downsampling) -> e``; the state is one tensor per resolution
branch, ``z_i`` of shape (B, C_i, H/2^i, W/2^i), solved for ``z = f(z, e)`` with ``f`` =
per-branch :class:`~deqrobust.models.mdeq_blocks.ResidualBlock` (injection into branch 0 only),
multiscale fusion and post-fuse layers; the HRNet-style head maps ``z*`` to logits.
Sizes ``large`` (≈11.1 M parameters) and ``xl`` (≈48.8 M) are the paper's; ``tiny`` and ``small``
are ours, for CPU work. Imports :mod:`deqrobust.core`, :mod:`deqrobust.nn`, :mod:`deqrobust.errors`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional, Sequence, cast

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..core import DEQClassifier
from ..errors import ConfigError, DEQInputError
from ..nn import input_normalization
from .mdeq_blocks import Bottleneck, PostFuse, ResidualBlock, conv3x3, fuse_layer


@dataclass(frozen=True)
class MDEQSize:
    """Architecture of one MDEQ size: branch channels, head channels (before ×4), final channels."""

    channels: tuple[int, ...]
    head_channels: tuple[int, ...]
    final_channels: int
    groups: int = 8
    dropout: float = 0.0

    @property
    def branches(self) -> int:
        return len(self.channels)


MDEQ_SIZES: dict[str, MDEQSize] = {
    "tiny": MDEQSize((8, 16), (4, 8), 64, groups=4),
    "small": MDEQSize((12, 24, 48), (6, 12, 24), 192, groups=4),
    "large": MDEQSize((32, 64, 128, 256), (14, 28, 56, 112), 1680, groups=8, dropout=0.3),
    "xl": MDEQSize((72, 144, 288, 576), (20, 40, 80, 160), 1800, groups=8, dropout=0.3),
}

# The paper's "8/7" Broyden setting with the phantom gradient (docs/method.md §3, §11).
MDEQ_DEQ_DEFAULTS: dict[str, Any] = dict(
    f_solver="broyden",
    f_max_iter=8,
    f_tol=1e-3,
    f_stop_mode="rel",
    b_solver="broyden",
    b_max_iter=7,
    grad="phantom",
    phantom_steps=5,
    phantom_damping=0.5,
)


def check_spatial(height: int, width: int, branches: int) -> None:
    """Raise :class:`DEQInputError` unless H and W are positive multiples of ``2^(branches-1)``."""
    factor = 2 ** (branches - 1)
    if height < factor or width < factor or height % factor or width % factor:
        raise DEQInputError(
            f"an MDEQ with {branches} branches needs height and width divisible by {factor} "
            f"(2^(branches-1)), got {height}×{width}"
        )


class MDEQStem(nn.Module):
    """Optional input normalisation, then two 3×3 conv–BN–ReLU at full resolution: ``x -> e``."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        branches: int,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.branches = in_channels, branches
        self.normalize = input_normalization(mean, std, in_channels)
        self.net = nn.Sequential(
            conv3x3(in_channels, channels), nn.BatchNorm2d(channels), nn.ReLU(),
            conv3x3(channels, channels), nn.BatchNorm2d(channels), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise DEQInputError(f"expected input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        check_spatial(x.shape[2], x.shape[3], self.branches)
        return self.net(self.normalize(x))


class MDEQCore(nn.Module):
    """The equilibrium map ``f(z, e)`` on a list of branch states; ``init_state(e)`` gives zeros.

    ``final_norm=False`` leaves out the GroupNorm that ends every branch (see :class:`PostFuse`).
    """

    def __init__(self, channels: Sequence[int], groups: int = 8, dropout: float = 0.0, final_norm: bool = True) -> None:
        super().__init__()
        self.channels = tuple(channels)
        n = len(self.channels)
        self.blocks = nn.ModuleList(ResidualBlock(c, groups, dropout) for c in self.channels)
        self.fuse = nn.ModuleList(
            nn.ModuleList(fuse_layer(self.channels, j, i, groups) for j in range(n)) for i in range(n)
        )
        self.post_fuse = nn.ModuleList(PostFuse(c, max(1, groups // 2), final_norm) for c in self.channels)

    def init_state(self, e: Tensor) -> list[Tensor]:
        """``z_0``: zeros of shape (B, C_i, H/2^i, W/2^i) for every branch i."""
        bsz, _, height, width = e.shape
        check_spatial(height, width, len(self.channels))
        return [e.new_zeros(bsz, c, height >> i, width >> i) for i, c in enumerate(self.channels)]

    def forward(self, z: Sequence[Tensor], e: Tensor) -> list[Tensor]:
        out = [block(z_i, e if i == 0 else None) for i, (block, z_i) in enumerate(zip(self.blocks, z))]
        fused = []
        for i, row in enumerate(self.fuse):
            layers = cast(nn.ModuleList, row)  # a ModuleList of ModuleLists (typing only; no work per call)
            y = layers[0](out[0])
            for j in range(1, len(out)):
                y = y + layers[j](out[j])
            fused.append(self.post_fuse[i](y))
        return fused


class MDEQHead(nn.Module):
    """HRNet classification head: per-branch bottlenecks, stride-2 merge chain, 1×1 conv, pool, linear."""

    def __init__(
        self, channels: Sequence[int], head_channels: Sequence[int], final_channels: int, num_classes: int
    ) -> None:
        super().__init__()
        if len(head_channels) != len(channels):
            raise ConfigError(f"need one head channel count per branch: {len(channels)} != {len(head_channels)}")
        widths = [h * Bottleneck.expansion for h in head_channels]
        self.incre = nn.ModuleList(Bottleneck(c, h) for c, h in zip(channels, head_channels))
        self.down = nn.ModuleList(
            nn.Sequential(conv3x3(cin, cout, stride=2, bias=True), nn.BatchNorm2d(cout), nn.ReLU())
            for cin, cout in zip(widths[:-1], widths[1:])
        )
        self.final = nn.Sequential(
            nn.Conv2d(widths[-1], final_channels, kernel_size=1), nn.BatchNorm2d(final_channels), nn.ReLU()
        )
        self.classifier = nn.Linear(final_channels, num_classes)

    def forward(self, z: Sequence[Tensor]) -> Tensor:
        y = self.incre[0](z[0])
        for i, down in enumerate(self.down):
            y = self.incre[i + 1](z[i + 1]) + down(y)
        y = self.final(y).mean(dim=(2, 3))
        return self.classifier(y)


def init_mdeq_weights(model: nn.Module) -> None:
    """MDEQ's initialisation: plain convs ~ N(0, 0.01²), BN = (1, 0); weight-normed convs keep theirs."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and not parametrize.is_parametrized(module, "weight"):
            nn.init.normal_(module.weight, std=0.01)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _deq_settings(in_channels: int, deq_kwargs: dict[str, Any]) -> dict[str, Any]:
    valid = [
        name for name, p in inspect.signature(DEQClassifier.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY
    ]
    unknown = sorted(set(deq_kwargs) - set(valid))
    if unknown:
        valid = ["dropout", "mean", "std", "final_norm", *valid]
        raise ConfigError(f"unknown MDEQ argument(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    settings = dict(MDEQ_DEQ_DEFAULTS, input_shape=(in_channels, None, None))
    settings.update(deq_kwargs)
    return settings


def mdeq(
    size: str,
    num_classes: int = 10,
    in_channels: int = 3,
    *,
    dropout: Optional[float] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    final_norm: bool = True,
    **deq_kwargs: Any,
) -> DEQClassifier:
    """Build an MDEQ classifier of ``size`` (``tiny``, ``small``, ``large``, ``xl``).

    Args:
        size: a key of :data:`MDEQ_SIZES`.
        num_classes, in_channels: output classes and input channels (inputs are in [0, 1]).
        dropout: variational dropout in ``f``; default 0 for tiny/small, 0.3 for large/xl (MDEQ's).
        mean, std: optional per-channel input normalisation inside the stem.
        final_norm: end every branch of ``f`` with MDEQ's non-affine GroupNorm (default); ``False``
            leaves it out, so nothing bounds the state's scale (a fixed-point study lever).
        **deq_kwargs: :class:`~deqrobust.core.DEQClassifier` settings overriding
            :data:`MDEQ_DEQ_DEFAULTS` (Broyden 8/7, phantom gradient k=5, λ=0.5); unknown keys raise
            :class:`~deqrobust.errors.ConfigError`.

    Example:
        >>> import torch
        >>> model = mdeq("tiny", num_classes=10, in_channels=1).eval()
        >>> model(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> [tuple(t.shape) for t in model.f.init_state(torch.zeros(2, 8, 8, 8))]
        [(2, 8, 8, 8), (2, 16, 4, 4)]
    """
    if size not in MDEQ_SIZES:
        raise ConfigError(f"unknown MDEQ size {size!r}; valid sizes: {', '.join(MDEQ_SIZES)}")
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
    arch = MDEQ_SIZES[size]
    p = arch.dropout if dropout is None else float(dropout)
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {p}")
    settings = _deq_settings(in_channels, deq_kwargs)
    stem = MDEQStem(in_channels, arch.channels[0], arch.branches, mean, std)
    f = MDEQCore(arch.channels, arch.groups, p, final_norm=bool(final_norm))
    head = MDEQHead(arch.channels, arch.head_channels, arch.final_channels, num_classes)
    model = DEQClassifier(stem, f, head, **settings)
    init_mdeq_weights(model)
    return model

