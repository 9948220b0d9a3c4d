"""Bits per dimension of held-out images under a trained model: the probability-flow ODE and the ELBO
(diffusion/likelihood.py), applied to 8-bit images or to a latent model's latents.

Units. Pixels are stored as k ∈ {0, …, 255} and modelled as x = k/127.5 − 1, so neighbouring values lie 2/255 apart.
- ODE: the flow has a density, so x is dequantised uniformly inside its bin, x + (u − ½)·2/255 with u ~ U[0, 1)
  (Theis et al. 2016; Ho et al. 2019), and by Jensen −log₂ P(k) ≤ E_u[−log₂ p(x + …)] + D log₂ 127.5: bits/dim =
  −log p(x)/(D ln 2) + log₂ 127.5, an upper bound on the discrete negative log-likelihood.
- ELBO: the discretised decoder gives P(k) directly: bits/dim = ELBO/(D ln 2), a bound on the same quantity.
- Latent models: the density of the VAE's scaled latents (continuous, nothing to dequantise; a continuous decoder
  for the ELBO's L_0): bits per latent dimension, not comparable with pixel-space figures.

Every image draws its randomness (dequantisation, probes, ELBO timesteps and noise) from generators seeded by
(seed, image index), and batches are fixed runs of consecutive images, dealt to processes round-robin: the same
figures come out for any number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from diffusion.likelihood import elbo, ode_log_likelihood

LOG2_127_5 = math.log2(127.5)  # the Jacobian of k ↦ k/127.5 − 1, per dimension, in bits
METHODS = ("ode", "elbo", "both")
CONVENTIONS = ("ho2020", "improved_diffusion")
# torchdiffeq's adaptive-step methods (its documented `method` names; tests/test_likelihood.py runs each)
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


@dataclass
class LikelihoodOptions:
    method: str = "both"  # ode | elbo | both
    probes: int = 1  # Hutchinson probes per image (0: the exact trace, small images only)
    probe: str = "rademacher"
    rtol: float = 1e-5
    atol: float = 1e-5
    solver: str = "dopri5"
    elbo_timesteps: int | None = None  # None: all T − 1 KL terms; K: one per stratum of K
    elbo_variance: str = "posterior"
    # ho2020: the decoder's σ² = β₁, x̂₀ as predicted (Ho et al. 2020, §3.3); improved_diffusion: σ² = β̃₂ (the clipped
    # log-variance) and x̂₀ clipped to [−1, 1] in every term: the convention of DDPM's and improved-diffusion's
    # published CIFAR-10 figures (pixels only)
    elbo_convention: str = "ho2020"
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; allowed values: {', '.join(METHODS)}")
        if self.probes < 0:
            raise ValueError(f"probes must be >= 0 (0 = exact trace), got {self.probes}")
        if self.elbo_convention not in CONVENTIONS:
            raise ValueError(f"unknown ELBO convention {self.elbo_convention!r}; allowed: {', '.join(CONVENTIONS)}")
        if self.elbo_timesteps is not None and self.elbo_timesteps < 1:
            raise ValueError(f"elbo_timesteps must be >= 1 (or None for all), got {self.elbo_timesteps}")
        if self.solver not in ADAPTIVE_SOLVERS:  # a fixed-step solver would ignore rtol/atol
            raise ValueError(f"unknown or fixed-step solver {self.solver!r}; adaptive solvers: "
                             f"{', '.join(ADAPTIVE_SOLVERS)}")


def generators(seed: int, indices: list[int], stream: int) -> list[torch.Generator]:
    """One generator per image, from (seed, image index, stream): stream 1 dequantises, 2 draws probes, 3 the ELBO."""
    from data.loader import hash_seed

    return [torch.Generator().manual_seed(hash_seed(seed, i, stream)) for i in indices]


def dequantize(k: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """uint8 images (B, C, H, W) → float32 in [−1 − 1/255, 1 + 1/255): uniform noise over each value's bin. The
    noise is drawn by the images' (CPU) generators and moved to the images' device before it meets them."""
    u = torch.stack([torch.rand(k.shape[1:], generator=g, dtype=torch.float64) for g in gens]).to(k.device)
    return ((k.double() + u - 0.5) / 127.5 - 1).float()


def batch_bits(model, diffusion, images_uint8: torch.Tensor, indices: list[int], cond, opts: LikelihoodOptions,
               vae=None) -> list[dict]:
    """Per-image bits/dim of one batch: [{"index", "bits_per_dim"?, "elbo_bits_per_dim"?, "nfe"?}, …].

    images_uint8: (B, 3, R, R) uint8 on the model's device; ``model(x, t, cond)`` the network in float32."""
    rows = [{"index": i} for i in indices]
    grid = images_uint8.float() / 127.5 - 1
    if vae is not None:  # the latents' density: the posterior mean (deterministic), as training used them
        x_ode = x_elbo = vae.encode(grid).float()
        offset, decoder = 0.0, "continuous"
    else:
        x_ode, x_elbo = dequantize(images_uint8, generators(opts.seed, indices, 1)), grid
        offset, decoder = LOG2_127_5, "discrete"
    dims = x_elbo[0].numel()
    if opts.method in ("ode", "both"):
        out = ode_log_likelihood(model, diffusion, x_ode, cond, trace="exact" if opts.probes == 0 else "hutchinson",
                                 probes=max(opts.probes, 1), probe=opts.probe, rtol=opts.rtol, atol=opts.atol,
                                 method=opts.solver, generators=generators(opts.seed, indices, 2))
        for row, lp in zip(rows, out["log_px"].tolist()):
            row.update(bits_per_dim=-lp / (dims * math.log(2)) + offset, nfe=out["nfe"])
    if opts.method in ("elbo", "both"):
        if vae is not None and opts.elbo_convention == "improved_diffusion":
            raise ValueError("the improved_diffusion ELBO convention clips x̂₀ to the pixel range: it has no meaning "
                             "for a latent model (use ho2020)")
        clipped = opts.elbo_convention == "improved_diffusion"
        out = elbo(model, diffusion, x_elbo, cond, timesteps=opts.elbo_timesteps, decoder=decoder,
                   variance=opts.elbo_variance, generators=generators(opts.seed, indices, 3),
                   decoder_variance="posterior" if clipped else "beta", clip_x0=clipped)
        for row, nats in zip(rows, out["total"].tolist()):
            row["elbo_bits_per_dim"] = nats / (dims * math.log(2))
    return rows


