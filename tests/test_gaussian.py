"""Forward process, posterior, parameterisations and single sampler steps against diffusers' schedulers.

diffusers' schedulers are an independent implementation of the same equations. Their ᾱ table is replaced by ours in
float64 so that the comparison checks formulas (to 1e-10), not float32 rounding; the tables themselves are compared
in test_schedules.py.
"""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffusion import DiffusionConfig, GaussianDiffusion
from diffusion.samplers import ddim, ddpm

T = 1000


def _diffusion(prediction="epsilon", **kw):
    return GaussianDiffusion.from_config(DiffusionConfig(prediction=prediction, **kw))


def _ddpm_scheduler(d, **kw):
    s = DDPMScheduler(num_train_timesteps=d.num_steps, clip_sample=False, **kw)
    s.alphas_cumprod = d.alphas_cumprod.clone()
    return s


def _first_step(sampler, model, x, timesteps, d, **kw):
    """x after the first step of a sampler run (captured by the progress callback)."""
    seen = {}
    sampler(model, x, timesteps, d, callback=lambda i, t, xi, x0: seen.setdefault(i, xi.clone()), **kw)
    return seen[0]


def test_q_sample_matches_diffusers_add_noise(gen):
    d = _diffusion()
    s = _ddpm_scheduler(d)
    x0 = torch.randn(8, 3, 4, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999])
    torch.testing.assert_close(d.q_sample(x0, t, noise), s.add_noise(x0, noise, t), atol=1e-10, rtol=0)


