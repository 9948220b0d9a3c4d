"""GroupNorm → optional scale-shift → SiLU as one autograd node that keeps only its input for the backward pass.

In autograd's default graph, ``silu(GN(x)·(1 + scale) + shift)`` keeps three full-size activations alive until the
backward pass: the GroupNorm output (for the scale gradient), the scale-shift output (SiLU's input) and, outside
this op, the SiLU output (the next convolution's input). ``x`` is kept anyway (it is the previous convolution's
output, or a block input held for the skip connection). This node saves only ``x`` and recomputes the normalisation
and the scale-shift in the backward pass — a few cheap elementwise passes — which removes two of those
tensors per U-Net block: about a third of a ResBlock's activation memory at a few percent of step time.

Shapes: x (B, C, H, W) in any memory format; scale, shift (B, C, 1, 1) or None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups: int, eps: float, upcast: bool):
        b, c = x.shape[:2]
        hw = x[0, 0].numel()
        xc = x.to(weight.dtype) if upcast else x
        n = torch.native_group_norm(xc, weight, bias, b, c, hw, groups, eps)[0]
        a = n if scale is None else torch.addcmul(shift, n, 1 + scale)
        ctx.save_for_backward(x, weight, bias, scale, shift)  # x in its own (low) precision
        ctx.groups, ctx.hw, ctx.eps, ctx.upcast = groups, hw, eps, upcast
        return F.silu(a).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, bias, scale, shift = ctx.saved_tensors
        b, c = x.shape[:2]
        # the forward again (same kernel, same values), which also gives the per-group statistics (B, G)
        xc = x.to(weight.dtype) if ctx.upcast else x
        n, mean, rstd = torch.native_group_norm(xc, weight, bias, b, c, ctx.hw, ctx.groups, ctx.eps)
        a = n if scale is None else torch.addcmul(shift, n, 1 + scale)
        ga = torch.ops.aten.silu_backward(grad.to(a.dtype), a)  # dL/da
        d_scale = d_shift = None
        if scale is not None:
            d_scale = (ga * n).sum((2, 3), keepdim=True) if ctx.needs_input_grad[3] else None
            d_shift = ga.sum((2, 3), keepdim=True) if ctx.needs_input_grad[4] else None
            ga = ga * (1 + scale)  # dL/dn
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.aten.native_group_norm_backward(ga, xc, mean, rstd, weight, b, c, ctx.hw, ctx.groups, mask)
        return None if dx is None else dx.to(x.dtype), dw, db, d_scale, d_shift, None, None, None


def group_norm_silu(x: torch.Tensor, norm: nn.GroupNorm, scale: torch.Tensor | None = None,
                    shift: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(norm(x)·(1 + scale) + shift)`` (or ``silu(norm(x))``), saving only ``x`` for the backward pass."""
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift go together")
    # Under autocast x is bf16/fp16 and the affine parameters fp32. CPU kernels take that mix and accumulate in fp32;
    # elsewhere x is upcast inside the node (as autocast runs group_norm in fp32) and only x is kept, in low precision.
    upcast = x.dtype != norm.weight.dtype and x.device.type != "cpu"
    return _apply(x, norm, scale, shift, upcast)


def _apply(x, norm, scale, shift, upcast: bool):
    compute = norm.weight.dtype if upcast else x.dtype
    if scale is not None:  # the embedding's Linear may run in another dtype under autocast
        scale, shift = scale.to(compute), shift.to(compute)
    return _GroupNormSiLU.apply(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps, upcast)
