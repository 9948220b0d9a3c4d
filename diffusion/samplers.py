"""Samplers: functions of one shared signature.

    sampler(model, x, timesteps, diffusion, cond=None, guidance=None, generator=None, callback=None, **options) -> x_0

- model: the network, (x_t (B, ...), t (B,) int64, cond) -> output in ``diffusion.prediction``'s parameterisation.
- x: the initial noise x_T ~ N(0, I), (B, ...).
- timesteps: a strictly descending 1-D sequence of timestep indices in [0, T−1], e.g. ``diffusion.timesteps(50)``
  (timestep respacing: every sampler runs on any subset of the T steps, stepping between consecutive entries
  with the exact multi-step coefficients, ᾱ_{t|s} = ᾱ_t / ᾱ_s).
- cond / guidance: the conditioning and a :class:`~diffusion.guidance.Guidance` (classifier-free guidance).
- generator: a torch.Generator, or a list of one per batch element, so that an image's noise does not depend on
  the other images of its batch.
- callback: called after every step as ``callback(i, t, x, x0)`` (i = step index, x0 = current x̂_0 estimate).

Each sampler ends with x̂_0 from its last network evaluation (as Ho et al. 2020's Algorithm 2, whose last step
adds no noise). Adding a sampler means adding one function and one entry in ``SAMPLERS``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .gaussian import ALPHA_BAR_FLOOR, GaussianDiffusion, ModelFn
from .guidance import Denoiser, Guidance

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
Generator = torch.Generator | Sequence[torch.Generator] | None


def randn_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """N(0, I) noise shaped like x; with a list of generators, row i is drawn from generator i alone."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    rows = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in generator]
    return torch.stack(rows).to(x.device)


def _setup(model, x, timesteps, diffusion: GaussianDiffusion, cond, guidance) -> tuple[Denoiser, list[int]]:
    ts = [int(t) for t in torch.as_tensor(timesteps).flatten().tolist()]
    if not ts:
        raise ValueError("timesteps is empty: a sampler needs at least one step")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {ts[:8]}{'…' if len(ts) > 8 else ''}")
    if ts[0] >= diffusion.num_steps or ts[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, T−1 = {diffusion.num_steps - 1}], got [{ts[-1]}, {ts[0]}]")
    return Denoiser(model, diffusion, cond, guidance), ts


def _steps(ts: list[int]):
    """Pairs (t, s) of consecutive timesteps; the last pair steps to s = −1 (ᾱ = 1, clean data)."""
    return list(zip(ts, ts[1:] + [-1]))


