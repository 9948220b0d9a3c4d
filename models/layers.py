"""The U-Net's upsampler computed in a cheaper but exactly equivalent way, keeping ``nn.Conv2d``'s parameters (same
names, shapes and initialisation), so checkpoints and parameter counts do not depend on how it is computed.

``UpsampleConv``: nearest-neighbour 2× upsampling followed by a 3×3 convolution (the U-Net upsampler of DDPM /
improved-diffusion / diffusers) equals one stride-2 transposed 4×4 convolution of the low-resolution input, whose
kernel is a fixed sum of the 3×3 taps. It does 16 instead of 36 multiply-adds per input pixel and channel pair, and
never materialises the upsampled tensor (which the direct form also keeps for its backward pass); on any device.
(A CPU-only 1×1-convolution-as-GEMM and a CPU-only branch for inputs under 8×8 saved 2–4% of the demo's step and
were removed: benchmarks/README.md, "CPU-only fast paths".)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x (B, C, H, W) is laid out channels_last (and not also plain contiguous, as with H = W = 1)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _fold_nearest_upsampling(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Along one spatial axis, the taps (w0, w1, w2) of a 3-tap kernel applied after nearest 2× upsampling act on
    the low-resolution input as the 4-tap transposed kernel (w2, w1 + w2, w0 + w1, w0) with stride 2, padding 1.

    Output row 2i reads upsampled rows 2i−1, 2i, 2i+1 = input rows i−1, i, i: taps w0 on x[i−1], w1 + w2 on x[i].
    Output row 2i+1 reads 2i, 2i+1, 2i+2 = rows i, i, i+1: w0 + w1 on x[i], w2 on x[i+1]. A transposed
    convolution gives output row k the input rows i with kernel index k + 1 − 2i, which orders the four sums so."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)


class UpsampleConv(nn.Conv2d):
    """``conv3x3(nearest_upsample_2x(x))`` (padding 1) computed as one transposed convolution: (B, C, H, W) →
    (B, C_out, 2H, 2W). The kernel is rebuilt from the 3×3 weight on every call (C_out·C_in·16 additions)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _fold_nearest_upsampling(_fold_nearest_upsampling(self.weight, 2), 3)  # (Cout, Cin, 4, 4)
        return F.conv_transpose2d(x, kernel.transpose(0, 1), self.bias, stride=2, padding=1)
