"""Classifier-free guidance on a class-conditional Gaussian mixture with exact conditional and unconditional models."""

import math

import pytest
import torch

from diffusion import DiffusionConfig, GaussianDiffusion, Guidance, sample
from diffusion.analytic import GaussianMixtureModel
from diffusion.guidance import Denoiser, concat_cond, dynamic_threshold

N = 20_000
MEANS, STD, W = [[0.6, 0.0], [-0.6, 0.0]], 0.5, [0.5, 0.5]  # overlapping classes: p(c | x) is far from 0 or 1


def _setup(prediction="epsilon"):
    d = GaussianDiffusion.from_config(DiffusionConfig(prediction=prediction))
    return d, GaussianMixtureModel(d, MEANS, [STD, STD], W)


def _class0_posterior(x):
    """p(c = 0 | x) under the data distribution (equal weights, equal stds)."""
    m = torch.tensor(MEANS, dtype=x.dtype)
    logp = -((x[:, None, :] - m[None]) ** 2).sum(-1) / (2 * STD**2)
    return torch.softmax(logp, 1)[:, 0]


def _guided(scale, sampler="ddpm", steps=1000, prediction="epsilon", seed=0):
    d, model = _setup(prediction)
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cond = torch.zeros(N, dtype=torch.long)  # class 0
    g = Guidance(scale=scale, uncond=torch.full((1,), -1, dtype=torch.long))
    return sample(sampler, model, x, d, steps=steps, cond=cond, guidance=g, generator=torch.Generator().manual_seed(seed + 1))


def test_w0_is_unconditional_w1_is_conditional_and_w_gt_1_moves_toward_the_class():
    se = 4 / math.sqrt(N)
    out0, out1, out3 = _guided(0.0), _guided(1.0), _guided(3.0)
    # w = 0: the mixture (mean 0, per-axis std √(s² + 0.6²) along the class axis)
    assert abs(out0[:, 0].mean()) < se * 0.8 + 0.01
    assert abs(out0[:, 0].std() - math.sqrt(STD**2 + 0.36)) < 0.03
    # w = 1: class 0 alone, N(MEANS[0], STD²)
    torch.testing.assert_close(out1.mean(0), torch.tensor(MEANS[0], dtype=torch.float64), atol=se * STD + 0.01, rtol=0)
    assert (out1.std(0) - STD).abs().max() < STD * (se + 0.02)
    # the class posterior of the samples, E[p(c=0 | x)]: matches its exact value for w = 0 and 1, grows for w > 1
    ref = torch.randn(N, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * STD + torch.tensor(MEANS[0])
    p0, p1, p3 = (_class0_posterior(o).mean() for o in (out0, out1, out3))
    assert abs(p0 - 0.5) < 0.02
    assert abs(p1 - _class0_posterior(ref).mean()) < 0.02
    assert p3 > p1 + 0.05 and out3[:, 0].mean() > out1[:, 0].mean() + 0.1


def test_guidance_is_the_same_for_epsilon_and_v_networks():
    a = _guided(2.5, "ddim", 50, "epsilon")
    b = _guided(2.5, "ddim", 50, "v")
    torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)


def test_one_batched_forward_per_step_and_uncond_is_the_negative_prompt():
    d, _ = _setup()
    calls = []

    def model(x, t, cond):
        calls.append((x.shape[0], cond))
        return torch.zeros_like(x)

    x = torch.randn(3, 2, dtype=torch.float64)
    neg = {"tokens": torch.full((1, 4), 7.0), "mask": torch.ones(1, 4, dtype=torch.bool)}
    pos = {"tokens": torch.ones(3, 4), "mask": torch.ones(3, 4, dtype=torch.bool)}
    sample("ddim", model, x, d, steps=10, cond=pos, guidance=Guidance(scale=4.0, uncond=neg))
    assert len(calls) == 10 and all(b == 6 for b, _ in calls)
    seen = calls[0][1]["tokens"]
    assert torch.equal(seen[:3], pos["tokens"]) and torch.equal(seen[3:], torch.full((3, 4), 7.0))
    # w = 1 and w = 0 need only one branch
    calls.clear()
    sample("ddim", model, x, d, steps=5, cond=pos, guidance=Guidance(scale=1.0))
    sample("ddim", model, x, d, steps=5, cond=pos, guidance=Guidance(scale=0.0, uncond=neg))
    assert [b for b, _ in calls] == [3] * 10
    assert torch.equal(calls[-1][1]["tokens"], torch.full((3, 4), 7.0))