def test_q_sample_has_the_forward_marginal():
    # q(x_t | x_0) = N(√ᾱ x_0, (1−ᾱ) I), checked by moments over many draws.
    d = _diffusion()
    x0 = torch.full((200_000, 1), 1.5, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    xt = d.q_sample(x0, 300, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    ab = float(d.alphas_cumprod[300])
    assert abs(xt.mean() - ab**0.5 * 1.5) < 5 * (1 - ab) ** 0.5 / 200_000**0.5
    assert abs(xt.var() / (1 - ab) - 1) < 5 * (2 / 200_000) ** 0.5


def test_posterior_equals_seed_formula_and_bayes():
    # μ̃, β̃ from Ho et al. 2020 (eq. 7); checked against the posterior of the Gaussian pair (x_{t−1}, x_t) | x_0 by Bayes' rule.
    d = _diffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, generator=g, dtype=torch.float64)
    xt = torch.randn(5, 2, generator=g, dtype=torch.float64)
    for t in [1, 5, 250, 999]:
        mean, var = d.q_posterior(x0, xt, t)
        ab_prev, beta = d.alphas_cumprod[t - 1], d.betas[t]
        # prior x_{t−1} ~ N(√ᾱ_{t−1} x0, 1−ᾱ_{t−1}); likelihood x_t | x_{t−1} ~ N(√(1−β) x_{t−1}, β)
        prec = 1 / (1 - ab_prev) + (1 - beta) / beta
        ref_mean = (ab_prev.sqrt() * x0 / (1 - ab_prev) + (1 - beta).sqrt() * xt / beta) / prec
        torch.testing.assert_close(mean, ref_mean, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(var.flatten()[0], 1 / prec, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("variance", ["posterior", "beta"])
@pytest.mark.parametrize("t", [999, 500, 1])
def test_ddpm_step_matches_diffusers(t, variance):
    d = _diffusion()
    s = _ddpm_scheduler(d, variance_type="fixed_small" if variance == "posterior" else "fixed_large")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ref = s.step(eps, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
    ours = _first_step(ddpm, lambda *a: eps, x, [t, t - 1], d, generator=torch.Generator().manual_seed(7), variance=variance)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    mean, var = d.q_posterior(d.x0_from_eps(x, t, eps), x, t)
    if variance == "posterior":  # the step is μ̃ + √β̃ z with the same z
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        torch.testing.assert_close(ours, mean + var.sqrt() * z, atol=1e-10, rtol=1e-10)


def test_respaced_ddpm_step_matches_diffusers():
    # Timestep respacing: a DDPM step from t to t − k uses α_{t|s} = ᾱ_t/ᾱ_s (diffusers' inference schedule).
    d = _diffusion()
    s = _ddpm_scheduler(d, timestep_spacing="leading")
    s.set_timesteps(50)
    ts = d.timesteps(50, "leading")
    assert ts.tolist() == s.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    for i in [0, 10, 48]:
        t = int(ts[i])
        ref = s.step(eps, t, x, generator=torch.Generator().manual_seed(3)).prev_sample
        ours = _first_step(ddpm, lambda *a: eps, x, ts[i:], d, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(eta):
    d = _diffusion()
    s = DDIMScheduler(num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True)
    s.alphas_cumprod = d.alphas_cumprod.clone()
    s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    s.set_timesteps(20)
    ts = d.timesteps(20, "leading")
    assert ts.tolist() == s.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    for i in [0, 7, 19]:
        t = int(ts[i])
        ref = s.step(eps, t, x, eta=eta, generator=torch.Generator().manual_seed(5)).prev_sample
        ours = _first_step(ddim, lambda *a: eps, x, ts[i:], d, generator=torch.Generator().manual_seed(5), eta=eta)
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)


def test_ddim_v_prediction_zero_terminal_snr_matches_diffusers():
    d = _diffusion("v", zero_terminal_snr=True)
    s = DDIMScheduler(num_train_timesteps=T, clip_sample=False, prediction_type="v_prediction",
                      rescale_betas_zero_snr=True, timestep_spacing="trailing", set_alpha_to_one=True)
    torch.testing.assert_close(s.alphas_cumprod.double(), d.alphas_cumprod, atol=1e-6, rtol=0)
    s.alphas_cumprod = d.alphas_cumprod.clone()
    s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    s.set_timesteps(25)
    ts = d.timesteps(25, "trailing")
    assert ts.tolist() == s.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    for i in [0, 12, 24]:  # i = 0 starts at ᾱ = 0
        ref = s.step(v, int(ts[i]), x).prev_sample
        ours = _first_step(ddim, lambda *a: v, x, ts[i:], d)
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)


def test_parameterisation_round_trips_and_diffusers_velocity(gen):
    d = _diffusion()
    x0 = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 3, 100, 500, 900, 999])
    xt = d.q_sample(x0, t, eps)
    v = d.v_target(x0, t, eps)
    torch.testing.assert_close(v, _ddpm_scheduler(d).get_velocity(x0, eps, t), atol=1e-10, rtol=0)
    torch.testing.assert_close(d.x0_from_eps(xt, t, eps), x0, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(d.eps_from_x0(xt, t, x0), eps, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(d.x0_from_v(xt, t, v), x0, atol=1e-10, rtol=0)
    torch.testing.assert_close(d.eps_from_v(xt, t, v), eps, atol=1e-10, rtol=0)
    for pred, out in [("epsilon", eps), ("v", v), ("x0", x0)]:
        e, x = _diffusion(pred).split_output(out, xt, t)
        torch.testing.assert_close(e, eps, atol=1e-7, rtol=1e-7)
        torch.testing.assert_close(x, x0, atol=1e-7, rtol=1e-7)


def test_score_is_gradient_of_log_q():
    # s = −ε/√(1−ᾱ) equals ∇_{x_t} log q(x_t | x_0) computed by autograd (Vincent 2011).
    d = _diffusion()
    x0 = torch.randn(3, 5, dtype=torch.float64)
    eps = torch.randn(3, 5, dtype=torch.float64)
    t = 400
    xt = d.q_sample(x0, t, eps).requires_grad_(True)
    ab = d.alphas_cumprod[t]
    logq = torch.distributions.Normal(ab.sqrt() * x0, (1 - ab).sqrt()).log_prob(xt).sum()
    (grad,) = torch.autograd.grad(logq, xt)
    torch.testing.assert_close(d.score_from_eps(xt.detach(), t, eps), grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "logsnr", "karras"])
def test_timesteps_are_descending_subsets(spacing):
    d = _diffusion()
    for n in [1, 7, 20, 50, 1000]:
        ts = d.timesteps(n, spacing)
        assert ts.dtype == torch.long and 1 <= len(ts) <= n and (ts.diff() < 0).all()
        assert 0 <= ts.min() and ts.max() <= T - 1
    assert d.timesteps(1000).tolist() == list(range(999, -1, -1))


@pytest.mark.parametrize("steps", [0, 1001, -5, 2.5])
def test_more_steps_than_T_rejected(steps):
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, T=1000\]"):
        _diffusion().timesteps(steps)


def test_timestep_out_of_range_rejected():
    d = _diffusion()
    with pytest.raises(ValueError, match="timesteps must lie in"):
        d.q_sample(torch.zeros(2, 3), torch.tensor([0, 1000]), torch.zeros(2, 3))
