"""models.layers: the 1×1 convolution as a GEMM and nearest-upsample + 3×3 convolution as one transposed
convolution equal the direct computations (values and all gradients) in both memory formats."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.layers import UpsampleConv

LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _grads(out, inputs, seed=1):
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, gy)


def _pair(cls, cin, cout, k):
    """Our layer and a plain nn.Conv2d holding the same (random) parameters, in float64."""
    ours = cls(cin, cout).double()
    ref = nn.Conv2d(cin, cout, k, padding=k // 2).double()
    ref.load_state_dict(ours.state_dict())  # same parameter names and shapes as nn.Conv2d
    return ours, ref


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("hw", [(8, 8), (9, 10), (4, 4), (3, 5), (1, 2)])  # ≥ 64 pixels: the transposed form
def test_upsample_conv_equals_nearest_upsampling_then_3x3_conv(fmt, hw):
    ours, ref = _pair(UpsampleConv, 5, 3, 3)
    x = torch.randn(2, 5, *hw, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    out = ours(x)
    want = ref(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert out.shape == (2, 3, 2 * hw[0], 2 * hw[1])
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    for a, b in zip(_grads(out, [x, ours.weight, ours.bias]), _grads(want, [x, ref.weight, ref.bias])):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_layers_under_bf16_autocast_follow_fp32():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    for layer in (UpsampleConv(8, 4),):
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


