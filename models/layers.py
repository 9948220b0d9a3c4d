"""Two convolutions computed in a cheaper but exactly equivalent way. Both keep ``nn.Conv2d``'s parameters (same
names, shapes and initialisation), so checkpoints and parameter counts do not depend on how they are computed.

- ``PointwiseConv``: a 1×1 convolution is a matrix multiply over channels. oneDNN's 1×1 convolution on NCHW
  tensors is ~1.4–2× slower than the same GEMM (fwd + bwd, benchmarks/README.md), so on a CPU it runs as one.
  Elsewhere it is the plain convolution. In an H100 profile (benchmarks/README.md, "On a GPU") a batched GEMM
  kernel with 32×32 tiles, most likely this one (B GEMMs of only C_out rows each), took 13 ms of a 290 ms step;
  cuDNN's implicit GEMM tiles over B·H·W instead. The switch was not timed on the GPU.
- ``UpsampleConv``: nearest-neighbour 2× upsampling followed by a 3×3 convolution (the U-Net upsampler of
  DDPM / improved-diffusion / diffusers) equals one stride-2 transposed 4×4 convolution of the low-resolution
  input, whose kernel is a fixed sum of the 3×3 taps. It does 16 instead of 36 multiply-adds per input pixel
  and channel pair, and never materialises the upsampled tensor (which the direct form also keeps for its
  backward pass). On a CPU that is 1.3–2.4× faster in fp32 from 8×8 inputs up; on smaller inputs oneDNN's
  transposed convolution is the slower one (1.4× in fp32, 2.2× in bf16; benchmarks/README.md), so there the layer
  upsamples and convolves as written. (In bf16 the direct form is also faster on 8×8 inputs and, in channels_last,
  on 16×16 ones, by 1.2–1.8×, but it keeps a 4× larger tensor for the backward pass: +2.5 MiB of `tiny`'s 51.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x (B, C, H, W) is laid out channels_last (and not also plain contiguous, as with H = W = 1)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class PointwiseConv(nn.Conv2d):
    """``nn.Conv2d(cin, cout, 1)`` computed as a GEMM on a CPU: (B, Cin, H, W) → (B, Cout, H, W) in the input's
    layout."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        b, c, h, w = x.shape
        # Under autocast, cast the parameters before expanding them: autocast would otherwise materialise the
        # (B, Cout, H·W) bias and B weight copies in low precision, and their fp32 gradients in the backward pass.
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else self.weight.dtype
        weight, bias = self.weight.flatten(1).to(dtype), self.bias.to(dtype)  # (Cout, Cin), (Cout,)
        if is_channels_last(x):  # (B, H, W, Cin) in memory: one Linear over the last dimension
            return F.linear(x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)
        out = torch.baddbmm(bias[:, None].expand(b, -1, h * w), weight.expand(b, -1, -1), x.reshape(b, c, h * w))
        return out.view(b, -1, h, w)  # (B, Cout, H·W) → (B, Cout, H, W)


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
        if x.device.type == "cpu" and x.shape[-2] * x.shape[-1] < 64:
            return super().forward(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        kernel = _fold_nearest_upsampling(_fold_nearest_upsampling(self.weight, 2), 3)  # (Cout, Cin, 4, 4)
        return F.conv_transpose2d(x, kernel.transpose(0, 1), self.bias, stride=2, padding=1)
