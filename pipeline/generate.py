"""Captions → images with classifier-free guidance: the one generation routine behind the training job's sample
grids, the sampling script and the evaluation job.

Each image's starting noise and sampler noise come from its own ``torch.Generator`` seeded by ``image_seed``,
so an image does not depend on the batch it was generated in, nor on how many processes shared the work (on a GPU,
up to the rounding of kernels that differ by batch size: tests/test_gpu.py).
"""

from __future__ import annotations

import torch

from diffusion import GaussianDiffusion, Guidance, sample
from data.loader import hash_seed


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index`` in a run started with ``seed``."""
    return hash_seed(seed, prompt_index, image_index)


@torch.no_grad()
def generate(model, encoder, diffusion: GaussianDiffusion, prompts: list[str], seeds: list[int], resolution: int,
             guidance: float = 3.0, negative: list[str] | None = None, sampler: str = "ddim",
             steps: int | None = None, channels: int = 3, device=None, dtype=torch.float32,
             clip_x0: float | None = 1.0, progress_callback=None, vae=None, spacing: str | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """One batch: images (B, 3, R, R) in [-1, 1] for ``prompts[i]`` from ``seeds[i]``.

    With a ``vae`` the sampler runs on (B, ``channels``, R/f, R/f) latents, unclipped (latents are not bounded by
    ±1), and the VAE decodes them to R px.
    ``negative[i]`` (default "") is what the unconditional branch sees. Guidance 1 runs the conditional branch
    only; otherwise both branches run in one batched forward (diffusion.guidance). ``spacing``: the timestep
    spacing (default: the sampler's). ``noise``: the initial x_T itself, instead of drawing it from the seeds."""
    device = device or next(model.parameters()).device
    negative = negative or [""] * len(prompts)
    gens = [torch.Generator(device).manual_seed(s) for s in seeds]
    size = resolution // vae.factor if vae is not None else resolution
    if noise is None:
        noise = torch.stack([torch.randn(channels, size, size, generator=g, device=device) for g in gens])
    cond = cond_to(encoder.encode(list(prompts)), device, dtype)
    uncond = cond_to(encoder.encode(list(negative)), device, dtype) if guidance != 1 else None

    def net(x, t, c):
        return model(x.to(dtype), t, c).float()

    images = sample(sampler, net, noise, diffusion, steps=steps, cond=cond,
                    guidance=Guidance(scale=guidance, uncond=uncond, clip_x0=None if vae is not None else clip_x0),
                    generator=gens, callback=progress_callback, spacing=spacing)
    if vae is not None:
        images = vae.decode(images)
    return images.clamp(-1, 1)


def cond_to(cond: dict, device, dtype=torch.float32) -> dict:
    """A text encoder's output dict on ``device``; floating tensors in ``dtype``, the mask as it is."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in cond.items()}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8 (rounded, as PIL would store them)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