def _tvec(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def _ab(diffusion: GaussianDiffusion, t: int, x: torch.Tensor, floor: bool = False) -> torch.Tensor:
    """ᾱ_t as a (1,)*ndim tensor in x's dtype (float64 lookup, t = −1 → 1); with ``floor``, at least
    ALPHA_BAR_FLOOR (applied in float64: a tiny ᾱ must not become 0 in float32 after the check)."""
    ab = diffusion.alpha_bar(torch.tensor([t], device=x.device), x[:1].double())
    if floor:
        ab = ab.clamp(min=ALPHA_BAR_FLOOR)
    return ab.to(x.dtype)


def _ancestral_step(diffusion, x, x0, t: int, s: int, generator, variance: str = "posterior"):
    """x_s ~ N(μ̃, σ² I), the posterior q(x_s | x_t, x̂_0) between any two timesteps s < t (Ho et al. 2020, eq. 7, with
    α_{t|s} = ᾱ_t/ᾱ_s, β_{t|s} = 1 − α_{t|s}); σ² = β̃_{t|s} (``posterior``) or β_{t|s} (``beta``)."""
    ab_t, ab_s = _ab(diffusion, t, x), _ab(diffusion, s, x)
    alpha, beta = ab_t / ab_s, 1 - ab_t / ab_s
    mean = ab_s.sqrt() * beta / (1 - ab_t) * x0 + alpha.sqrt() * (1 - ab_s) / (1 - ab_t) * x
    var = (1 - ab_s) / (1 - ab_t) * beta if variance == "posterior" else beta
    return mean + var.sqrt() * randn_like(x, generator)


@torch.no_grad()
def ddpm(model: ModelFn, x: torch.Tensor, timesteps, diffusion: GaussianDiffusion, cond: Any = None,
         guidance: Guidance | None = None, generator: Generator = None, callback: Callback | None = None,
         variance: str = "posterior") -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2).

    x_s ~ q(x_s | x_t, x̂_0) = N(μ̃, σ² I) with μ̃ the posterior mean at x̂_0 = x̂_0(x_t, ε̂) and σ² = β̃
    (``variance="posterior"``, the seed's choice) or σ² = β (``variance="beta"``, DDPM's upper bound).
    """
    if variance not in ("posterior", "beta"):
        raise ValueError(f"unknown variance {variance!r}; allowed values: posterior, beta")
    den, ts = _setup(model, x, timesteps, diffusion, cond, guidance)
    for i, (t, s) in enumerate(_steps(ts)):
        eps, x0 = den(x, _tvec(t, x))
        x = x0 if s < 0 else _ancestral_step(diffusion, x, x0, t, s, generator, variance)
        if callback:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def ddim(model: ModelFn, x: torch.Tensor, timesteps, diffusion: GaussianDiffusion, cond: Any = None,
         guidance: Guidance | None = None, generator: Generator = None, callback: Callback | None = None,
         eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12). η = 0 is deterministic: the Euler discretisation of the
    probability-flow ODE in (σ, x/√ᾱ) coordinates; η = 1 has DDPM's posterior variance."""
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    den, ts = _setup(model, x, timesteps, diffusion, cond, guidance)
    for i, (t, s) in enumerate(_steps(ts)):
        eps, x0 = den(x, _tvec(t, x))
        ab_t, ab_s = _ab(diffusion, t, x), _ab(diffusion, s, x)
        sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).sqrt()
        x = ab_s.sqrt() * x0 + (1 - ab_s - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and s >= 0:
            x = x + sigma * randn_like(x, generator)
        if callback:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def euler_maruyama(model: ModelFn, x: torch.Tensor, timesteps, diffusion: GaussianDiffusion, cond: Any = None,
                   guidance: Guidance | None = None, generator: Generator = None,
                   callback: Callback | None = None) -> torch.Tensor:
    """The reverse VP-SDE (Song et al. 2021, eq. 6; Anderson 1982) integrated with Euler–Maruyama.

    Forward VP-SDE: dx = −½β(t) x dt + √β(t) dw. Reverse: dx = [−½β x − β ∇log p_t(x)] dt + √β dw̄.
    In the time τ = ∫β = −log ᾱ the reverse step from t to s is, with h = τ_t − τ_s = log(ᾱ_s/ᾱ_t),
    x_s = x_t + h (½ x_t + s_θ(x_t, t)) + √h z, with s_θ = −ε̂/√(1−ᾱ_t) (Song et al. 2021).
    """
    den, ts = _setup(model, x, timesteps, diffusion, cond, guidance)
    for i, (t, s) in enumerate(_steps(ts)):
        eps, x0 = den(x, _tvec(t, x))
        if s < 0:
            x = x0  # the last step denoises (Tweedie), as Song et al. 2021 do
        else:
            ab_t, ab_s = _ab(diffusion, t, x, floor=True), _ab(diffusion, s, x, floor=True)
            h = torch.log(ab_s / ab_t)
            score = -eps / (1 - ab_t).sqrt()
            x = x + h * (0.5 * x + score) + h.sqrt() * randn_like(x, generator)
        if callback:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def heun(model: ModelFn, x: torch.Tensor, timesteps, diffusion: GaussianDiffusion, cond: Any = None,
         guidance: Guidance | None = None, generator: Generator = None,
         callback: Callback | None = None, sigma_max: float = 80.0) -> torch.Tensor:
    """The probability-flow ODE (Song et al. 2021, eq. 13: dx = [f − ½ g² ∇log p_t] dt) integrated with Heun's method.

    For the VP-SDE, substituting x̃ = x/√ᾱ and σ = √((1−ᾱ)/ᾱ) turns the ODE into dx̃/dσ = ε̂(x, t)
    (Karras et al. 2022, eq. 4), solved with Heun's 2nd-order method (their Algorithm 1); the last step to
    σ = 0 is Euler, which returns x̂_0. Steps that start above σ = ``sigma_max`` (80, Karras et al.'s σ_max) are
    Euler too: there ε̂ is constant in σ to O(data scale²/σ²), so Euler is exact, whereas the trapezoid rule
    over one long step from e.g. σ_T ≈ 2·10⁴ (cosine schedule) down to σ ≈ 5 multiplies a 1 % change in ε̂ by
    the whole step. Deterministic: 2 network evaluations per Heun step, 1 per Euler step.

    The Euler step x̃_s = x̃_t + (σ_s − σ_t) ε̂ is computed as x̃_s = x̂_0 + σ_s ε̂ (equal, since
    x̃_t = x̂_0 + σ_t ε̂), i.e. x_s = √ᾱ_s x̂_0 + √(1−ᾱ_s) ε̂: exact also from ᾱ_t = 0 (σ_t = ∞, a
    zero-terminal-SNR schedule), where the x̃ form loses x̂_0 against σ_t.
    """
    den, ts = _setup(model, x, timesteps, diffusion, cond, guidance)
    for i, (t, s) in enumerate(_steps(ts)):
        eps, x0 = den(x, _tvec(t, x))
        if s < 0:
            x = x0
        else:
            ab_t, ab_s = _ab(diffusion, t, x), _ab(diffusion, s, x)
            x_euler = ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * eps
            if not float((1 - ab_t) / ab_t) <= sigma_max**2:  # σ_t > σ_max, or ∞ at ᾱ_t = 0
                x = x_euler
            else:
                sig_t, sig_s = ((1 - ab_t) / ab_t).sqrt(), ((1 - ab_s) / ab_s).sqrt()
                eps_s, _ = den(x_euler, _tvec(s, x), guide_t=_tvec(t, x))  # guided or not as the step's start
                x = (x / ab_t.sqrt() + (sig_s - sig_t) * 0.5 * (eps + eps_s)) * ab_s.sqrt()
        if callback:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def dpmpp_2m(model: ModelFn, x: torch.Tensor, timesteps, diffusion: GaussianDiffusion, cond: Any = None,
             guidance: Guidance | None = None, generator: Generator = None,
             callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep 2nd order in the data prediction x̂_0.

    With α = √ᾱ, σ = √(1−ᾱ), λ = log(α/σ) and h = λ_s − λ_t:
    x_s = (σ_s/σ_t) x_t − α_s (e^{−h} − 1) D, D = (1 + 1/2r) x̂_0(t) − (1/2r) x̂_0(t_prev), r = h_prev / h.
    The first step and the last (to σ = 0) are first order. From ᾱ_t = 0 (zero terminal SNR) λ_t = −∞, h = ∞ and
    the step is exactly x_s = √(1−ᾱ_s) x_t + √ᾱ_s x̂_0 (no floor needed); the next one is then first order (r = ∞).
    So is a step where guidance turns on or off (``Guidance.interval``): x̂_0 of another model is not extrapolated.
    """
    den, ts = _setup(model, x, timesteps, diffusion, cond, guidance)
    x0_prev, h_prev, guided_prev = None, None, None
    for i, (t, s) in enumerate(_steps(ts)):
        eps, x0 = den(x, _tvec(t, x))
        guided = den.guided(t)
        if guided != guided_prev:  # entering or leaving a guidance interval: another ODE, so first order again
            x0_prev, guided_prev = None, guided
        if s < 0:
            x = x0
        else:
            ab_t, ab_s = _ab(diffusion, t, x), _ab(diffusion, s, x)
            lam_t = 0.5 * (torch.log(ab_t) - torch.log1p(-ab_t))
            lam_s = 0.5 * (torch.log(ab_s) - torch.log1p(-ab_s))
            h = lam_s - lam_t
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = ((1 - ab_s) / (1 - ab_t)).sqrt() * x - ab_s.sqrt() * torch.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback:
            callback(i, t, x, x0)
    return x


def _langevin(den: Denoiser, diffusion: GaussianDiffusion, x, t: int, n: int, snr: float, generator):
    """n Langevin steps x ← x + δ s_θ(x, t) + √(2δ) z at level t (Song & Ermon 2019, Algorithm 1).

    Step size δ = 2 α_t (r σ_t)², σ_t² = 1 − ᾱ_t: Song et al.'s (2021, Algorithm 5) rule δ = 2 α (r ‖z‖/‖s‖)²
    with the norms replaced by their noise-dominated expectations ‖z‖ ≈ √D, ‖s‖ ≈ √D/σ_t. Unlike the
    batch-averaged norms of the original, this keeps each sample independent of the rest of its batch, and it is
    NCSN's δ ∝ σ² annealing (Song & Ermon 2019). Returns (x, x̂_0 of the last evaluation).
    """
    ab_t = _ab(diffusion, t, x, floor=True)
    delta = 2 * float(diffusion.alphas[t]) * snr**2 * (1 - ab_t)
    x0 = None
    for _ in range(n):
        eps, x0 = den(x, _tvec(t, x))
        score = -eps / (1 - ab_t).sqrt()
        x = x + delta * score + (2 * delta).sqrt() * randn_like(x, generator)
    return x, x0


@torch.no_grad()
def annealed_langevin(model: ModelFn, x: torch.Tensor, timesteps, diffusion: GaussianDiffusion, cond: Any = None,
                      guidance: Guidance | None = None, generator: Generator = None,
                      callback: Callback | None = None, steps_per_level: int = 2, snr: float = 0.3) -> torch.Tensor:
    """Annealed Langevin dynamics (NCSN; Song & Ermon 2019, Algorithm 1; seeds 000/001/004).

    Run in the variance-exploding coordinates of the VP model, x̃ = x/√ᾱ_t with noise level σ_t² = (1−ᾱ_t)/ᾱ_t,
    where p_σ(x̃) is the data blurred by N(0, σ²I) exactly as in NCSN, so moving to the next level needs no
    drift. For each level from the noisiest down, ``steps_per_level`` Langevin steps
    x̃ ← x̃ + δ s̃ + √(2δ) z with s̃ = ∇_x̃ log p_σ = −ε̂/σ_t and NCSN's step δ = 2 (r σ_t)² ∝ σ_t²
    (r = ``snr``, the ratio of the gradient step to the noise), then one denoising step to x̂_0.
    """
    if steps_per_level < 1 or snr <= 0:
        raise ValueError(f"steps_per_level must be >= 1 and snr > 0, got {steps_per_level}, {snr}")
    den, ts = _setup(model, x, timesteps, diffusion, cond, guidance)
    xv = x / _ab(diffusion, ts[0], x, floor=True).sqrt()  # x̃
    for i, t in enumerate(ts):
        ab = _ab(diffusion, t, x, floor=True)
        sigma = ((1 - ab) / ab).sqrt()
        delta = 2 * (snr * sigma) ** 2
        for _ in range(steps_per_level):
            eps, x0 = den(xv * ab.sqrt(), _tvec(t, x))
            xv = xv - delta * eps / sigma + (2 * delta).sqrt() * randn_like(x, generator)
        if callback:
            callback(i, t, xv * ab.sqrt(), x0)
    _, x0 = den(xv * _ab(diffusion, ts[-1], x).sqrt(), _tvec(ts[-1], x))
    return x0


@torch.no_grad()
def predictor_corrector(model: ModelFn, x: torch.Tensor, timesteps, diffusion: GaussianDiffusion, cond: Any = None,
                        guidance: Guidance | None = None, generator: Generator = None,
                        callback: Callback | None = None, corrector_steps: int = 1, snr: float = 0.16) -> torch.Tensor:
    """Predictor–corrector sampling (Song et al. 2021, Algorithms 2 and 5, VP-SDE).

    Predictor: one ancestral (reverse-diffusion) step t → s. Corrector: ``corrector_steps`` Langevin steps
    at level s with signal-to-noise ratio r = ``snr``. The last step returns x̂_0.
    """
    if corrector_steps < 0 or snr <= 0:
        raise ValueError(f"corrector_steps must be >= 0 and snr > 0, got {corrector_steps}, {snr}")
    den, ts = _setup(model, x, timesteps, diffusion, cond, guidance)
    for i, (t, s) in enumerate(_steps(ts)):
        eps, x0 = den(x, _tvec(t, x))
        if s < 0:
            x = x0
        else:
            x = _ancestral_step(diffusion, x, x0, t, s, generator)
            if corrector_steps:
                x, _ = _langevin(den, diffusion, x, s, corrector_steps, snr, generator)
        if callback:
            callback(i, t, x, x0)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler_maruyama": euler_maruyama,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "langevin": annealed_langevin,
    "pc": predictor_corrector,
}

# Default number of timesteps per sampler (None = all T steps).
DEFAULT_STEPS: dict[str, int | None] = {
    "ddpm": None, "ddim": 50, "euler_maruyama": None, "heun": 25, "dpmpp_2m": 20, "langevin": None, "pc": None,
}
# Default timestep spacing per sampler: DPM-Solver++ takes steps of equal log-SNR (Lu et al. 2022, §3.3).
DEFAULT_SPACING: dict[str, str] = {name: "linspace" for name in SAMPLERS} | {"dpmpp_2m": "logsnr"}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed values: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample(name: str, model: ModelFn, noise: torch.Tensor, diffusion: GaussianDiffusion, steps: int | None = None,
           cond: Any = None, guidance: Guidance | None = None, generator: Generator = None,
           callback: Callback | None = None, spacing: str | None = None, **options) -> torch.Tensor:
    """Run sampler ``name`` for ``steps`` respaced timesteps from ``noise`` (its default steps and spacing when None)."""
    fn = get_sampler(name)
    if steps is None:
        steps = DEFAULT_STEPS[name] or diffusion.num_steps
        steps = min(steps, diffusion.num_steps)
    timesteps = diffusion.timesteps(steps, spacing or DEFAULT_SPACING[name])
    return fn(model, noise, timesteps, diffusion, cond, guidance, generator, callback, **options)


__all__ = ["SAMPLERS", "DEFAULT_STEPS", "DEFAULT_SPACING", "sample", "get_sampler", "randn_like"]
