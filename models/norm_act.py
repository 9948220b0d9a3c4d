"""GroupNorm → optional scale-shift → SiLU as one autograd node that keeps only its input for the backward pass.

In autograd's default graph, ``silu(GN(x)·(1 + scale) + shift)`` keeps three full-size activations alive until the
backward pass: the GroupNorm output (for the scale gradient), the scale-shift output (SiLU's input) and, outside
this op, the SiLU output (the next convolution's input). ``x`` is kept anyway (it is the previous convolution's
output, or a block input held for the skip connection). This node saves only ``x`` and recomputes the normalisation
and the scale-shift in the backward pass, which removes two of those tensors per U-Net block: about a third of a
ResBlock's activation memory.

The recomputation is cheap because the scale-shift is folded into GroupNorm's own affine: per sample b,
``GN(x)·γ·(1 + s_b) + β·(1 + s_b) + shift_b`` is a GroupNorm with the affine (γ', β')_b = (γ·(1 + s_b),
β·(1 + s_b) + shift_b). For NCHW tensors, a batch of B samples with G groups is viewed as one sample of B·C
channels in B·G groups (each group still holds only one sample's channels), so PyTorch's fused GroupNorm kernels
apply a per-sample affine: the forward is one GroupNorm and one in-place SiLU, the backward one GroupNorm, the
SiLU derivative and one GroupNorm backward (1.4–2.6× faster than the previous node alone; ~3% of a U-Net step,
benchmarks/README.md).
channels_last tensors cannot be viewed so: the node copies them to NCHW and back. That is faster than PyTorch's own
channels_last GroupNorm on a CPU (1.0–1.4x in fp32, 2.4–6x in bf16, forward + backward at U-Net sizes:
benchmarks/README.md), and CUDA's GroupNorm kernels take NCHW only.

Under ``torch.compile`` (``train.compile``) the same function is written as plain ops, which inductor fuses itself;
its kernels for the folded view were slow (benchmarks/README.md, "Both models compiled").

Shapes: x (B, C, H, W) in any memory format; scale, shift (B, C, 1, 1) or None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .layers import is_channels_last


def _per_sample_affine(weight, bias, scale, shift, b: int):
    """(γ', β'), each (B, C): GroupNorm's affine with the scale-shift folded in."""
    if scale is None:
        return weight.expand(b, -1), bias.expand(b, -1)
    s1 = 1 + scale.view(b, -1)
    return weight * s1, torch.addcmul(shift.view(b, -1), bias, s1)


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def _pre_activation(ctx, xc, gamma, beta):
        """a = GN(x)·γ' + β' for NCHW x → (a, mean, rstd). The batch is folded into the channels (B·G groups), so
        the per-sample affine runs inside the kernel."""
        b, c = xc.shape[:2]
        a, mean, rstd = torch.native_group_norm(xc.view(1, b * c, ctx.hw), gamma.reshape(-1), beta.reshape(-1),
                                                1, b * c, ctx.hw, b * ctx.groups, ctx.eps)
        return a.view(xc.shape), mean, rstd

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups: int, eps: float, upcast: bool):
        ctx.groups, ctx.hw, ctx.eps, ctx.upcast = groups, x[0, 0].numel(), eps, upcast
        ctx.channels_last = is_channels_last(x)  # computed in NCHW; the output goes back to x's layout
        # x itself is saved, in its own (low) precision and layout: it is usually kept anyway (a skip connection's or
        # a convolution's input), so an NCHW copy would double it
        ctx.save_for_backward(x, weight, bias, scale, shift)
        xc = x.contiguous()
        gamma, beta = _per_sample_affine(weight, bias, scale, shift, x.shape[0])
        a = _GroupNormSiLU._pre_activation(ctx, xc.to(weight.dtype) if upcast else xc, gamma, beta)[0]
        out = F.silu(a, inplace=True).to(x.dtype)
        return out.contiguous(memory_format=torch.channels_last) if ctx.channels_last else out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, bias, scale, shift = ctx.saved_tensors
        b, c = x.shape[:2]
        gamma, beta = _per_sample_affine(weight, bias, scale, shift, b)
        xc = x.contiguous().to(weight.dtype) if ctx.upcast else x.contiguous()
        a, mean, rstd = _GroupNormSiLU._pre_activation(ctx, xc, gamma, beta)  # the forward again
        ga = torch.ops.aten.silu_backward(grad.to(a.dtype).contiguous(), a)  # dL/da
        dx, d_gamma, d_beta = torch.ops.aten.native_group_norm_backward(
            ga.view(1, b * c, ctx.hw), xc.view(1, b * c, ctx.hw), mean, rstd, gamma.reshape(-1), 1, b * c, ctx.hw,
            b * ctx.groups, [ctx.needs_input_grad[0], True, True])
        d_gamma, d_beta = d_gamma.view(b, c), d_beta.view(b, c)
        # back through the fold: γ' = γ·(1 + s), β' = β·(1 + s) + shift
        if scale is None:
            d_weight, d_bias, d_scale, d_shift = d_gamma.sum(0), d_beta.sum(0), None, None
        else:
            s1 = 1 + scale.view(b, c)
            d_weight, d_bias = (d_gamma * s1).sum(0), (d_beta * s1).sum(0)
            d_scale, d_shift = (d_gamma * weight + d_beta * bias).view(scale.shape), d_beta.view(shift.shape)
        if dx is not None:
            dx = dx.view(x.shape).to(x.dtype)
            dx = dx.contiguous(memory_format=torch.channels_last) if ctx.channels_last else dx
        return dx, d_weight, d_bias, d_scale, d_shift, None, None, None


def group_norm_silu(x: torch.Tensor, norm: nn.GroupNorm, scale: torch.Tensor | None = None,
                    shift: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(norm(x)·(1 + scale) + shift)`` (or ``silu(norm(x))``), saving only ``x`` for the backward pass."""
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift go together")
    if not norm.affine:
        raise ValueError("group_norm_silu needs a GroupNorm with affine=True (its γ and β take the scale-shift)")
    if torch.compiler.is_compiling():  # plain ops: the compiler fuses them and chooses what to recompute itself
        h = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return F.silu(h if scale is None else torch.addcmul(shift, h, 1 + scale))
    # Under autocast x is bf16/fp16 and the affine parameters fp32. CPU kernels take that mix and accumulate in fp32;
    # elsewhere x is upcast inside the node (as autocast runs group_norm in fp32) and only x is kept, in low precision.
    upcast = x.dtype != norm.weight.dtype and x.device.type != "cpu"
    return _apply(x, norm, scale, shift, upcast)


def _apply(x, norm, scale, shift, upcast: bool):
    compute = norm.weight.dtype if upcast else x.dtype
    if scale is not None:  # the embedding's Linear may run in another dtype under autocast
        scale, shift = scale.to(compute), shift.to(compute)
    return _GroupNormSiLU.apply(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps, upcast)
