"""Likelihood in bits/dim: the probability-flow ODE and the ELBO against closed forms, and `evaluate.py nll`.

Gaussian data x_0 ~ N(μ, s² I) have an exact ε-predictor (diffusion/analytic.py) and a closed-form density at every
time, so the estimators are checked against the truth, not against themselves.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import threads
from diffusion import DiffusionConfig, GaussianDiffusion
from diffusion.analytic import GaussianMixtureModel
from diffusion.likelihood import _log_bin_probability, elbo, ode_log_likelihood, strata

ROOT = Path(__file__).resolve().parents[1]
D = 4


def _gaussian(schedule="cosine", prediction="epsilon", mu=0.3, s=0.5, n=64, seed=0, **kw):
    d = GaussianDiffusion.from_config(DiffusionConfig(schedule=schedule, prediction=prediction, **kw))
    model = GaussianMixtureModel(d, torch.full((1, D), mu), [s])
    g = torch.Generator().manual_seed(seed)
    x = mu + s * torch.randn(n, D, generator=g, dtype=torch.float64)
    return d, model, x


def _bits(nats):
    return nats / (D * math.log(2))


def _gens(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def test_continuous_time_alpha_bar_matches_the_table_and_inverts():
    d = GaussianDiffusion.from_config(DiffusionConfig(schedule="linear"))
    t = torch.arange(-1, 1000, dtype=torch.float64)
    torch.testing.assert_close(d.alpha_bar_at(t)[1:], d.alphas_cumprod, rtol=1e-12, atol=0)
    assert float(d.alpha_bar_at(torch.tensor([-1.0]))) == 1.0
    ts = torch.tensor([-1.0, -0.5, 0.0, 0.25, 17.5, 500.3, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(d.time_at(d.alpha_bar_at(ts)), ts, rtol=0, atol=1e-9)


# t_start = 300 (ᾱ ≈ 0.79): the change of variables x̄ = x/√ᾱ adds (D/2)·log₂(1/ᾱ)/D ≈ 0.17 bits/dim there, so
# the Jacobian term's sign is tested (near t = 0 it is below the tolerance)
@pytest.mark.parametrize("schedule,prediction,t_start", [("cosine", "epsilon", -1.0), ("cosine", "v", 0.0),
                                                         ("linear", "x0", -1.0), ("linear", "epsilon", 3.5),
                                                         ("cosine", "epsilon", 300.0)])
def test_ode_with_the_exact_trace_equals_the_closed_form_density(schedule, prediction, t_start):
    # linear: μ = 0, because its ᾱ_T = 4e-5 leaves the prior N(0, I) off the true marginal by ~3e-3 bits/dim at μ = 0.3
    d, model, x = _gaussian(schedule, prediction, mu=0.0 if schedule == "linear" else 0.3)
    out = ode_log_likelihood(model, d, x, t_start=t_start, trace="exact")
    err = _bits(out["log_px"] - model.log_prob(x, t_start)).abs().max()
    assert err < 1e-3, err
    assert 50 < out["nfe"] < 1000


def test_ode_is_exact_for_a_two_component_mixture_and_a_class_conditional_model():
    d = GaussianDiffusion.from_config(DiffusionConfig(schedule="cosine"))
    model = GaussianMixtureModel(d, [[1.0, -0.5, 0.0, 0.3], [-1.0, 0.5, 0.2, -0.3]], [0.3, 0.5], [0.3, 0.7])
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond = torch.tensor([0, 1, -1, 1] * 8)
    out = ode_log_likelihood(model, d, x, cond, t_start=-1.0, trace="exact", rtol=1e-7, atol=1e-7)
    assert _bits(out["log_px"] - model.log_prob(x, -1.0, cond)).abs().max() < 1e-3
    assert (model.log_prob(x, -1.0, cond) != model.log_prob(x, -1.0)).any()  # the condition matters here


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased_within_its_standard_error_and_shrinks_with_probes(probe):
    # a mixture: its Jacobian has off-diagonal terms (an isotropic Gaussian's is a multiple of I, where a
    # Rademacher probe is exact and the test could not fail)
    d = GaussianDiffusion.from_config(DiffusionConfig(schedule="cosine"))
    model = GaussianMixtureModel(d, [[1.0, -0.5, 0.0, 0.3], [-1.0, 0.5, 0.2, -0.3]], [0.3, 0.5])
    x = torch.tensor([[0.1, 0.1, 0.0, 0.05]], dtype=torch.float64)
    exact = float(ode_log_likelihood(model, d, x, t_start=-1.0, trace="exact")["log_px"][0])
    xs = x.expand(400, D).clone()  # one point, 400 independent probe draws
    spread = {}
    for k in (1, 4):
        est = ode_log_likelihood(model, d, xs, t_start=-1.0, probes=k, probe=probe, generators=_gens(400, 1000 * k))
        lp = est["log_px"]
        stderr = float(lp.std() / math.sqrt(len(lp)))
        assert abs(float(lp.mean()) - exact) < 4 * stderr, (k, float(lp.mean()), exact, stderr)
        assert stderr > 0
        spread[k] = float(lp.std())
    assert spread[4] < 0.7 * spread[1]  # ∝ 1/√K: 0.5 expected


def test_probes_depend_on_each_examples_generator_only():
    d, model, x = _gaussian(n=6)
    gens = _gens(6)
    full = ode_log_likelihood(model, d, x, t_start=-1.0, generators=gens, rtol=1e-9, atol=1e-9)["log_px"]
    part = ode_log_likelihood(model, d, x[2:4], t_start=-1.0, generators=_gens(6)[2:4], rtol=1e-9,
                              atol=1e-9)["log_px"]
    torch.testing.assert_close(part, full[2:4], rtol=0, atol=1e-6)


def _logsnr_diffusion(T, lmax=12.0, lmin=-12.0):
    """A schedule uniform in log-SNR between fixed ends: refining T refines every part of it (unlike DDPM's linear or
    cosine schedules, whose first steps keep a fixed SNR ratio however large T is)."""
    lam = torch.linspace(lmax, lmin, T, dtype=torch.float64)
    ab = torch.sigmoid(lam)
    return GaussianDiffusion(1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]]))


def test_elbo_bounds_the_likelihood_and_tends_to_it_as_steps_grow():
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.5 * torch.randn(2000, D, generator=g, dtype=torch.float64)
    gaps = []
    for T in (100, 1000, 4000):
        d = _logsnr_diffusion(T)
        model = GaussianMixtureModel(d, torch.full((1, D), 0.3), [0.5])
        torch.manual_seed(T)  # one generator for the batch: 2000 per-example generators × T steps would be slow
        bound = elbo(model, d, x, decoder="continuous")["total"]
        gap = _bits(bound - (-model.log_prob(x, -1.0)))
        gaps.append((float(gap.mean()), float(gap.std() / math.sqrt(len(gap)))))
    (g100, s100), (g1000, s1000), (g4000, s4000) = gaps
    assert all(g > -3 * s for g, s in gaps), gaps  # a bound: never below the negative log-likelihood
    assert g100 > 0.5 and g1000 < g100 / 4 and g4000 < 0.06, gaps  # 0.89 → 0.09 → 0.01 bits/dim


def test_elbo_on_ddpm_schedules_is_above_the_likelihood():
    d, model, x = _gaussian("linear", n=1000)
    bound = elbo(model, d, x, decoder="continuous", generators=_gens(1000))
    gap = _bits(bound["total"] + model.log_prob(x, -1.0))
    assert float(gap.mean()) > 3 * float(gap.std() / math.sqrt(len(gap)))
    assert float(bound["prior"].abs().max()) < 1e-3  # ᾱ_T ≈ 4e-5: q(x_T | x_0) ≈ N(0, I)


def test_elbo_on_a_subset_of_timesteps_is_unbiased():
    d, model, x = _gaussian("cosine", n=1, num_steps=200)
    xs = x.expand(600, D).clone()
    exact = elbo(model, d, xs, decoder="continuous", generators=_gens(600))["total"]
    sub = elbo(model, d, xs, timesteps=8, decoder="continuous", generators=_gens(600, 5000))["total"]
    se = math.sqrt(float(exact.var()) / 600 + float(sub.var()) / 600)
    assert abs(float(sub.mean() - exact.mean())) < 4 * se, (float(sub.mean()), float(exact.mean()), se)
    assert float(sub.std()) > float(exact.std())  # the subset costs variance, reported in the standard error
    assert strata(200, 8)[0] == (1, 25) and strata(200, 8)[-1][1] == 200 and len(strata(200, None)) == 199
    assert sum(hi - lo for lo, hi in strata(1000, 7)) == 999


def test_discretised_decoder_bins_are_a_distribution_over_the_256_values():
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, std in [(0.0, 0.01), (0.99, 0.003), (-1.3, 0.02), (0.4, 1e-4), (5.0, 0.01)]:
        logp = _log_bin_probability(values, torch.tensor(mean, dtype=torch.float64),
                                    torch.tensor(std, dtype=torch.float64), 1 / 255)
        assert abs(float(torch.logsumexp(logp, 0))) < 1e-9, (mean, std)
    # a bin 40σ away keeps a finite log-probability (a naive Φ(b) − Φ(a) underflows to log 0)
    far = _log_bin_probability(torch.tensor([0.0], dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64),
                               torch.tensor(0.01, dtype=torch.float64), 1 / 255)
    assert torch.isfinite(far).all() and float(far) < -1000


def test_bits_per_dim_of_8bit_images_bound_their_exact_discrete_likelihood():
    """8-bit images quantised from a Gaussian: P(k) per pixel is a difference of normal CDFs, so the true discrete
    negative log-likelihood is known. The ODE's dequantised figure (+log2 127.5) and the ELBO's discretised decoder
    are both bounds on it, the ODE's within a hundredth of a bit (the density is smooth over a bin): an error in the
    units (the offset, the bin width, the [-1, 1] scaling) would be off by bits."""
    from metrics.likelihood import LikelihoodOptions, batch_bits, summarize

    mu, s, n = 0.1, 0.3, 120
    d = GaussianDiffusion.from_config(DiffusionConfig(schedule="cosine"))
    gauss = GaussianMixtureModel(d, torch.full((1, 12), mu), [s])

    def model(x, t, cond):  # images (B, 3, 2, 2) through the exact model of 12-dimensional data
        return gauss(x.flatten(1).double(), t).reshape(x.shape).to(x.dtype)

    g = torch.Generator().manual_seed(0)
    x = mu + s * torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64)
    k = ((x + 1) * 127.5).round().clamp(0, 255)
    grid = k / 127.5 - 1
    lo = torch.where(k == 0, torch.full_like(grid, -math.inf), (grid - 1 / 255 - mu) / s)
    hi = torch.where(k == 255, torch.full_like(grid, math.inf), (grid + 1 / 255 - mu) / s)
    p_k = torch.special.ndtr(hi) - torch.special.ndtr(lo)
    exact = float((-torch.log2(p_k).flatten(1).sum(1) / 12).mean())
    rows = batch_bits(model, d, k.to(torch.uint8), list(range(n)), None, LikelihoodOptions(probes=0, rtol=1e-7,
                                                                                          atol=1e-7))
    out = summarize(rows)
    # the gap (dequantisation, and the ODE starting at t = 0) is 2.6e-3 here; an offset of 7 bits instead of
    # log2(127.5) = 6.9944 would add 5.6e-3
    assert 0 <= out["bits_per_dim"] - exact < 4e-3, (out["bits_per_dim"], exact)
    assert -3 * out["elbo_bits_per_dim_stderr"] < out["elbo_bits_per_dim"] - exact < 1.0, (out, exact)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_zero_terminal_snr_schedules_give_the_closed_form_density_and_a_bound(prediction):
    """ᾱ_T = 0: the ODE runs to σ = 4096 (the samplers' floor) and calls the network between the last two steps;
    the ELBO's prior term vanishes and its last KL term is at ᾱ = 0."""
    d, model, x = _gaussian("linear", prediction, mu=0.3, n=400, zero_terminal_snr=True)
    out = ode_log_likelihood(model, d, x[:32], t_start=-1.0, trace="exact")
    assert _bits(out["log_px"] - model.log_prob(x[:32], -1.0)).abs().max() < 1e-3
    bound = elbo(model, d, x, decoder="continuous", generators=_gens(400))
    assert float(bound["prior"].abs().max()) == 0.0 and torch.isfinite(bound["total"]).all()
    gap = _bits(bound["total"] + model.log_prob(x, -1.0))
    assert float(gap.mean()) > -3 * float(gap.std() / math.sqrt(len(gap)))


@pytest.mark.parametrize("prediction,variance", [("epsilon", "beta"), ("v", "posterior"), ("x0", "posterior"),
                                                 ("v", "beta")])
def test_elbo_is_the_same_bound_whatever_the_network_predicts(prediction, variance):
    """The exact model predicts ε, v or x_0 of the same x̂_0, so the ELBO (same noise) is the same number; σ² = β_t
    gives another, also above the likelihood."""
    ref_d, ref_model, x = _gaussian("linear", "epsilon", n=300, num_steps=200)
    d, model, _ = _gaussian("linear", prediction, n=300, num_steps=200)
    ref = elbo(ref_model, ref_d, x, decoder="continuous", variance=variance, generators=_gens(300))["total"]
    got = elbo(model, d, x, decoder="continuous", variance=variance, generators=_gens(300))["total"]
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    gap = _bits(got + model.log_prob(x, -1.0))
    assert float(gap.mean()) > -3 * float(gap.std() / math.sqrt(len(gap)))  # a bound (σ² = β_t: a tighter one here)


def test_the_adaptive_solvers_named_are_torchdiffeqs_and_adapt():
    """Every solver the options accept runs in torchdiffeq with a tolerance and meets it on dy/dt = −y; a fixed-step
    one is refused (it would ignore rtol/atol)."""
    from torchdiffeq import odeint

    from metrics.likelihood import ADAPTIVE_SOLVERS, LikelihoodOptions

    for name in ADAPTIVE_SOLVERS:
        y = odeint(lambda t, y: -y, torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64),
                   method=name, rtol=1e-8, atol=1e-10)
        assert abs(float(y[-1]) - math.exp(-2)) < 1e-6, name
        LikelihoodOptions(solver=name)
    with pytest.raises(ValueError, match="fixed-step solver 'rk4'"):
        LikelihoodOptions(solver="rk4")


