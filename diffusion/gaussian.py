"""The Gaussian diffusion process: forward marginals, the posterior, parameterisations and the training loss.

Notation follows Ho et al. 2020 with 0-based timesteps: index t ∈ {0, …, T−1} is the papers' 1-based n = t + 1.

- forward marginal      q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I)                                 (Ho et al. 2020, eq. 4)
- posterior             q(x_{t−1} | x_t, x_0) = N(μ̃, β̃ I),
                        μ̃ = √α_t (1−ᾱ_{t−1})/(1−ᾱ_t) · x_t + √ᾱ_{t−1} β_t/(1−ᾱ_t) · x_0,
                        β̃ = (1−ᾱ_{t−1})/(1−ᾱ_t) · β_t                                            (Ho et al. 2020, eq. 7)
- x̂_0 from ε̂            x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t                                        (Ho et al. 2020, eq. 15)
- score                 ∇ log q(x_t | x_0) = −ε / √(1−ᾱ_t)                                      (Vincent 2011; Song et al. 2021)
- v-prediction          v = √ᾱ_t ε − √(1−ᾱ_t) x_0  (Salimans & Ho 2022)
- loss                  E[c_t ‖ε − ε_θ(x_t, t)‖²], c_t = 1 (simple) or the ELBO weight
                        c_n = β_n² / (2 β̃_n α_n (1−ᾱ_n))                                         (Ho et al. 2020, eq. 12)

The posterior is written between any two timesteps s < t (α_{t|s} = ᾱ_t/ᾱ_s), which reduces to the
seed's one-step formula for s = t − 1 and is what lets every sampler run on a subset of the T steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .schedules import SCHEDULES, make_betas

PREDICTIONS = ("epsilon", "v", "x0")
WEIGHTINGS = ("simple", "elbo", "min_snr")
TIMESTEP_SAMPLINGS = ("uniform", "stratified")
SPACINGS = ("linspace", "leading", "trailing", "logsnr", "karras", "sd")

# The smallest ᾱ the samplers and spacings work with. ᾱ_T = 0 (a zero-terminal-SNR schedule), and the ᾱ below this
# of the steps next to it, mean σ = √((1−ᾱ)/ᾱ) = ∞ or τ = −log ᾱ = ∞: the samplers that need those finite read
# ᾱ as at least 2⁻²⁴ (σ ≤ 4096, diffusers does the same), computed in float64 before casting to the data's dtype.
ALPHA_BAR_FLOOR = 2.0**-24

# A network as the diffusion core sees it: (x_t, t, cond) -> raw output in the model's parameterisation.
ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass
class DiffusionConfig:
    """The diffusion section of a run's config."""

    num_steps: int = 1000  # T
    schedule: str = "linear"  # linear | cosine | scaled_linear (Stable Diffusion's)
    zero_terminal_snr: bool = False  # rescale so ᾱ_T = 0 (needs prediction = v or x0)
    prediction: str = "epsilon"  # epsilon | v | x0: what the network predicts
    loss_weighting: str = "simple"  # simple (c_n = 1) | elbo | min_snr
    min_snr_gamma: float = 5.0  # γ of Min-SNR-γ weighting (Hang et al. 2023)
    # training's t ~ U{0..T−1}: "uniform" draws each sample's t independently (Ho et al. 2020); "stratified" spreads
    # a global batch of G over G equal strata from one shared offset (VDM's low-discrepancy sampler, Kingma et al.
    # 2021): each t is still uniform, so the loss is the same in expectation, with less variance per step
    timestep_sampling: str = "uniform"


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed values: {', '.join(allowed)}")