def test_guidance_combination_formula():
    d, _ = _setup()
    cond_out, uncond_out = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)

    def model(x, t, cond):
        return torch.cat([cond_out, uncond_out])

    den = Denoiser(model, d, cond=torch.zeros(2), guidance=Guidance(scale=3.0, uncond=torch.ones(1)))
    out = den.raw(torch.zeros(2, 5, dtype=torch.float64), torch.tensor([10, 10]))
    torch.testing.assert_close(out, uncond_out + 3.0 * (cond_out - uncond_out))
    # guidance rescale φ = 1: the guided output takes the conditional output's per-sample std
    den = Denoiser(model, d, cond=torch.zeros(2), guidance=Guidance(scale=3.0, uncond=torch.ones(1), rescale=1.0))
    out = den.raw(torch.zeros(2, 5, dtype=torch.float64), torch.tensor([10, 10]))
    torch.testing.assert_close(out.std(1), cond_out.std(1))


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers_at_every_phi(phi):
    """φ < 1 blends the rescaled and the plain guided output (Lin et al. 2024, eq. 16): against diffusers' own
    rescale_noise_cfg (an independent implementation), on 4-D outputs as a U-Net gives them."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    d, _ = _setup()
    gen = torch.Generator().manual_seed(3)
    cond_out = torch.randn(3, 4, 6, 6, generator=gen, dtype=torch.float64)
    uncond_out = 0.3 * torch.randn(3, 4, 6, 6, generator=gen, dtype=torch.float64)

    def model(x, t, cond):
        return torch.cat([cond_out, uncond_out])

    den = Denoiser(model, d, cond=torch.zeros(3), guidance=Guidance(scale=5.0, uncond=torch.ones(1), rescale=phi))
    out = den.raw(torch.zeros(3, 4, 6, 6, dtype=torch.float64), torch.full((3,), 10))
    guided = uncond_out + 5.0 * (cond_out - uncond_out)
    torch.testing.assert_close(out, rescale_noise_cfg(guided, cond_out, guidance_rescale=phi))
    if 0 < phi < 1:  # strictly between the plain guided output and the fully rescaled one
        full = rescale_noise_cfg(guided, cond_out, guidance_rescale=1.0)
        assert not torch.allclose(out, guided) and not torch.allclose(out, full)


def _sigma(d, t: int) -> float:
    ab = float(d.alphas_cumprod[t])
    return math.sqrt((1 - ab) / ab)


def test_guidance_interval_guides_only_inside_the_noise_window():
    """Kynkäänniemi et al. 2024: w inside σ_lo < σ ≤ σ_hi, the conditional model alone (one branch) outside; against
    a hand-written per-step guided model on the exact Gaussian-mixture scores."""
    d, model = _setup()
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond, uncond = torch.zeros(256, dtype=torch.long), torch.full((1,), -1, dtype=torch.long)
    lo, hi = 0.3, 2.0
    calls = []

    def counted(x, t, c):
        calls.append((int(t[0]), x.shape[0]))
        return model(x, t, c)

    def reference(x, t, c):  # w where σ_t ∈ (lo, hi], from the ᾱ table, one step at a time
        w = 4.0 if lo < _sigma(d, int(t[0])) <= hi else 1.0
        mc, mu = model(x, t, cond), model(x, t, uncond.expand(x.shape[0]))
        return mu + w * (mc - mu)

    g = Guidance(scale=4.0, uncond=uncond, interval=(lo, hi))
    out = sample("ddim", counted, x, d, steps=40, cond=cond, guidance=g)
    ref = sample("ddim", reference, x, d, steps=40, cond=cond)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    inside = [lo < _sigma(d, t) <= hi for t, _ in calls]
    assert 0 < sum(inside) < len(calls)  # the window is neither empty nor every step
    assert [b for _, b in calls] == [512 if i else 256 for i in inside]  # no unconditional forward outside
    # a window holding every step is plain guidance; one holding none, the conditional model
    plain = sample("ddim", model, x, d, steps=40, cond=cond, guidance=Guidance(scale=4.0, uncond=uncond))
    every = sample("ddim", model, x, d, steps=40, cond=cond, guidance=Guidance(scale=4.0, uncond=uncond,
                                                                               interval=(0.0, 1e9)))
    torch.testing.assert_close(every, plain, atol=0, rtol=0)
    none = sample("ddim", model, x, d, steps=40, cond=cond, guidance=Guidance(scale=4.0, uncond=uncond,
                                                                              interval=(1e8, 1e9)))
    torch.testing.assert_close(none, sample("ddim", model, x, d, steps=40, cond=cond), atol=0, rtol=0)
    assert not torch.allclose(out, plain) and not torch.allclose(out, none)


def test_guidance_interval_is_decided_per_step_by_second_order_samplers():
    """Heun's corrector at s is guided or not as its step's start t (w constant within a step), and w = 0 with an
    interval holding every step is the unconditional model (unrescaled, as without an interval)."""
    d, model = _setup()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond, uncond = torch.zeros(64, dtype=torch.long), torch.full((1,), -1, dtype=torch.long)
    lo, hi = 0.3, 2.0
    batches, steps = [], []

    def counted(x, t, c):
        batches.append(x.shape[0])
        return model(x, t, c)

    def close_step(i, t, x, x0):
        steps.append((t, batches.copy()))
        batches.clear()

    sample("heun", counted, x, d, steps=12, cond=cond, guidance=Guidance(scale=3.0, uncond=uncond, interval=(lo, hi)),
           callback=close_step)
    assert any(len(b) == 2 for _, b in steps)  # Heun steps with a corrector
    for t, b in steps:
        assert b == [128 if lo < _sigma(d, t) <= hi else 64] * len(b), (t, b)
    zero = sample("ddim", model, x, d, steps=10, cond=cond, guidance=Guidance(scale=0.0, uncond=uncond, rescale=0.7,
                                                                               interval=(0.0, 1e9)))
    torch.testing.assert_close(zero, sample("ddim", model, x, d, steps=10, cond=cond,
                                            guidance=Guidance(scale=0.0, uncond=uncond, rescale=0.7)), atol=0, rtol=0)


def test_dpmpp_2m_restarts_its_history_at_the_interval_edges():
    """DPM-Solver++(2M) extrapolates x̂_0 from the previous step; across a guidance switch that step came from another
    model, so the step there is first order. A per-step guided model that the sampler cannot see switching (the
    hand-written reference) is extrapolated across the edges: the two differ. Windows of every step or none are
    plain guidance and the conditional model, exactly (no spurious restart)."""
    d, model = _setup()
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cond, uncond = torch.zeros(256, dtype=torch.long), torch.full((1,), -1, dtype=torch.long)
    lo, hi = 0.3, 2.0

    def reference(x, t, c):
        w = 4.0 if lo < _sigma(d, int(t[0])) <= hi else 1.0
        mc, mu = model(x, t, cond), model(x, t, uncond.expand(x.shape[0]))
        return mu + w * (mc - mu)

    def run(**kw):
        return sample("dpmpp_2m", model, x, d, steps=20, cond=cond, guidance=Guidance(scale=4.0, uncond=uncond, **kw))

    out = run(interval=(lo, hi))
    extrapolated = sample("dpmpp_2m", reference, x, d, steps=20, cond=cond)
    assert (out - extrapolated).abs().max() > 1e-6  # the restart changed the steps at the two edges …
    torch.testing.assert_close(out, extrapolated, atol=0.15, rtol=0)  # … by less than the data's spread (0.5)
    torch.testing.assert_close(run(interval=(0.0, 1e9)), run(), atol=0, rtol=0)
    torch.testing.assert_close(run(interval=(1e8, 1e9)), sample("dpmpp_2m", model, x, d, steps=20, cond=cond),
                               atol=0, rtol=0)


def test_guidance_interval_is_decided_per_sample():
    """A batch whose samples sit at different noise levels: each gets w or 1 by its own σ (t = 10: σ ≈ 0.04;
    t = 900: σ ≈ 6)."""
    d, _ = _setup()
    cond_out, uncond_out = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)

    def model(x, t, c):
        return torch.cat([cond_out, uncond_out])

    den = Denoiser(model, d, cond=torch.zeros(2), guidance=Guidance(scale=3.0, uncond=torch.ones(1),
                                                                      interval=(1.0, 100.0)))
    out = den.raw(torch.zeros(2, 5, dtype=torch.float64), torch.tensor([10, 900]))
    torch.testing.assert_close(out[0], cond_out[0])
    torch.testing.assert_close(out[1], uncond_out[1] + 3.0 * (cond_out[1] - uncond_out[1]))


def test_dynamic_thresholding_and_clipping():
    x0 = torch.tensor([[0.5, -0.2, 0.1, 0.3], [3.0, -6.0, 1.0, 0.0]], dtype=torch.float64)
    out = dynamic_threshold(x0, 0.5)
    torch.testing.assert_close(out[0], x0[0])  # s = max(1, q) = 1: in-range samples are unchanged
    s = torch.quantile(x0[1].abs(), 0.5)
    torch.testing.assert_close(out[1], x0[1].clamp(-s, s) / s)
    assert out.abs().max() <= 1
    d, model = _setup()
    den = Denoiser(model, d, guidance=Guidance(clip_x0=0.1))
    x = torch.randn(64, 2, dtype=torch.float64) * 5
    eps, x0c = den(x, torch.full((64,), 100))
    assert x0c.abs().max() <= 0.1 + 1e-12
    torch.testing.assert_close(d.x0_from_eps(x, 100, eps), x0c)  # ε̂ consistent with the clipped x̂_0


def test_concat_cond_errors_and_expansion():
    out = concat_cond(torch.ones(3, 2), torch.zeros(1, 2), 3)
    assert out.shape == (6, 2)
    with pytest.raises(ValueError, match="different keys"):
        concat_cond({"a": torch.ones(1)}, {"b": torch.ones(1)}, 1)


@pytest.mark.parametrize("kw, match", [
    ({"scale": -1.0, "uncond": 0}, "guidance scale must be >= 0"),
    ({"scale": 3.0}, "needs `uncond`"),
    ({"scale": 2.0, "uncond": 0, "rescale": 1.5}, "rescale"),
    ({"dynamic_threshold": 1.5}, "percentile"),
    ({"clip_x0": 0.0}, "clip_x0"),
    ({"scale": 2.0, "uncond": 0, "interval": (2.0, 1.0)}, "σ_lo < σ_hi"),
    ({"scale": 2.0, "uncond": 0, "interval": (-1.0, 1.0)}, "σ_lo < σ_hi"),
])
def test_bad_guidance_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        Guidance(**kw)
