"""The diffusion process behind a narrow interface: schedules, the Gaussian forward process and its posterior,
the training loss, samplers and classifier-free guidance (the math of the papers cited where it is used)."""

from .gaussian import DiffusionConfig, GaussianDiffusion
from .guidance import Denoiser, Guidance
from .samplers import DEFAULT_STEPS, SAMPLERS, get_sampler, sample
from .schedules import cosine_betas, linear_betas, make_betas, rescale_zero_terminal_snr

__all__ = [
    "DiffusionConfig", "GaussianDiffusion", "Guidance", "Denoiser", "SAMPLERS", "DEFAULT_STEPS", "get_sampler",
    "sample", "linear_betas", "cosine_betas", "make_betas", "rescale_zero_terminal_snr",
]