def _expand(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] reshaped to broadcast against ``like`` (B, ...) and cast to its dtype."""
    out = values.to(t.device)[t].to(like.dtype)
    return out.reshape(out.shape + (1,) * (like.ndim - out.ndim))


class GaussianDiffusion:
    """The forward process of a β schedule and everything derived from it.

    All tables are float64 tensors of shape (T,); computations on tensors cast the looked-up
    coefficients to the data's dtype. ``t`` arguments are int64 tensors of shape (B,) with values in
    [0, T−1], or plain ints.
    """

    def __init__(
        self,
        betas: torch.Tensor,
        prediction: str = "epsilon",
        loss_weighting: str = "simple",
        min_snr_gamma: float = 5.0,
    ):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 1:
            raise ValueError("betas must hold at least one step (T >= 1)")
        _choice("prediction", prediction, PREDICTIONS)
        _choice("loss_weighting", loss_weighting, WEIGHTINGS)
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        # β ∈ (0, 1); only a zero-terminal-SNR schedule may end with β_T = 1.
        inner_ok = bool(((betas[:-1] > 0) & (betas[:-1] < 1)).all())
        last = float(betas[-1])
        if not inner_ok or not 0 < last <= 1:
            raise ValueError(
                "every beta must lie in the open interval (0, 1) (only the last may be exactly 1, for a "
                f"zero-terminal-SNR schedule); got min {float(betas.min()):.3g}, max {float(betas.max()):.3g}"
            )
        self.zero_terminal_snr = last == 1.0
        if self.zero_terminal_snr and prediction == "epsilon":
            raise ValueError(
                "prediction='epsilon' cannot be used with a zero-terminal-SNR schedule: at ᾱ_T = 0 the "
                "image cannot be recovered from ε̂. Use prediction='v' (recommended) or 'x0'."
            )
        if self.zero_terminal_snr and loss_weighting == "elbo":
            raise ValueError("loss_weighting='elbo' is infinite at ᾱ_T = 0; use 'simple' or 'min_snr'")

        self.prediction = prediction
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.num_steps = betas.numel()

        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)  # ᾱ_t
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])  # ᾱ_{t−1}, ᾱ_{−1} = 1
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)  # SNR_t = ᾱ_t / (1 − ᾱ_t)
        # β̃_t (Ho et al. 2020, eq. 7). β̃_0 = 0: the last reverse step is deterministic.
        self.posterior_variance = (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod) * betas

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "GaussianDiffusion":
        _choice("schedule", cfg.schedule, SCHEDULES)
        if cfg.zero_terminal_snr and cfg.num_steps < 2:
            raise ValueError("zero_terminal_snr needs num_steps >= 2")
        _choice("timestep_sampling", cfg.timestep_sampling, TIMESTEP_SAMPLINGS)
        betas = make_betas(cfg.schedule, cfg.num_steps, cfg.zero_terminal_snr)
        return cls(betas, cfg.prediction, cfg.loss_weighting, cfg.min_snr_gamma)

    # ------------------------------------------------------------------ forward process
    def _t(self, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=torch.long)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        # checked where it is free: on a GPU the check would be a host sync in every training step (the training
        # loop's timesteps come from sample_timesteps, in range by construction)
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_steps):
            raise ValueError(f"timesteps must lie in [0, {self.num_steps - 1}], got [{int(t.min())}, {int(t.max())}]")
        return t

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, a draw from q(x_t | x_0). x0, noise: (B, ...)."""
        t = self._t(t, x0)
        ab = _expand(self.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor | int):
        """Mean μ̃ and variance β̃ of q(x_{t−1} | x_t, x_0) exactly as Ho et al. 2020 (eq. 6–7) derive them."""
        t = self._t(t, xt)
        ab, ab_prev = _expand(self.alphas_cumprod, t, xt), _expand(self.alphas_cumprod_prev, t, xt)
        beta, alpha = _expand(self.betas, t, xt), _expand(self.alphas, t, xt)
        mean = alpha.sqrt() * (1 - ab_prev) / (1 - ab) * xt + ab_prev.sqrt() * beta / (1 - ab) * x0
        return mean, _expand(self.posterior_variance, t, xt)

    # ------------------------------------------------------------------ parameterisations
    def alpha_bar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t broadcast against ``like``; t = −1 means ᾱ = 1 (clean data)."""
        t = torch.as_tensor(t, device=like.device, dtype=torch.long)
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        table = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return _expand(table, t + 1, like)

    def alpha_bar_at(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at real-valued times t ∈ [−1, T−1] (float64, t's shape): log ᾱ interpolated linearly between the steps,
        with ᾱ_{−1} = 1 (clean data) and ᾱ at least ALPHA_BAR_FLOOR. The continuous-time process the likelihood's
        probability-flow ODE runs on (diffusion/likelihood.py); it equals the table at whole t."""
        table = self._log_alpha_bar_table().to(t.device)
        t = t.double().clamp(-1, self.num_steps - 1) + 1  # position in the table
        lo = t.floor().long().clamp(max=self.num_steps - 1)
        frac = t - lo
        return torch.exp(table[lo] * (1 - frac) + table[lo + 1] * frac)

    def time_at(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`alpha_bar_at`: the real t ∈ [−1, T−1] at which ᾱ(t) = alpha_bar (float64)."""
        table = -self._log_alpha_bar_table().to(alpha_bar.device)  # ascending: −log ᾱ
        target = (-alpha_bar.double().log()).clamp(0, float(table[-1]))
        hi = torch.searchsorted(table, target).clamp(1, self.num_steps)
        lo = hi - 1
        frac = ((target - table[lo]) / (table[hi] - table[lo]).clamp(min=1e-300)).clamp(0, 1)
        return lo.double() + frac - 1

    def _log_alpha_bar_table(self) -> torch.Tensor:
        """log ᾱ at t = −1, 0, …, T−1: (T+1,) float64, ᾱ floored at ALPHA_BAR_FLOOR (a zero-terminal-SNR ᾱ_T = 0)."""
        return torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod]).clamp(min=ALPHA_BAR_FLOOR).log()

    def x0_from_eps(self, xt, t, eps):
        """x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t (Ho et al. 2020, eq. 15)."""
        ab = self.alpha_bar(t, xt)
        return (xt - (1 - ab).sqrt() * eps) / ab.sqrt()

    def eps_from_x0(self, xt, t, x0):
        """ε̂ = (x_t − √ᾱ_t x̂_0) / √(1−ᾱ_t)."""
        ab = self.alpha_bar(t, xt)
        return (xt - ab.sqrt() * x0) / (1 - ab).sqrt()

    def v_target(self, x0, t, eps):
        """v = √ᾱ_t ε − √(1−ᾱ_t) x_0."""
        ab = self.alpha_bar(t, x0)
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0

    def x0_from_v(self, xt, t, v):
        """x_0 = √ᾱ_t x_t − √(1−ᾱ_t) v."""
        ab = self.alpha_bar(t, xt)
        return ab.sqrt() * xt - (1 - ab).sqrt() * v

    def eps_from_v(self, xt, t, v):
        """ε = √(1−ᾱ_t) x_t + √ᾱ_t v."""
        ab = self.alpha_bar(t, xt)
        return (1 - ab).sqrt() * xt + ab.sqrt() * v

    def score_from_eps(self, xt, t, eps):
        """s(x_t, t) = −ε / √(1−ᾱ_t) (Vincent 2011; Song et al. 2021: ∇ log q(x_t | x_0) = −ε/σ_t)."""
        return -eps / (1 - self.alpha_bar(t, xt)).sqrt()

    def split_output(self, output: torch.Tensor, xt: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂_0) from a raw network output in this diffusion's parameterisation."""
        if self.prediction == "epsilon":
            return output, self.x0_from_eps(xt, t, output)
        if self.prediction == "v":
            return self.eps_from_v(xt, t, output), self.x0_from_v(xt, t, output)
        return self.eps_from_x0(xt, t, output), output

    # ------------------------------------------------------------------ training
    def sample_timesteps(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ U{0, …, T−1} (Ho et al. 2020, Algorithm 1: t ~ Uniform({1, …, T})); int64 of shape (B,)."""
        return torch.randint(0, self.num_steps, (batch_size,), device=device, generator=generator)

    def stratified_timesteps(self, offset: torch.Tensor, position: torch.Tensor, group: int) -> torch.Tensor:
        """t = ⌊((u + j/G) mod 1) · T⌋ for the sample at place j of a group of G sharing the offset u ~ U[0, 1)
        (Kingma et al. 2021, the low-discrepancy sampler of Variational Diffusion Models): the group's G values of
        (u + j/G) mod 1 fall one in each [i/G, (i+1)/G), so its timesteps fall one in each stratum [iT/G, (i+1)T/G)
        when G divides T (to within a step otherwise), and each t is uniform on {0, …, T−1} as u is. offset: float
        (B,) (the u of each sample's group), position: int (B,) in [0, G) → int64 (B,) on offset's device."""
        frac = torch.remainder(offset.double() + position.double() / group, 1.0)
        return (frac * self.num_steps).long().clamp_(max=self.num_steps - 1)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-example weight on the MSE of the native target (ε, v or x_0); float64 of shape (B,).

        Every weighting is fixed by its weight on ‖x_0 − x̂_0‖², then converted using
        ‖ε − ε̂‖² = SNR ‖x_0 − x̂_0‖² and ‖v − v̂‖² = (SNR + 1) ‖x_0 − x̂_0‖²:

        - simple: 1 on the native target (c_n = 1 for ε, Ho et al. 2020's L_simple);
        - elbo: c_n ‖ε − ε̂‖², c_n = β_n² / (2 σ_n² α_n (1−ᾱ_n)) with σ_n² = β̃_n (Ho et al. 2020, eq. 12). For the first
          step β̃ = 0, so σ² is clipped to β̃ of the second step (improved-diffusion's clipped log-variance);
        - min_snr: min(SNR, γ) ‖x_0 − x̂_0‖² (Hang et al. 2023).
        """
        t = t.to(self.betas.device)
        snr = self.snr[t]
        if self.loss_weighting == "simple":
            return torch.ones_like(snr)
        if self.loss_weighting == "elbo":
            c = self.elbo_weights()[t]
            to_native = {"epsilon": 1.0, "v": self.alphas_cumprod[t], "x0": snr}[self.prediction]
            return c * to_native
        gamma = self.min_snr_gamma
        if self.prediction == "epsilon":
            return torch.clamp(gamma / snr, max=1.0)  # min(SNR, γ)/SNR, = 1 where SNR = 0
        if self.prediction == "v":
            return torch.clamp(snr, max=gamma) / (snr + 1)
        return torch.clamp(snr, max=gamma)

    def elbo_weights(self) -> torch.Tensor:
        """c_n = β_n² / (2 σ_n² α_n (1−ᾱ_n)) for every step; (T,) float64. See :meth:`loss_weights`."""
        var = self.posterior_variance.clone()
        if self.num_steps > 1:
            var[0] = var[1]
        else:
            var[0] = self.betas[0]
        return self.betas**2 / (2 * var * self.alphas * (1 - self.alphas_cumprod))

    def training_losses(
        self,
        model: ModelFn,
        x0: torch.Tensor,
        cond: Any = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The training loss for a batch x0 (B, ...): t ~ U, ε ~ N(0, I), x_t = q_sample, weighted MSE.

        Returns float32 tensors of shape (B,): ``loss`` (weighted, to be averaged by the caller), ``mse``
        (unweighted MSE of the native target), and ``t``. The caller never sees β or ᾱ.
        """
        b = x0.shape[0]
        if t is None:
            t = self.sample_timesteps(b, x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        xt = self.q_sample(x0, t, noise)
        if self.prediction == "epsilon":
            target = noise
        elif self.prediction == "v":
            target = self.v_target(x0, t, noise)
        else:
            target = x0
        output = model(xt, t, cond)
        if output.shape != target.shape:
            raise ValueError(f"model output shape {tuple(output.shape)} != target shape {tuple(target.shape)}")
        mse = (output.float() - target.float()).pow(2).flatten(1).mean(1)
        weight = self.loss_weights(t).to(mse.device, torch.float32)
        return {"loss": weight * mse, "mse": mse, "t": t}

    # ------------------------------------------------------------------ sampling support
    def timesteps(self, num_steps: int | None = None, spacing: str = "linspace"):
        """A descending subset of the T timesteps for a sampler run (timestep respacing): exactly ``num_steps`` of them.

        ``linspace`` spans T−1 … 0 evenly (the first step starts from the noisiest level);
        ``leading`` is DDIM's / diffusers' default (0, k, 2k, … reversed, k = T // steps);
        ``sd`` is Stable Diffusion's: ``leading`` shifted by one (1, k+1, 2k+1, …; diffusers' ``steps_offset=1``, which
        its Stable Diffusion pipelines impose);
        ``trailing`` ends at T−1 (Lin et al. 2024, Table 2): round(T − i·T/n) − 1 for i = 0 … n−1;
        ``logsnr`` is uniform in λ = ½ log SNR between the noisiest and the cleanest step (Lu et al. 2022);
        ``karras`` is uniform in σ^(1/ρ), ρ = 7, with σ = √((1−ᾱ)/ᾱ) (Karras et al. 2022, eq. 5), which keeps an
        ODE solver's steps small relative to σ. Both measure ᾱ no lower than the samplers' floor (2⁻²⁴), so
        a zero-terminal-SNR schedule (λ_T = −∞) does not stretch the grid; they start at T−1 all the same.
        Every spacing rounds to whole timesteps; where two round to the same one (``logsnr``/``karras`` near the
        ends, where the schedule is steep in t), the later one moves to the next free timestep, so exactly
        ``num_steps`` distinct timesteps come back for every 1 ≤ num_steps ≤ T.
        Returns int64 of shape (num_steps,), strictly descending, from T−1 (``leading``: (n−1)·k) down to 0.
        """
        T = self.num_steps
        n = T if num_steps is None else num_steps
        _choice("spacing", spacing, SPACINGS)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or n > T:
            raise ValueError(f"steps must be an integer in [1, T={T}], got {num_steps!r}")
        i = torch.arange(n)
        if spacing == "linspace":
            ts = torch.linspace(T - 1, 0, n, dtype=torch.float64).round().long()
        elif spacing in ("leading", "sd"):
            ts = (i * (T // n)).flip(0) + (spacing == "sd")
        elif spacing == "trailing":
            ts = (T - i * (T / n)).round().long() - 1
        else:
            # both keys are monotone in t: λ = ½ log SNR decreases, σ^(1/ρ) = SNR^(−1/2ρ) increases
            ab = self.alphas_cumprod.clamp(min=ALPHA_BAR_FLOOR)
            snr = ab / (1 - ab)
            key = 0.5 * torch.log(snr) if spacing == "logsnr" else snr ** (-0.5 / 7.0)
            asc = key if spacing == "karras" else key.flip(0)  # ascending; position j is t = j (karras), T−1−j
            grid = torch.linspace(float(asc[0]), float(asc[-1]), n, dtype=torch.float64)
            hi = torch.searchsorted(asc, grid).clamp(min(1, T - 1), T - 1)
            lo = (hi - 1).clamp(min=0)
            j = torch.where((grid - asc[lo]).abs() <= (asc[hi] - grid).abs(), lo, hi)  # the nearest timestep
            ts = (j if spacing == "karras" else T - 1 - j).sort(descending=True).values
            ts[0] = T - 1  # the run starts from the noisiest step (ties at the ᾱ floor may round elsewhere)
        ts = ts.clamp(max=T - 1)  # `sd` at n = T would reach T
        # Rounded neighbours that coincide are pushed apart (t_i ≤ t_{i−1} − 1, a running minimum), keeping room
        # below for the steps still to come (t_i ≥ n−1−i): strictly descending, n distinct values in [0, T−1].
        ts = torch.cummin(ts + i, 0).values - i
        return torch.maximum(ts, n - 1 - i)
