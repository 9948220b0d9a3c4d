"""The training loss: targets, the ELBO weight (Ho et al. 2020) against the KL terms it comes from, Min-SNR, v-prediction."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffusion import DiffusionConfig, GaussianDiffusion


def _d(pred="epsilon", weighting="simple", **kw):
    return GaussianDiffusion.from_config(DiffusionConfig(prediction=pred, loss_weighting=weighting, **kw))


def _batch(d, b=16, dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, dim, generator=g, dtype=torch.float64)
    eps = torch.randn(b, dim, generator=g, dtype=torch.float64)
    eps_hat = eps + 0.3 * torch.randn(b, dim, generator=g, dtype=torch.float64)
    t = torch.randint(0, d.num_steps, (b,), generator=g)
    t[0], t[1] = 0, d.num_steps - 1
    return x0, eps, eps_hat, t


def _model_for(d, x0, eps, eps_hat, t):
    """A model whose ε̂ is ``eps_hat``, expressed in d's parameterisation."""
    xt = d.q_sample(x0, t, eps)
    x0_hat = d.x0_from_eps(xt, t, eps_hat)
    out = {"epsilon": eps_hat, "v": d.v_target(x0_hat, t, eps_hat), "x0": x0_hat}[d.prediction]
    return lambda x, tt, c: out


def test_simple_epsilon_loss_is_plain_mse():
    d = _d()
    x0, eps, eps_hat, t = _batch(d)
    out = d.training_losses(_model_for(d, x0, eps, eps_hat, t), x0, t=t, noise=eps)
    ref = ((eps_hat - eps) ** 2).mean(1).float()
    torch.testing.assert_close(out["loss"], ref)
    torch.testing.assert_close(out["mse"], ref)


def test_model_sees_q_sample_and_targets():
    d = _d("v")
    x0, eps, _, t = _batch(d)
    seen = {}

    def model(x, tt, c):
        seen.update(x=x, t=tt, c=c)
        return torch.zeros_like(x)

    out = d.training_losses(model, x0, cond="caption", t=t, noise=eps)
    torch.testing.assert_close(seen["x"], d.q_sample(x0, t, eps))
    assert seen["c"] == "caption" and torch.equal(seen["t"], t)
    torch.testing.assert_close(out["mse"], (d.v_target(x0, t, eps) ** 2).mean(1).float())


def test_elbo_weight_equals_kl_of_seed_derivation():
    # c_n ‖ε − ε̂‖² = KL[q(x_{n−1}|x_n, x_0) ‖ p_θ(x_{n−1}|x_n)] with p_θ = N(μ̃(x̂_0(ε̂), x_n), σ_n² I), σ_n² = β̃_n.
    d = _d(weighting="elbo")
    x0, eps, eps_hat, t = _batch(d, b=32)
    xt = d.q_sample(x0, t, eps)
    var = d.posterior_variance[t].clone()
    var[t == 0] = d.posterior_variance[1]  # the clipped first-step variance
    mu_q, _ = d.q_posterior(x0, xt, t)
    mu_p, _ = d.q_posterior(d.x0_from_eps(xt, t, eps_hat), xt, t)
    std = var.sqrt()[:, None].expand_as(mu_q)
    kl = kl_divergence(Normal(mu_q, std), Normal(mu_p, std)).sum(1)
    c = d.elbo_weights()[t]
    torch.testing.assert_close(c * ((eps - eps_hat) ** 2).sum(1), kl, rtol=1e-7, atol=1e-9)
    # and through the training call: loss = KL / D
    out = d.training_losses(_model_for(d, x0, eps, eps_hat, t), x0, t=t, noise=eps)
    torch.testing.assert_close(out["loss"].double(), kl / x0.shape[1], rtol=1e-5, atol=1e-8)


def test_elbo_weight_closed_form_values():
    d = _d(weighting="elbo")
    b, a, ab = d.betas, d.alphas, d.alphas_cumprod
    n = 500
    bt = (1 - ab[n - 1]) / (1 - ab[n]) * b[n]
    assert torch.isclose(d.elbo_weights()[n], b[n] ** 2 / (2 * bt * a[n] * (1 - ab[n])))


