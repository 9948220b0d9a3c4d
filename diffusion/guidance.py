"""Classifier-free guidance, as a wrapper around any model (Ho & Salimans 2022).

ε̂ = ε_u + w (ε_c − ε_u): w = 0 is the unconditional model, w = 1 the conditional one, w > 1 pushes
samples toward the condition. The unconditional branch sees ``Guidance.uncond``: the empty caption, or a
negative prompt. Both branches run in one batched forward. Because the combination is affine with weights
summing to one, it gives the same result whether the network predicts ε, v or x_0.

Guidance in a limited interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample
and Distribution Quality in Diffusion Models"): w applies only where the noise level σ = √((1 − ᾱ)/ᾱ) (EDM's σ,
1/√SNR) lies in (σ_lo, σ_hi]; elsewhere the conditional model runs alone (w = 1), which also skips the unconditional
forward there. At high noise, guidance pushes every sample toward the same few modes (colours overshoot, variety
drops); at low noise it does little but sharpen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .gaussian import GaussianDiffusion, ModelFn


@dataclass
class Guidance:
    """Guidance and x̂_0 post-processing for a sampler run.

    scale: w ≥ 0 (1 = no guidance). uncond: conditioning of the unconditional branch (batch 1 or B).
    rescale: φ ∈ [0, 1] of guidance rescale (Lin et al. 2024, eq. 15–16), applied to the network's output.
    clip_x0: clamp x̂_0 to [−c, c] (pixel diffusion: 1.0). dynamic_threshold: percentile p ∈ (0, 1) of Imagen's
    dynamic thresholding (Saharia et al. 2022): s = max(1, quantile_p |x̂_0|); x̂_0 ← clamp(x̂_0, −s, s) / s.
    x0_range: (low, high), each (C,): x̂_0 clamped per channel to the data's range (latent diffusion's analogue of
    pixel clipping: the range of the training latents, as recorded by the latent precompute).
    interval: (σ_lo, σ_hi): guide only where σ_lo < σ ≤ σ_hi (EDM's noise level, see the module's docstring); None =
    at every step. (0.28, 2.9] is Kynkäänniemi et al.'s EDM2-S window for FID, in units of latents with std 0.5:
    on latents of std 1 the same σ numbers are another SNR window; there is no universal one.
    """

    scale: float = 1.0
    uncond: Any = None
    rescale: float = 0.0
    clip_x0: float | None = None
    dynamic_threshold: float | None = None
    x0_range: tuple[torch.Tensor, torch.Tensor] | None = None
    interval: tuple[float, float] | None = None

    def __post_init__(self):
        if not self.scale >= 0:
            raise ValueError(f"guidance scale must be >= 0 (1 = no guidance), got {self.scale}")
        if self.scale != 1 and self.uncond is None:
            raise ValueError("guidance scale != 1 needs `uncond`, the unconditional (empty or negative prompt) input")
        if not 0 <= self.rescale <= 1:
            raise ValueError(f"guidance rescale must lie in [0, 1], got {self.rescale}")
        if self.clip_x0 is not None and not self.clip_x0 > 0:
            raise ValueError(f"clip_x0 must be > 0 or None, got {self.clip_x0}")
        if self.dynamic_threshold is not None and not 0 < self.dynamic_threshold < 1:
            raise ValueError(f"dynamic_threshold is a percentile in (0, 1), got {self.dynamic_threshold}")
        if self.interval is not None:
            if len(self.interval) != 2 or not 0 <= self.interval[0] < self.interval[1]:
                raise ValueError(f"guidance interval is (σ_lo, σ_hi) with 0 ≤ σ_lo < σ_hi, got {self.interval}")
            self.interval = (float(self.interval[0]), float(self.interval[1]))


def _expand_batch(c: Any, batch: int) -> Any:
    if c is None:
        return None
    if torch.is_tensor(c):
        return c.expand(batch, *c.shape[1:]) if c.shape[0] == 1 and batch != 1 else c
    if isinstance(c, dict):
        return {k: _expand_batch(v, batch) for k, v in c.items()}
    if isinstance(c, (list, tuple)):
        return type(c)(_expand_batch(v, batch) for v in c)
    return c


def concat_cond(a: Any, b: Any, batch: int) -> Any:
    """Concatenate two conditionings (tensors, or dicts/tuples of tensors) along the batch axis."""
    a, b = _expand_batch(a, batch), _expand_batch(b, batch)
    if a is None and b is None:
        return None
    if torch.is_tensor(a) and torch.is_tensor(b):
        return torch.cat([a, b])
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            raise ValueError(f"cond and uncond have different keys: {sorted(a)} vs {sorted(b)}")
        return {k: concat_cond(a[k], b[k], batch) for k in a}
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return type(a)(concat_cond(x, y, batch) for x, y in zip(a, b))
    raise TypeError(f"cannot batch conditionings of types {type(a).__name__} and {type(b).__name__}")


def dynamic_threshold(x0: torch.Tensor, percentile: float) -> torch.Tensor:
    """Imagen's dynamic thresholding of x̂_0 (B, ...), per sample."""
    s = torch.quantile(x0.flatten(1).abs().float(), percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


class Denoiser:
    """Turns (network, diffusion, conditioning, guidance) into the (ε̂, x̂_0) pair every sampler consumes."""

    def __init__(self, model: ModelFn, diffusion: GaussianDiffusion, cond: Any = None, guidance: Guidance | None = None):
        self.model, self.diffusion, self.cond = model, diffusion, cond
        self.guidance = guidance or Guidance()

    def _inside(self, t: torch.Tensor) -> torch.Tensor | None:
        """(B,) bool: whether each t's noise level lies in the guidance interval; None without an interval."""
        g = self.guidance
        if g.interval is None:
            return None
        ab = self.diffusion.alpha_bar_at(t)  # float64 on t's device; real-valued t allowed; ᾱ floored: σ finite
        sigma = ((1 - ab) / ab).sqrt()
        return (sigma > g.interval[0]) & (sigma <= g.interval[1])

    def guided(self, t: int) -> bool:
        """Whether a step from timestep t is guided (w ≠ 1 there). A multistep sampler restarts its history where
        this changes: the guided and the conditional model are two different ODEs."""
        if self.guidance.scale == 1:
            return False
        inside = self._inside(torch.tensor([t]))
        return inside is None or bool(inside[0])

    def raw(self, x: torch.Tensor, t: torch.Tensor, guide_t: torch.Tensor | None = None) -> torch.Tensor:
        """The guided network output at (x (B, ...), t (B,)), in the network's parameterisation. ``guide_t``: the
        timesteps that decide the guidance interval (default t; a 2nd-order sampler's corrector passes its step's
        start, so w stays constant within a step, as Kynkäänniemi et al. 2024 ask)."""
        g = self.guidance
        if g.scale == 1:
            return self.model(x, t, self.cond)
        if g.scale == 0 and g.interval is None:
            return self.model(x, t, _expand_batch(g.uncond, x.shape[0]))
        inside = self._inside(t if guide_t is None else guide_t)
        if inside is not None and not bool(inside.any()):  # every sample outside the interval: conditional alone
            return self.model(x, t, self.cond)
        b = x.shape[0]
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), concat_cond(self.cond, g.uncond, b))
        cond_out, uncond_out = out[:b], out[b:]
        scale: float | torch.Tensor = g.scale
        if inside is not None:  # (B, 1, …): w inside the interval, 1 outside, per sample
            scale = torch.where(inside, g.scale, 1.0).to(out.dtype).reshape((-1,) + (1,) * (out.ndim - 1))
        guided = uncond_out + scale * (cond_out - uncond_out)
        if g.rescale > 0 and g.scale != 0:  # w = 0 is the unconditional model, unrescaled (as without an interval)
            dims = tuple(range(1, x.ndim))
            ratio = cond_out.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
            guided = g.rescale * guided * ratio + (1 - g.rescale) * guided
        return guided

    def __call__(self, x: torch.Tensor, t: torch.Tensor,
                 guide_t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂_0), with x̂_0 clipped / thresholded when asked and ε̂ made consistent with it."""
        eps, x0 = self.diffusion.split_output(self.raw(x, t, guide_t), x, t)
        g = self.guidance
        if g.clip_x0 is not None or g.dynamic_threshold is not None or g.x0_range is not None:
            if g.dynamic_threshold is not None:
                x0 = dynamic_threshold(x0, g.dynamic_threshold)
            if g.clip_x0 is not None:
                x0 = x0.clamp(-g.clip_x0, g.clip_x0)
            if g.x0_range is not None:  # per channel: (C,) bounds broadcast over (B, C, ...)
                shape = (1, -1) + (1,) * (x0.ndim - 2)
                lo, hi = (b.to(x0.device, x0.dtype).reshape(shape) for b in g.x0_range)
                x0 = torch.maximum(torch.minimum(x0, hi), lo)
            eps = self.diffusion.eps_from_x0(x, t, x0)
        return eps, x0