def summarize(rows: list[dict]) -> dict:
    """Means and standard errors (over images) of the per-image figures of :func:`batch_bits`."""
    out = {"num_images": len(rows)}
    for key in ("bits_per_dim", "elbo_bits_per_dim"):
        values = np.array([r[key] for r in rows if key in r], dtype=np.float64)
        if len(values):
            out[key] = float(values.mean())
            out[f"{key}_stderr"] = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    nfe = [r["nfe"] for r in rows if "nfe" in r]
    if nfe:
        out["ode_evaluations_mean"] = float(np.mean(nfe))
    return out


def dataset_bits(model, encoder, diffusion, vae, samples: list[tuple[np.ndarray, str]], opts: LikelihoodOptions,
                 batch_size: int, rank: int = 0, world: int = 1, device="cpu", gather=None, progress: bool = True) -> dict:
    """Bits/dim of ``samples`` ((uint8 image (R, R, 3), caption) pairs): fixed batches of consecutive images, this
    process taking every ``world``-th from ``rank`` on, per-image rows joined by ``gather`` (a list all-gather, given
    by the job when it runs on several processes), then means and standard errors over images (:func:`summarize`).
    Returns {…summary, "images": per-image rows}."""
    from tqdm import tqdm

    def net(x, t, c):
        return model(x, t, c).float()

    starts = list(range(0, len(samples), batch_size))
    rows = []
    for start in tqdm(starts[rank::world], desc="likelihood", unit="batch", disable=not progress):
        chunk = samples[start:start + batch_size]
        images = torch.from_numpy(np.stack([im for im, _ in chunk])).permute(0, 3, 1, 2).to(device)
        cond = {k: v.to(device, torch.float32) if v.is_floating_point() else v.to(device)
                for k, v in encoder.encode([c for _, c in chunk]).items()}
        rows += batch_bits(net, diffusion, images, list(range(start, start + len(chunk))), cond, opts, vae)
    if gather is not None:
        rows = gather(rows)
    rows = sorted(rows, key=lambda r: r["index"])
    return {**summarize(rows), "images": rows}