@pytest.mark.parametrize("convention", ["ho2020", "improved_diffusion"])
def test_elbo_decoder_follows_its_convention(convention):
    """L_0 against scipy's normal CDF: Ho et al. 2020's σ² = β₁ with x̂₀ as predicted, or improved-diffusion's
    σ² = β̃₂ with x̂₀ clipped to [−1, 1] (a network that predicts x̂₀ = 1.5 everywhere shows the clipping)."""
    from scipy.special import log_ndtr

    d = GaussianDiffusion.from_config(DiffusionConfig(schedule="cosine", prediction="x0", num_steps=50))
    k = torch.tensor([[0.0, 100.0, 200.0, 255.0]], dtype=torch.float64)
    x = k / 127.5 - 1

    def model(xt, t, cond):
        return torch.full_like(xt, 1.5)

    clipped = convention == "improved_diffusion"
    out = elbo(model, d, x, timesteps=1, generators=_gens(1), decoder_variance="posterior" if clipped else "beta",
               clip_x0=clipped)
    mean = 1.0 if clipped else 1.5
    std = math.sqrt(float(d.posterior_variance[1] if clipped else d.betas[0]))
    lo = np.where(k == 0, -np.inf, (x.numpy() - 1 / 255 - mean) / std)
    hi = np.where(k == 255, np.inf, (x.numpy() + 1 / 255 - mean) / std)
    upper = lo > 0  # P = Φ(hi) − Φ(lo), in log space from the tail the bin lies in (bins ~100σ away)
    a, b = np.where(upper, -hi, lo), np.where(upper, -lo, hi)
    ref = -(log_ndtr(b) + np.log1p(-np.exp(np.minimum(log_ndtr(a) - log_ndtr(b), 0)))).sum()
    assert float(out["decoder"][0]) == pytest.approx(ref, rel=1e-6)


