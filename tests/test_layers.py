"""models.layers: the 1×1 convolution as a GEMM and nearest-upsample + 3×3 convolution as one transposed
convolution equal the direct computations (values and all gradients) in both memory formats."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.layers import PointwiseConv, UpsampleConv

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
def test_pointwise_conv_equals_a_1x1_convolution(fmt):
    ours, ref = _pair(PointwiseConv, 6, 4, 1)
    x = torch.randn(3, 6, 5, 7, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    out, want = ours(x), ref(x)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    assert out.is_contiguous(memory_format=fmt)  # the layout of the input is kept
    for a, b in zip(_grads(out, [x, ours.weight, ours.bias]), _grads(want, [x, ref.weight, ref.bias])):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


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
    for layer in (PointwiseConv(8, 4), UpsampleConv(8, 4)):
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_pointwise_conv_under_autocast_casts_its_parameters_before_expanding_them():
    """Autocast casts a (B, Cout, H·W) expanded bias element by element: the layer casts the (Cout,) bias and the
    (Cout, Cin) weight first, so no copy is as large as the output (nor, in backward, its fp32 gradient)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    layer, x = PointwiseConv(8, 16), torch.randn(4, 8, 6, 6).bfloat16().requires_grad_()
    copies = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default:
                copies.append(out.numel())
            return out

    with Copies(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        out.sum().backward()
    assert out.dtype == torch.bfloat16
    assert copies and max(copies) < out.numel(), copies


@pytest.mark.parametrize("hw, bf16, transposed", [((8, 8), False, True), ((8, 8), True, True), ((4, 4), False, False),
                                                   ((4, 4), True, False)])
def test_upsample_conv_picks_the_faster_form_on_a_cpu(hw, bf16, transposed, monkeypatch):
    """The transposed form from 8×8 inputs up; upsampling + the direct convolution on smaller inputs, where oneDNN's
    transposed convolution is the slower one (benchmarks/README.md)."""
    calls = []
    real = F.conv_transpose2d
    monkeypatch.setattr(F, "conv_transpose2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer, x = UpsampleConv(4, 4), torch.randn(1, 4, *hw)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = layer(x)
    assert out.shape == (1, 4, 2 * hw[0], 2 * hw[1])
    assert bool(calls) == transposed
