"""Multi-head attention with a pluggable kernel: xformers' memory-efficient attention on CUDA when installed and
working, PyTorch's scaled_dot_product_attention (flash / memory-efficient / math, chosen by PyTorch) otherwise.

Backend choice is made per call from where the tensors live, and logged once per backend. An installed xformers
whose CUDA kernels do not load (built for another PyTorch or CUDA: the usual state after a PyTorch upgrade) is
found by one tiny call per device, warned about once, and passed over for SDPA rather than failing mid-step.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
_logged: set[str] = set()
BACKENDS = ("auto", "sdpa", "xformers", "math")


# Looked up once: importlib cannot run inside a compiled graph (torch.compile would stop at every attention call).
_XFORMERS_INSTALLED = importlib.util.find_spec("xformers") is not None
_xformers_works: dict[str, str | None] = {}  # device type → None if xformers runs there, else why not


def xformers_available() -> bool:
    return _XFORMERS_INSTALLED


def xformers_problem(device: torch.device) -> str | None:
    """None when xformers' attention runs on ``device``'s type, else the reason; one tiny call, remembered.
    Inside a compiled graph nothing is tried: a device not yet tried eagerly counts as not working (SDPA)."""
    key = device.type
    if key not in _xformers_works:
        if torch.compiler.is_compiling():
            return "not tried inside a compiled graph"
        try:
            import xformers.ops as xops

            q = torch.zeros(1, 8, 1, 32, device=device, dtype=torch.float16)  # (B, L, H, d)
            xops.memory_efficient_attention(q, q, q)
            _xformers_works[key] = None
        except Exception as e:  # an import error, "No operator found …", a CUDA error: all mean "not usable"
            _xformers_works[key] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log.warning("xformers is installed but its attention does not run on %s (%s); using PyTorch's "
                        "scaled_dot_product_attention. Install an xformers built for this PyTorch and CUDA to use it "
                        "(`python -m xformers.info` tells what it was built for).", device, _xformers_works[key])
    return _xformers_works[key]


def select_backend(requested: str, device: torch.device) -> str:
    """The kernel to use: ``auto`` = xformers when installed, on CUDA and working, else SDPA."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; allowed values: {', '.join(BACKENDS)}")
    if requested not in ("auto", "xformers"):
        return requested
    if not (device.type == "cuda" and xformers_available()):
        if requested == "auto":
            return "sdpa"
        raise RuntimeError("attention backend 'xformers' needs the xformers package and CUDA tensors; "
                           "install it with `pip install -e .[gpu]` or use attention='auto' / 'sdpa'")
    problem = xformers_problem(device)
    if problem is None:
        return "xformers"
    if requested == "auto":
        return "sdpa"
    raise RuntimeError(f"attention backend 'xformers' does not run here ({problem}); install an xformers built for "
                       f"this PyTorch and CUDA, or use attention='auto' / 'sdpa'")


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast computes in on x's device, or x's own dtype when autocast is off there (or the device has
    no autocast, as PyTorch's meta device, which the device checks run on)."""
    kind = x.device.type
    if kind in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _log_once(backend: str) -> None:
    if backend not in _logged:
        _logged.add(backend)
        log.info("attention backend: %s", {"xformers": "xformers memory-efficient attention",
                                           "sdpa": "torch scaled_dot_product_attention",
                                           "math": "naive softmax(QKᵀ/√d)V"}[backend])


def naive_attention(q, k, v, mask=None):
    """softmax(QKᵀ/√d + bias) V, the reference. q: (B, H, Lq, d), k/v: (B, H, Lk, d), mask: (B, Lk) bool (True = keep)."""
    w = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        w = w.masked_fill(~mask[:, None, None, :], float("-inf"))
    return w.softmax(-1) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Attention of q (B, H, Lq, d) over k, v (B, H, Lk, d); ``mask`` (B, Lk) bool marks the keys to keep
    (text padding is False). Returns (B, H, Lq, d)."""
    backend = select_backend(backend, q.device)
    if not torch.compiler.is_compiling():  # logging inside a compiled graph would split it at every call
        _log_once(backend)
    if backend == "math":
        return naive_attention(q, k, v, mask)
    if backend == "xformers":
        import xformers.ops as xops  # optional, GPU only

        bias = None
        if mask is not None:  # an additive (B, H, Lq, Lk) bias; xformers wants q, k, v as (B, L, H, d)
            # Its kernels need the bias rows 8-aligned in memory: allocate Lk rounded up to 8 and slice (77 tokens →
            # 80; xformers' own hint). The query axis is a broadcast (stride 0), as diffusers passes it.
            b, h, lk = q.shape[0], q.shape[1], k.shape[2]
            bias = torch.zeros(b, h, 1, -(-lk // 8) * 8, device=q.device, dtype=q.dtype)[..., :lk]
            bias.masked_fill_(~mask[:, None, None, :], float("-inf"))
            bias = bias.expand(-1, -1, q.shape[2], -1)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)
    long = q.dtype == torch.bfloat16 and q.shape[2] * k.shape[2] >= 256 * 256
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and not long:
        # PyTorch's CPU flash kernel in bf16 (fp32 accumulation, AMX) has a high fixed cost: 2-6x slower than fp32
        # below 256 x 256 query-key pairs, 10-20% faster from there (fwd + bwd, benchmarks/README.md). Short
        # sequences attend in fp32, keeping only low-precision tensors for the backward pass.
        bias = None if mask is None else torch.zeros(mask.shape, device=q.device).masked_fill(~mask, float("-inf"))
        return _cpu_attention_fp32(q, k, v, None if bias is None else bias[:, None, None, :])[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])


# PyTorch custom ops rather than an autograd.Function: a compiled graph (train.compile) cannot see inside them, so
# it saves exactly what `_save` keeps (q, k, v, out in low precision), not the fp32 copies made inside the forward.
# Inductor's on-disk graph cache does not key on a custom op's fake kernel: if the output shapes or strides change,
# rename the op, or a warm cache fails at run time ("assert_size_stride … incorrect fake kernel").
@torch.library.custom_op("t2i::cpu_attention_fp32", mutates_args=())
def _cpu_attention_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-precision q, k, v (B, H, L, d) attended in fp32 by PyTorch's CPU flash kernel, outside autocast →
    (out (B, H, Lq, d) in q's dtype, fp32 log-sum-exp (B, H, Lq) contiguous). ``bias``: (B, 1, 1, Lk) additive
    fp32 mask, or None. ``out`` is laid out (B, Lq, H, d) in memory, as the block's output projection reads it
    (a view there, not a copy)."""
    with torch.autocast("cpu", enabled=False):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.float(), k.float(), v.float(), attn_mask=bias)
    return _heads_inner(out, q.dtype), lse.contiguous()