@pytest.mark.parametrize("weighting", ["simple", "elbo", "min_snr"])
def test_weightings_agree_across_parameterisations(weighting):
    # Each weighting is one objective on x̂_0; ε, v and x0 networks that make the same x̂_0 get the same loss
    # (except "simple", which is by definition c = 1 on each native target).
    losses = {}
    for pred in ["epsilon", "v", "x0"]:
        d = _d(pred, weighting)
        x0, eps, eps_hat, t = _batch(d)
        losses[pred] = d.training_losses(_model_for(d, x0, eps, eps_hat, t), x0, t=t, noise=eps)["loss"].double()
    if weighting == "simple":
        assert not torch.allclose(losses["epsilon"], losses["x0"])
    else:
        torch.testing.assert_close(losses["v"], losses["epsilon"], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(losses["x0"], losses["epsilon"], rtol=1e-4, atol=1e-9)


def test_min_snr_formula():
    gamma = 5.0
    d = _d("epsilon", "min_snr", min_snr_gamma=gamma)
    x0, eps, eps_hat, t = _batch(d)
    xt = d.q_sample(x0, t, eps)
    out = d.training_losses(_model_for(d, x0, eps, eps_hat, t), x0, t=t, noise=eps)["loss"].double()
    snr = d.snr[t]
    ref = torch.clamp(snr, max=gamma) * ((d.x0_from_eps(xt, t, eps_hat) - x0) ** 2).mean(1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-9)


def test_min_snr_v_with_zero_terminal_snr_is_finite():
    d = _d("v", "min_snr", zero_terminal_snr=True)
    w = d.loss_weights(torch.arange(d.num_steps))
    assert torch.isfinite(w).all() and w[-1] == 0


def test_timesteps_are_uniform():
    d = GaussianDiffusion.from_config(DiffusionConfig(num_steps=50))
    t = d.sample_timesteps(200_000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=50).double()
    assert t.min() == 0 and t.max() == 49
    chi2 = ((counts - 4000) ** 2 / 4000).sum()
    assert chi2 < 100  # χ²(49): mean 49, P(> 100) ≈ 2e-5


def test_stratified_timesteps_fill_every_stratum_stay_uniform_and_cut_the_variance():
    """VDM's low-discrepancy sampler: a group of G shares one offset u and puts one t in each stratum [iT/G, (i+1)T/G);
    each t alone is still uniform (the same loss in expectation), and the group's mean of a function of t varies far
    less than with independent draws."""
    g = torch.Generator().manual_seed(0)
    d = GaussianDiffusion.from_config(DiffusionConfig(num_steps=64))
    groups, size = 4000, 16
    u = torch.rand(groups, generator=g).repeat_interleave(size)
    t = d.stratified_timesteps(u, torch.arange(size).repeat(groups), size).view(groups, size)
    assert t.dtype == torch.int64 and t.min() == 0 and t.max() == 63
    assert (torch.sort(t // 4, dim=1).values == torch.arange(size)).all()  # one per stratum of 64 / 16 = 4 steps
    for j in (0, 7, 15):  # the t of each place in a group, over groups (independent offsets), is uniform
        counts = torch.bincount(t[:, j], minlength=64).double()
        assert ((counts - groups / 64) ** 2 / (groups / 64)).sum() < 130  # χ²(63): mean 63, P(> 130) ≈ 1e-6
    f = lambda steps: (steps.double() / 64) ** 2  # noqa: E731  (a smooth per-t loss)
    uniform = d.sample_timesteps(groups * size, generator=g).view(groups, size)
    assert f(t).mean(1).var() < 0.2 * f(uniform).mean(1).var()  # 0.06 here; independent offsets: ≈ 1
    with pytest.raises(ValueError, match="timestep_sampling"):
        GaussianDiffusion.from_config(DiffusionConfig(timestep_sampling="sobol"))


def test_output_shape_mismatch_is_a_clear_error():
    d = _d()
    with pytest.raises(ValueError, match="model output shape"):
        d.training_losses(lambda x, t, c: x[:, :1], torch.zeros(2, 3))


def test_elbo_with_zero_terminal_snr_rejected():
    with pytest.raises(ValueError, match="elbo"):
        _d("v", "elbo", zero_terminal_snr=True)
