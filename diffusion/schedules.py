"""Noise schedules β_1..β_T for the forward process.

Ho et al. 2020; Sohl-Dickstein et al. 2015: q(z_n | z_{n-1}) = N(√(1−β_n) z_{n-1}, β_n I) with 0 < β_1 < … < β_N < 1, and
q(z_n | x_0) = N(√ᾱ_n x_0, (1−ᾱ_n) I) with ᾱ_n = ∏_{i≤n} (1−β_i).

All schedules are returned as float64 tensors of shape (T,); index i holds β_{i+1} (0-based timesteps,
as in improved-diffusion and diffusers: t = 0 is the first, least noisy step).
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine", "scaled_linear")


def _check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps (T) must be an integer >= 1, got {num_steps!r}")


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule (Ho et al. 2020): β from 1e-4 to 0.02 at T = 1000.

    For other T the end points are scaled by 1000/T (improved-diffusion), so that the total noise
    Σβ, and hence ᾱ_T, stays about the same whatever the number of steps.
    """
    _check_num_steps(num_steps)
    if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
        raise ValueError(f"beta_start and beta_end must lie in (0, 1), got {beta_start}, {beta_end}")
    scale = 1000.0 / num_steps
    start, end = scale * beta_start, scale * beta_end
    if end >= 1.0:
        raise ValueError(
            f"num_steps={num_steps} is too small for the linear schedule: the scaled beta_end={end:.3f} "
            "must stay below 1; use at least 21 steps or the cosine schedule"
        )
    if num_steps == 1:
        return torch.tensor([end], dtype=torch.float64)
    return torch.linspace(start, end, num_steps, dtype=torch.float64)


def scaled_linear_betas(num_steps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Latent diffusion's schedule (Rombach et al. 2022; Stable Diffusion 1.x–2.x and SDXL): √β linear from √0.00085
    to √0.012 over T = 1000 steps. Gentler than DDPM's at the noisy end (ᾱ_T ≈ 0.0047 vs 4e-5): the VAE's latents
    are already compressed, and SD's published weights were trained on it."""
    _check_num_steps(num_steps)
    if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
        raise ValueError(f"beta_start and beta_end must lie in (0, 1), got {beta_start}, {beta_end}")
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2).

    β_t = 1 − ᾱ(t)/ᾱ(t−1), clipped at ``max_beta`` to avoid the singularity at t = T.
    """
    _check_num_steps(num_steps)
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must lie in (0, 1), got {max_beta}")

    def f(t: float) -> float:
        return math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1.0 - f(i + 1) / f(i), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale a schedule so that ᾱ_T = 0 (zero terminal SNR; Lin et al. 2024, Algorithm 1).

    √ᾱ is shifted so its last value is 0 and scaled so its first value is unchanged. The last β
    becomes exactly 1: the final step is pure noise, which ε-prediction cannot invert (use v).
    """
    sqrt_ab = torch.cumprod(1.0 - betas.double(), 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_cumprod = sqrt_ab**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def make_betas(name: str, num_steps: int, zero_terminal_snr: bool = False) -> torch.Tensor:
    """The named schedule with T = ``num_steps``; optionally rescaled to zero terminal SNR."""
    if name == "linear":
        betas = linear_betas(num_steps)
    elif name == "cosine":
        betas = cosine_betas(num_steps)
    elif name == "scaled_linear":
        betas = scaled_linear_betas(num_steps)
    else:
        raise ValueError(f"unknown schedule {name!r}; allowed values: {', '.join(SCHEDULES)}")
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas
