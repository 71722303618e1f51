"""Variational (locked) dropout for DEQs: one mask per forward pass, reused at every solver step.

A DEQ evaluates ``f`` many times per forward; ordinary dropout would draw a new mask at each
evaluation, so ``f`` would change between solver iterations and have no fixed point.
:class:`~deqrobust.core.DEQClassifier` calls ``reset_mask()`` on every submodule of ``f`` at the start
of each forward; the next call in training mode draws the mask, later calls reuse it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class VariationalDropout2d(nn.Module):
    """Dropout whose Bernoulli mask (shape of the input, scaled by ``1/(1-p)``) is kept until reset.

    Identity in eval mode and for ``p = 0``. In training mode the mask is drawn lazily on the first
    call after :meth:`reset_mask` and reused until the next reset; an input of another shape before
    that reset is an error (the mask would not fit the batch).

    Args:
        p: drop probability in ``[0, 1)``.

    Example:
        >>> import torch
        >>> drop = VariationalDropout2d(0.5).train()
        >>> x = torch.ones(2, 3, 4, 4)
        >>> a, b = drop(x), drop(x)          # same mask within one forward
        >>> bool(torch.equal(a, b)), sorted(a.unique().tolist())
        (True, [0.0, 2.0])
        >>> drop.reset_mask(); drop.mask is None
        True
        >>> bool(torch.equal(drop.eval()(x), x))
        True
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.mask: Optional[Tensor] = None

    def reset_mask(self) -> None:
        """Forget the current mask; the next training-mode call draws a new one."""
        self.mask = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.dim() != 4:
            raise ValueError(f"VariationalDropout2d expects (B, C, H, W) input, got shape {tuple(x.shape)}")
        if self.mask is None:
            with torch.no_grad():
                keep = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.p)
            self.mask = keep / (1.0 - self.p)
        elif self.mask.shape != x.shape:
            raise RuntimeError(
                f"VariationalDropout2d mask has shape {tuple(self.mask.shape)} but the input has shape "
                f"{tuple(x.shape)}; call reset_mask() before a forward pass with a new batch shape"
            )
        elif self.mask.device != x.device or self.mask.dtype != x.dtype:
            self.mask = self.mask.to(device=x.device, dtype=x.dtype)
        return x * self.mask

    def extra_repr(self) -> str:
        return f"p={self.p}"
