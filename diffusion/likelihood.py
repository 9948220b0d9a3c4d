"""Likelihood of data under a trained diffusion model: the probability-flow ODE and the variational bound.

Two estimators of −log p(x), both in nats per example, for a model of the signature every sampler uses
(``model(x_t, t, cond)`` → raw output in ``diffusion.prediction``'s parameterisation):

- :func:`ode_log_likelihood` — the exact log-density of the continuous normalising flow defined by the
  probability-flow ODE (Song et al. 2021, §4.3 and App. D.2; Chen et al. 2018; the notes "Score-based models:
  continuous-time normalising flows"): log p_0(x(0)) = log p_T(x(T)) + ∫ tr(∂f/∂x) dt, with the trace exact (small D)
  or estimated by Hutchinson's estimator E_v[vᵀ (∂f/∂x) v] (Hutchinson 1989; Grathwohl et al. 2019).
- :func:`elbo` — the variational bound of Ho et al. 2020 (eq. 5; the notes' ELBO): L_T + Σ_t L_{t−1} + L_0, with a
  discretised Gaussian decoder for L_0 (Ho et al. 2020, eq. 13) or a continuous one (latents), and the sum over
  timesteps computed exactly or estimated from a stratified subset of timesteps weighted by stratum size.

The ODE runs on a continuous-time version of the discrete schedule: log ᾱ interpolated linearly between the steps,
ᾱ(−1) = 1 (:meth:`GaussianDiffusion.alpha_bar_at`), the network called at real-valued timesteps. It is integrated in
the variance-exploding coordinates of the VP process, x̄ = x/√ᾱ and σ = √((1−ᾱ)/ᾱ) (Song et al. 2021, DDIM;
Karras et al. 2022, eq. 4), where the probability-flow ODE reads dx̄/dσ = ε̂(√ᾱ x̄, t(σ)): no stiff linear drift,
and the exact ε-predictor of Gaussian data makes it smooth in σ whatever the schedule.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .gaussian import GaussianDiffusion, ModelFn

TRACES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
DECODERS = ("discrete", "continuous")
VARIANCES = ("posterior", "beta")
Generators = Sequence[torch.Generator] | None


def _rows(shape, generators: Generators, fn, device, dtype) -> torch.Tensor:
    """A (B, ...) tensor whose row i is drawn by ``fn(shape[1:], generator_i)``: an example's randomness depends on
    its own generator only, not on the batch it was put in."""
    if generators is None:
        return fn(tuple(shape), None).to(device, dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
    return torch.stack([fn(tuple(shape[1:]), g) for g in generators]).to(device, dtype)


def _randn(shape, generators, device, dtype):
    return _rows(shape, generators, lambda s, g: torch.randn(s, generator=g, dtype=torch.float64), device, dtype)


def _probe(shape, generators, kind: str, device, dtype):
    if kind == "gaussian":
        return _randn(shape, generators, device, dtype)
    bits = _rows(shape, generators, lambda s, g: torch.randint(0, 2, s, generator=g), device, torch.float64)
    return (2 * bits - 1).to(dtype)  # Rademacher: ±1 with probability ½


def eps_from_output(diffusion: GaussianDiffusion, raw: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """ε̂ from a raw network output at noise level σ (ᾱ = 1/(1+σ²)): the conversions of
    :meth:`GaussianDiffusion.split_output`, with coefficients from σ in float64 (1 − ᾱ = σ²/(1+σ²) stays exact where
    float32 would round it to 0)."""
    if diffusion.prediction == "epsilon":
        return raw
    c_x, c_out = sigma / math.sqrt(1 + sigma**2), 1 / math.sqrt(1 + sigma**2)  # √(1−ᾱ), √ᾱ
    if diffusion.prediction == "v":
        return c_x * x + c_out * raw
    return (x - c_out * raw) / c_x


# An x0-predictor's ε̂ = (x̄ − x̂_0)/σ is 0/0 at σ = 0: its ODE starts at σ ≥ this instead (a density change of
# O(σ²/s²) for data of scale s).
X0_SIGMA_MIN = 1e-4


@torch.no_grad()
def ode_log_likelihood(model: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, cond: Any = None,
                       t_start: float = 0.0, trace: str = "hutchinson", probes: int = 1, probe: str = "rademacher",
                       rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5",
                       generators: Generators = None) -> dict:
    """log p(x) in nats of the probability-flow ODE's flow, for x (B, ...) placed at time ``t_start``.

    The flow maps x at t_start (default 0, the first noise level the network was trained at, as Song et al. 2021
    start at t = 10⁻⁵; −1 is ᾱ = 1, the data themselves) to t = T−1, where the prior is the VP process's N(0, I).
    In (x̄, σ) coordinates: log p_x(x) = log N(x̄_T; 0, (1+σ_T²) I) + ∫_{σ_0}^{σ_T} tr(∂ε̂/∂x̄) dσ − (D/2) log ᾱ_0,
    the last term the Jacobian of x̄ = x/√ᾱ_0. The trace is ``exact`` (D vector–Jacobian products per evaluation:
    small D only) or ``hutchinson`` with ``probes`` fixed Rademacher or Gaussian vectors per example, one forward and
    K vector–Jacobian products per evaluation. ``generators`` (one per example) draw the probes.
    The adaptive solver is torchdiffeq's ``method`` with tolerances rtol/atol on the whole batch's state.

    Returns {"log_px": (B,) float64 nats, "nfe": network evaluations (each with its backward passes)}.
    """
    from torchdiffeq import odeint

    if trace not in TRACES:
        raise ValueError(f"unknown trace {trace!r}; allowed values: {', '.join(TRACES)}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; allowed values: {', '.join(PROBES)}")
    if trace == "hutchinson" and probes < 1:
        raise ValueError(f"Hutchinson's estimator needs probes >= 1, got {probes}")
    if not -1 <= t_start < diffusion.num_steps - 1:
        raise ValueError(f"t_start must lie in [-1, T-1 = {diffusion.num_steps - 1}), got {t_start}")
    b, d = x.shape[0], x[0].numel()
    dev, dtype = x.device, x.dtype

    def sigma_of(t: float) -> float:
        ab = float(diffusion.alpha_bar_at(torch.tensor([t], dtype=torch.float64))[0])
        return math.sqrt((1 - ab) / ab), ab

    sigma0, ab0 = sigma_of(float(t_start))
    if diffusion.prediction == "x0" and sigma0 < X0_SIGMA_MIN:
        sigma0, ab0 = X0_SIGMA_MIN, 1 / (1 + X0_SIGMA_MIN**2)
    sigma1, _ = sigma_of(float(diffusion.num_steps - 1))
    vs = None
    if trace == "hutchinson":  # (K, B, ...): the same probes for the whole solve (Grathwohl et al. 2019)
        vs = torch.stack([_probe(x.shape, generators, probe, dev, dtype) for _ in range(probes)])
    nfe = 0

    def drift(sigma: torch.Tensor, state):
        nonlocal nfe
        nfe += 1
        xbar, sig = state[0], float(sigma)
        ab = torch.tensor([1.0 / (1.0 + sig**2)], dtype=torch.float64)
        t = diffusion.time_at(ab).to(dev).expand(b)
        with torch.enable_grad():
            xbar = xbar.detach().requires_grad_(True)
            xt = xbar / math.sqrt(1 + sig**2)
            eps = eps_from_output(diffusion, model(xt, t, cond), xt, sig)
            tr = torch.zeros(b, device=dev, dtype=torch.float64)
            if trace == "exact":
                flat = eps.reshape(b, d)
                for i in range(d):  # row i of every example's Jacobian (examples are independent)
                    (g,) = torch.autograd.grad(flat[:, i].sum(), xbar, retain_graph=i < d - 1)
                    tr += g.reshape(b, d)[:, i].double()
            else:
                for k, v in enumerate(vs):
                    (g,) = torch.autograd.grad(eps, xbar, v, retain_graph=k < len(vs) - 1)
                    tr += (g * v).reshape(b, d).double().sum(1)
                tr /= len(vs)
        return eps.detach(), tr.to(dtype)

    xbar0 = x / math.sqrt(ab0)
    grid = torch.tensor([sigma0, sigma1], dtype=dtype, device=dev)
    xs, integrals = odeint(drift, (xbar0, torch.zeros(b, dtype=dtype, device=dev)), grid, rtol=rtol, atol=atol,
                           method=method)
    xbar1, integral = xs[-1].double(), integrals[-1].double()
    var1 = 1.0 + sigma1**2
    log_prior = -0.5 * d * math.log(2 * math.pi * var1) - 0.5 * xbar1.reshape(b, d).pow(2).sum(1) / var1
    return {"log_px": log_prior + integral - 0.5 * d * math.log(ab0), "nfe": nfe}


def strata(num_steps: int, k: int | None) -> list[tuple[int, int]]:
    """[lo, hi) ranges splitting the timesteps 1 … T−1 (the KL terms L_{t−1}) into min(k, T−1) strata of near-equal
    size; None: every timestep its own stratum (the exact sum)."""
    n = num_steps - 1
    if n <= 0:
        return []
    k = n if k is None else k
    if k < 1:
        raise ValueError(f"the ELBO needs at least 1 timestep, got {k}")
    k = min(k, n)
    edges = [1 + (n * i) // k for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _log_bin_probability(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, half_width: float) -> torch.Tensor:
    """log P(bin of x) under N(mean, std²), bins [x − h, x + h] with the outermost open to ±∞ (Ho et al. 2020, eq. 13):
    computed from log Φ in the tail where the bin lies, so a bin many σ away keeps its (tiny) log-probability."""
    lo = (x - half_width - mean) / std
    hi = (x + half_width - mean) / std
    lo = torch.where(x < -1 + 1e-6, torch.full_like(lo, -math.inf), lo)
    hi = torch.where(x > 1 - 1e-6, torch.full_like(hi, math.inf), hi)
    # P = Φ(hi) − Φ(lo) = Φ(−lo) − Φ(−hi); take the form whose terms are both small (the tail the bin sits in)
    flip = lo > 0
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)  # P = Φ(b) − Φ(a), a < b, b ≤ |…| small side
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log1p(-torch.exp((log_a - log_b).clamp(max=0.0)))


@torch.no_grad()
def elbo(model: ModelFn, diffusion: GaussianDiffusion, x0: torch.Tensor, cond: Any = None,
         timesteps: int | None = None, decoder: str = "discrete", variance: str = "posterior",
         bin_width: float = 2.0 / 255.0, generators: Generators = None, decoder_variance: str = "beta",
         clip_x0: bool = False) -> dict:
    """The negative ELBO −log p(x_0) ≤ L_T + Σ_{t≥1} L_{t−1} + L_0, in nats per example (Ho et al. 2020, eq. 5).

    Steps are 0-based as everywhere here (index t is the papers' t+1):
    - prior  L_T = KL(q(x_{T−1} | x_0) ‖ N(0, I)), in closed form;
    - L_{t−1} = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) for t = 1 … T−1 at x_t ~ q(x_t | x_0), with
      p_θ = N(μ̃(x_t, x̂_0), σ_t²), σ_t² = β̃_t (``posterior``, the sampler's) or β_t (``beta``). The sum is exact with
      ``timesteps=None``; otherwise one t per stratum of :func:`strata`, drawn uniformly, weighted by the stratum's
      size: unbiased, its variance in the reported standard error;
    - L_0 = −log p_θ(x_0 | x_{t=0}), p_θ = N(x̂_0, σ²) with σ² = β_0 (``decoder_variance="beta"``: Ho et al. 2020's
      σ_1² = β_1) or β̃ of the next step (``"posterior"``: improved-diffusion's clipped log-variance, what its and
      DDPM's published bits/dim use); ``discrete``: the probability of x_0's bin of width ``bin_width`` (8-bit pixels
      in [−1, 1]: 2/255, edge bins open), ``continuous``: the density (latents, or data that are not quantised).
    ``clip_x0``: x̂_0 clipped to [−1, 1] in every term (improved-diffusion's ``clip_denoised``, for pixels).
    ``generators`` (one per example) draw the timesteps and the noise.

    Returns float64 (B,) tensors in nats: "total", "prior", "diffusion", "decoder".
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; allowed values: {', '.join(DECODERS)}")
    if variance not in VARIANCES or decoder_variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r} / {decoder_variance!r}; allowed: {', '.join(VARIANCES)}")
    b, dev = x0.shape[0], x0.device
    x = x0.double()
    dims = tuple(range(1, x.ndim))

    def run(t: torch.Tensor):
        """(x_t, x̂_0) at timesteps t (B,) for fresh noise, the network in the data's dtype."""
        noise = _randn(x.shape, generators, dev, torch.float64)
        xt = diffusion.q_sample(x, t, noise)
        raw = model(xt.to(x0.dtype), t, cond).double()
        x0_hat = diffusion.split_output(raw, xt, t)[1]
        return xt, x0_hat.clamp(-1, 1) if clip_x0 else x0_hat

    ab_last = float(diffusion.alphas_cumprod[-1])
    prior = 0.5 * (ab_last * x.pow(2) - ab_last - math.log1p(-ab_last)).sum(dims)

    kl_sum = torch.zeros(b, dtype=torch.float64, device=dev)
    for lo, hi in strata(diffusion.num_steps, timesteps):
        u = _rows((b,), generators, lambda s, g: torch.rand(s, generator=g, dtype=torch.float64), dev, torch.float64)
        t = (lo + (u * (hi - lo)).floor().long()).clamp(max=hi - 1)
        xt, x0_hat = run(t)
        mean, post_var = diffusion.q_posterior(x, xt, t)
        mean_hat, _ = diffusion.q_posterior(x0_hat, xt, t)
        var = post_var if variance == "posterior" else diffusion.betas.to(dev)[t].reshape(-1, *[1] * (x.ndim - 1))
        kl = 0.5 * (torch.log(var / post_var) + post_var / var - 1 + (mean - mean_hat).pow(2) / var)
        kl_sum += (hi - lo) * kl.sum(dims)

    _, x0_hat = run(torch.zeros(b, dtype=torch.long, device=dev))
    var0 = diffusion.betas[0] if decoder_variance == "beta" or diffusion.num_steps < 2 else \
        diffusion.posterior_variance[1]
    std = torch.tensor(float(var0), dtype=torch.float64, device=dev).sqrt()
    if decoder == "discrete":
        dec = -_log_bin_probability(x, x0_hat, std, bin_width / 2).sum(dims)
    else:
        dec = (0.5 * ((x - x0_hat) / std).pow(2) + torch.log(std) + 0.5 * math.log(2 * math.pi)).sum(dims)
    return {"total": prior + kl_sum + dec, "prior": prior, "diffusion": kl_sum, "decoder": dec}