def test_the_two_elbo_conventions_differ_on_8bit_data():
    """On 8-bit images of Gaussian data with the exact model the two conventions are 0.03–0.2 bits/dim apart: the
    labels say which one a figure is."""
    from metrics.likelihood import LikelihoodOptions, batch_bits, summarize

    mu, s, n = 0.1, 0.3, 200
    d = GaussianDiffusion.from_config(DiffusionConfig(schedule="cosine", num_steps=200))
    gauss = GaussianMixtureModel(d, torch.full((1, 12), mu), [s])

    def model(x, t, cond):
        return gauss(x.flatten(1).double(), t).reshape(x.shape).to(x.dtype)

    x = mu + s * torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    bits = {c: summarize(batch_bits(model, d, k, list(range(n)), None, LikelihoodOptions(method="elbo",
                                                                                       elbo_convention=c)))
            for c in ("ho2020", "improved_diffusion")}
    gap = bits["ho2020"]["elbo_bits_per_dim"] - bits["improved_diffusion"]["elbo_bits_per_dim"]
    assert 0.03 < abs(gap) < 0.2, bits


def test_elbo_prior_term_on_stable_diffusions_schedule():
    """scaled_linear ends at ᾱ_T ≈ 0.0047, so L_T = KL(q(x_T | x_0) ‖ N(0, I)) is ~1e-3 bits/dim, not negligible: it is
    the closed-form KL (checked against torch.distributions) and part of the total."""
    from torch.distributions import Normal, kl_divergence

    d, model, x = _gaussian("scaled_linear", mu=1.5, n=200, s=0.2)
    out = elbo(model, d, x, decoder="continuous", timesteps=20, generators=_gens(200))
    ab = float(d.alphas_cumprod[-1])
    ref = kl_divergence(Normal(math.sqrt(ab) * x, math.sqrt(1 - ab)), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(out["prior"], ref, rtol=1e-9, atol=1e-12)
    assert float(_bits(out["prior"]).mean()) > 3e-3
    torch.testing.assert_close(out["total"], out["prior"] + out["diffusion"] + out["decoder"], rtol=0, atol=1e-9)


def test_latent_bits_equal_the_closed_form_density_of_the_scaled_latents(tmp_path):
    """A latent model's bits/dim are the density of the VAE's scaled posterior means, per latent dimension, with no
    8-bit offset: checked with the exact model of Gaussian latents against its closed form at the latents diffusers'
    own VAE gives (a missing scale or shift, or a pixel offset, would be off by far more than the tolerance)."""
    from diffusers import AutoencoderKL

    from helpers import make_vae
    from metrics.likelihood import LikelihoodOptions, batch_bits
    from models.autoencoder import AutoencoderConfig, load_autoencoder

    folder = make_vae(tmp_path / "vae", scaling_factor=0.7, shift_factor=0.1)
    vae = load_autoencoder(AutoencoderConfig(path=str(folder)))
    images = torch.randint(0, 256, (6, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        raw = AutoencoderKL.from_pretrained(folder).encode(images.float() / 127.5 - 1).latent_dist.mean.double()
    z = ((raw - 0.1) * 0.7).flatten(1)  # (6, 16): 4 channels × 2 × 2
    d = GaussianDiffusion.from_config(DiffusionConfig(schedule="cosine"))
    gauss = GaussianMixtureModel(d, torch.full((1, z.shape[1]), float(z.mean())), [float(z.std())])

    def model(x, t, cond):
        return gauss(x.flatten(1).double(), t).reshape(x.shape).to(x.dtype)

    rows = batch_bits(model, d, images, list(range(6)), None, LikelihoodOptions(probes=0, rtol=1e-7, atol=1e-7),
                      vae=vae)
    ref = -gauss.log_prob(z, 0.0) / (z.shape[1] * math.log(2))  # the ODE starts at t = 0
    got = torch.tensor([r["bits_per_dim"] for r in rows], dtype=torch.float64)
    assert (got - ref).abs().max() < 1e-3, (got, ref)
    elbo_bits = torch.tensor([r["elbo_bits_per_dim"] for r in rows], dtype=torch.float64)
    assert float((elbo_bits - ref).mean()) > -1e-2  # a bound, in the same units


# --- the command --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A demo model trained a few steps at 16 px, and held-out images with captions (shards and a folder)."""
    from data.write_shards import write_toy
    from pipeline import train

    tmp = tmp_path_factory.mktemp("nll")
    write_toy(tmp / "shards", count=32, resolution=16, max_samples=16)
    write_toy(tmp / "held_out", count=6, resolution=16, seed=7, max_samples=6)
    run = tmp / "run"
    train.main(["--config", str(ROOT / "launch/configs/demo.yaml"), "--output-dir", str(run), "--max-steps", "4",
                f"data.shards={tmp / 'shards'}", "data.resolution=16", "data.num_workers=0", "optim.batch_size=8",
                "logging.tracker=none", "logging.sample_every=0", "diffusion.num_steps=50"])
    folder = tmp / "folder"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red circle on a blue background")
    return {"model": str(run / "model"), "shards": str(tmp / "held_out" / "00000.tar"), "folder": folder, "tmp": tmp}


def _nll(*argv):
    from pipeline import evaluate

    return evaluate.main(["nll", *map(str, argv), "--json"])


def test_nll_of_a_trained_model_is_finite_reproducible_and_has_the_documented_keys(demo, capsys):
    args = ["--model", demo["model"], "--images", demo["shards"], "--num-images", "3", "--batch-size", "2",
            "--elbo-timesteps", "10", "--per-image", demo["tmp"] / "per_image.csv"]
    first = _nll(*args)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"bits_per_dim", "bits_per_dim_stderr", "elbo_bits_per_dim", "elbo_bits_per_dim_stderr",
            "num_images"} <= printed.keys()
    assert printed["num_images"] == 3 and "8-bit pixels" in printed["space"]
    for key in ("bits_per_dim", "bits_per_dim_stderr", "elbo_bits_per_dim", "elbo_bits_per_dim_stderr"):
        assert np.isfinite(printed[key]) and printed[key] >= 0, key
    # a barely trained model: near 8 bits/dim (uniform over 256 values); both are bounds on the same discrete NLL
    assert 3 < printed["bits_per_dim"] < 40 and 3 < printed["elbo_bits_per_dim"] < 40
    rows = (demo["tmp"] / "per_image.csv").read_text().splitlines()
    assert rows[0].startswith("index,bits_per_dim,nfe,elbo_bits_per_dim") and len(rows) == 4
    # a method alone gives only its keys; reproducible from --seed (dequantisation and Hutchinson noise), and another
    # seed differs; unconditional differs from captioned
    short = ["--model", demo["model"], "--images", demo["shards"], "--num-images", "2", "--rtol", "1e-3", "--atol",
             "1e-3"]  # (a looser ODE: a third of the evaluations; the solver's own tolerance is tested elsewhere)
    ode = _nll(*short, "--method", "ode")
    assert "bits_per_dim" in ode and "elbo_bits_per_dim" not in ode and ode["ode_evaluations_mean"] > 10
    assert _nll(*short, "--method", "ode") == ode
    assert _nll(*short, "--method", "ode", "--seed", "1")["bits_per_dim"] != ode["bits_per_dim"]
    el = _nll("--model", demo["model"], "--images", demo["shards"], "--num-images", "2", "--method", "elbo")
    assert "elbo_bits_per_dim" in el and "bits_per_dim" not in el and "ode" not in el
    unc = _nll("--model", demo["model"], "--images", demo["shards"], "--num-images", "2", "--method", "elbo",
               "--unconditional")
    assert unc["elbo_bits_per_dim"] != el["elbo_bits_per_dim"] and unc["conditioning"].startswith("unconditional")


def test_nll_of_an_image_folder_with_captions(demo):
    out = _nll("--model", demo["model"], "--images", demo["folder"], "--method", "elbo", "--elbo-timesteps", "5")
    assert out["num_images"] == 3 and np.isfinite(out["elbo_bits_per_dim"])


def test_nll_same_with_two_processes(demo):
    args = ["--model", demo["model"], "--images", demo["shards"], "--num-images", "3", "--batch-size", "1",
            "--elbo-timesteps", "6"]  # 3 batches dealt round robin: rank 0 two, rank 1 one
    with threads(1):  # the kernels each of the two processes runs (OMP_NUM_THREADS=1)
        one = _nll(*args)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "pipeline/evaluate.py", "nll", *args, "--json"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("bits_per_dim", "bits_per_dim_stderr", "elbo_bits_per_dim", "elbo_bits_per_dim_stderr", "num_images"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key


def test_nll_refuses_guidance(demo):
    with pytest.raises(SystemExit, match="no likelihood"):
        _nll("--model", demo["model"], "--images", demo["shards"], "--guidance", "3")


def test_nll_of_a_folder_without_readable_images_is_a_clear_error(demo, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.txt").write_text("a caption")
    with pytest.raises(SystemExit, match="no readable images"):
        _nll("--model", demo["model"], "--images", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no images"):
        _nll("--model", demo["model"], "--images", tmp_path / "empty")


def test_nll_of_a_folder_without_captions_says_how_to_give_them(demo, tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit, match="--captions FILE.jsonl"):
        _nll("--model", demo["model"], "--images", tmp_path)
    assert _nll("--model", demo["model"], "--images", tmp_path, "--unconditional", "--method", "elbo",
                "--elbo-timesteps", "2")["num_images"] == 1


@pytest.mark.parametrize("args,message", [
    (["--solver", "rk4"], "fixed-step solver"),
    (["--elbo-timesteps", "0"], "elbo_timesteps must be >= 1"),
    (["--probes", "-1"], "probes must be >= 0"),
])
def test_nll_bad_settings_are_clear_errors(demo, args, message):
    with pytest.raises(SystemExit, match=message):
        _nll("--model", demo["model"], "--images", demo["shards"], *args)


def test_run_job_likelihood_needs_reference_images(demo, tmp_path):
    from pipeline import evaluate

    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(SystemExit, match="not an .npz"):
        evaluate.main(["run", "--model", demo["model"], "--captions", demo["shards"], "--ref", str(tmp_path / "ref.npz"),
                       "--clip-model", "openclip:toy-clip", "--out", str(tmp_path / "eval"), "--likelihood", "4"])
    assert not (tmp_path / "eval").exists()  # refused before anything was generated
