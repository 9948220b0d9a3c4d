"""Every sampler driven by the exact ε-predictor of Gaussian and Gaussian-mixture data (closed-form ground truth).

Tolerances = Monte-Carlo error (4 standard errors for N samples) + the sampler's own discretisation bias budget,
measured once at these step counts (benchmarks/bench_samplers.py prints the full error-vs-evaluations table):
ancestral DDPM with σ² = β̃ under-disperses by ~1 % at T = 1000, annealed Langevin over-disperses by ~4 %
(unadjusted Langevin's stationary variance is v / (1 − δ/2v)), the ODE solvers at their default steps are within ~1 %.
"""

import math

import pytest
import torch

from diffusion import DiffusionConfig, GaussianDiffusion, Guidance, sample
from diffusion.analytic import GaussianMixtureModel
from diffusion.samplers import SAMPLERS, get_sampler

N = 20_000
MU, S = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5

# sampler -> (steps, options, relative std bias budget)
CASES = {
    "ddpm": (1000, {}, 0.02),
    "ddpm_beta": (1000, {"variance": "beta"}, 0.03),
    "ddim": (1000, {}, 0.01),
    "ddim_eta1": (1000, {"eta": 1.0}, 0.02),
    "euler_maruyama": (1000, {}, 0.02),
    "heun": (50, {}, 0.015),
    "dpmpp_2m": (20, {}, 0.02),
    "langevin": (1000, {}, 0.06),
    "pc": (1000, {}, 0.02),
}


def _name(case):
    return case.split("_eta")[0].replace("_beta", "")


def _prior(d, means, stds, weights, n, seed):
    """x_T drawn from the exact p_T of the data, so that only the sampler's error is measured."""
    g = torch.Generator().manual_seed(seed)
    ab = d.alphas_cumprod[-1]
    k = torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), n, replacement=True, generator=g)
    m, s = torch.as_tensor(means, dtype=torch.float64)[k], torch.as_tensor(stds, dtype=torch.float64)[k, None]
    return ab.sqrt() * m + (ab * s**2 + 1 - ab).sqrt() * torch.randn(n, m.shape[1], generator=g, dtype=torch.float64)


def _run(case, d, model, x, seed=1):
    steps, opts, _ = CASES[case]
    return sample(_name(case), model, x, d, steps=steps, generator=torch.Generator().manual_seed(seed), **opts)


@pytest.mark.parametrize("case", list(CASES))
def test_gaussian_data_recovered(case):
    # ε-prediction on the linear schedule; every sampler also runs on the cosine (and linear) schedule with
    # v-prediction below (test_zero_terminal_snr_every_sampler_at_default_steps)
    d = GaussianDiffusion.from_config(DiffusionConfig(schedule="linear"))
    model = GaussianMixtureModel(d, MU[None], [S])
    out = _run(case, d, model, _prior(d, MU[None], [S], [1.0], N, seed=0))
    budget = CASES[case][2]
    mean_tol = 4 * S / math.sqrt(N) + 0.01 * S
    std_tol = S * (4 / math.sqrt(2 * N) + budget)
    assert (out.mean(0) - MU).abs().max() < mean_tol, out.mean(0)
    assert (out.std(0) - S).abs().max() < std_tol, out.std(0)


@pytest.mark.parametrize("case", list(CASES))
def test_mixture_modes_and_weights_recovered(case):
    d = GaussianDiffusion.from_config(DiffusionConfig())
    means, stds, w = [[2.0, 0.0], [-2.0, 0.0]], [0.4, 0.4], [0.3, 0.7]
    model = GaussianMixtureModel(d, means, stds, w)
    out = _run(case, d, model, _prior(d, means, stds, w, N, seed=2))
    right = out[:, 0] > 0
    frac = right.double().mean()
    assert abs(frac - 0.3) < 4 * math.sqrt(0.3 * 0.7 / N) + 0.01, frac
    budget = CASES[case][2]
    for mask, m in [(right, 2.0), (~right, -2.0)]:
        pts = out[mask]
        assert abs(pts[:, 0].mean() - m) < 4 * 0.4 / math.sqrt(len(pts)) + 0.01
        assert abs(pts.std(0).mean() - 0.4) < 0.4 * (4 / math.sqrt(len(pts)) + budget + 0.01)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpmpp_2m", "heun"])
def test_zero_terminal_snr_v_prediction(name):
    d = GaussianDiffusion.from_config(DiffusionConfig(prediction="v", zero_terminal_snr=True, schedule="cosine"))
    model = GaussianMixtureModel(d, MU[None], [S])
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # p_T is exactly N(0, I)
    out = sample(name, model, x, d, steps=200 if name != "ddpm" else 1000, generator=torch.Generator().manual_seed(1))
    assert (out.mean(0) - MU).abs().max() < 4 * S / math.sqrt(N) + 0.01
    assert (out.std(0) - S).abs().max() < S * (4 / math.sqrt(2 * N) + 0.03)


