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
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