def _heads_inner(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (B, H, L, d) cast to ``dtype`` in one copy, laid out (B, L, H, d) in memory: the layout of the (B, L, C)
    projections the heads are views of, so autograd and the projections need no transposing copies."""
    return x.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format).transpose(1, 2)


def _empty_heads_inner(like: torch.Tensor) -> torch.Tensor:
    b, h, length, d = like.shape
    return like.new_empty(b, length, h, d).transpose(1, 2)


@_cpu_attention_fp32.register_fake
def _(q, k, v, bias):
    return _empty_heads_inner(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("t2i::cpu_attention_fp32_backward", mutates_args=())
def _cpu_attention_fp32_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor,
                                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in q's dtype, laid out (B, L, H, d) like ``out``. The backward reads the output rounded to
    bf16/fp16, as GPU flash-attention kernels do."""
    with torch.autocast("cpu", enabled=False):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.0, False, attn_mask=bias)
    return tuple(_heads_inner(g, q.dtype) for g in (dq, dk, dv))


@_cpu_attention_fp32_backward.register_fake
def _(grad, q, k, v, out, lse, bias):
    return _empty_heads_inner(q), _empty_heads_inner(k), _empty_heads_inner(v)


def _save(ctx, inputs, output):  # low-precision q, k, v and output plus the fp32 log-sum-exp: no fp32 copies kept
    q, k, v, bias = inputs
    ctx.save_for_backward(q, k, v, *output, bias)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, bias = ctx.saved_tensors
    return (*_cpu_attention_fp32_backward(grad_out, q, k, v, out, lse, bias), None)


_cpu_attention_fp32.register_autograd(_backward, setup_context=_save)