# relative std bias of each sampler at its default steps and spacing (ddim: 50, heun: 25, dpmpp_2m: 20 on log-SNR,
# the others all T), measured on plain and zero-terminal-SNR schedules alike; the first-order ddim is the loosest
DEFAULT_STEPS_BUDGET = {"ddpm": 0.02, "ddim": 0.07, "euler_maruyama": 0.02, "heun": 0.03, "dpmpp_2m": 0.045,
                        "langevin": 0.07, "pc": 0.02}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_zero_terminal_snr_every_sampler_at_default_steps(name, schedule):
    """ᾱ_T = 0: no NaN (the linear schedule has steps with 0 < ᾱ < 2⁻²⁴ next to it), and x̂_0 is not lost in the
    first step from σ = ∞ (Heun); mean and spread within each sampler's own default-steps error. In float32, as
    images are sampled (where ᾱ < 2⁻²⁴ rounds; float64 hides it)."""
    dtype = torch.float32
    d = GaussianDiffusion.from_config(DiffusionConfig(prediction="v", zero_terminal_snr=True, schedule=schedule))
    model = GaussianMixtureModel(d, MU[None], [S])
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)  # p_T is exactly N(0, I)
    out = sample(name, model, x, d, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out).all()
    assert (out.mean(0) - MU).abs().max() < 4 * S / math.sqrt(N) + 0.01 * S, out.mean(0)
    assert (out.std(0) - S).abs().max() < S * (4 / math.sqrt(2 * N) + DEFAULT_STEPS_BUDGET[name]), out.std(0)


@pytest.mark.parametrize("name", ["ddim", "heun", "dpmpp_2m"])
def test_deterministic_samplers_are_deterministic(name):
    d = GaussianDiffusion.from_config(DiffusionConfig())
    model = GaussianMixtureModel(d, [[1.0, 1.0], [-1.0, 0.0]], [0.3, 0.5])
    x = torch.randn(64, 2, dtype=torch.float64)
    a = sample(name, model, x.clone(), d, steps=30)
    b = sample(name, model, x.clone(), d, steps=30, generator=torch.Generator().manual_seed(99))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_per_image_generators_make_results_batch_independent(name):
    # With one generator per image, image i is the same whether it is sampled alone or in a batch.
    d = GaussianDiffusion.from_config(DiffusionConfig(num_steps=100))
    model = GaussianMixtureModel(d, [[1.0, 1.0], [-1.0, 0.0]], [0.3, 0.5])
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(4)]
    batch = sample(name, model, x, d, steps=20, generator=gens)
    alone = sample(name, model, x[2:3], d, steps=20, generator=[torch.Generator().manual_seed(102)])
    torch.testing.assert_close(batch[2:3], alone, atol=1e-12, rtol=0)


def test_callback_sees_every_step():
    d = GaussianDiffusion.from_config(DiffusionConfig())
    model = GaussianMixtureModel(d, MU[None], [S])
    seen = []
    sample("ddim", model, torch.randn(3, 2, dtype=torch.float64), d, steps=10,
           callback=lambda i, t, x, x0: seen.append((i, t, x.shape, x0.shape)))
    assert [s[0] for s in seen] == list(range(10)) and seen[0][1] == 999 and seen[-1][1] == 0


def test_unknown_sampler_names_the_choices():
    with pytest.raises(ValueError, match="unknown sampler 'euler_a'; allowed values: ddpm, ddim"):
        get_sampler("euler_a")


@pytest.mark.parametrize("bad", [[], [5, 7], [3, 3], [1000, 10], [10, -1]])
def test_bad_timesteps_rejected(bad):
    d = GaussianDiffusion.from_config(DiffusionConfig())
    with pytest.raises(ValueError, match="timesteps"):
        SAMPLERS["ddim"](lambda x, t, c: x, torch.zeros(1, 2), bad, d)


def test_bad_sampler_options_rejected():
    d = GaussianDiffusion.from_config(DiffusionConfig())
    x, m = torch.zeros(1, 2), (lambda x, t, c: x)
    with pytest.raises(ValueError, match="steps must be an integer in"):
        sample("ddim", m, x, d, steps=2000)
    with pytest.raises(ValueError, match="eta"):
        sample("ddim", m, x, d, steps=5, eta=-1)
    with pytest.raises(ValueError, match="variance"):
        sample("ddpm", m, x, d, steps=5, variance="learned")
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        sample("ddim", m, x, d, steps=5, guidance=Guidance(scale=-2.0, uncond=None))
