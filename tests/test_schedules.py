"""Schedules against diffusers' (an independent implementation), and bad schedule arguments."""

import pytest
import torch
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_zero_snr
from diffusers import DDPMScheduler

from diffusion import DiffusionConfig, GaussianDiffusion, cosine_betas, linear_betas, make_betas, rescale_zero_terminal_snr


@pytest.mark.parametrize("T", [1000, 250, 50])
def test_linear_matches_diffusers(T):
    scale = 1000 / T
    ref = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4 * scale, beta_end=0.02 * scale, beta_schedule="linear")
    ours = linear_betas(T)
    torch.testing.assert_close(ours.float(), ref.betas, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cumprod(1 - ours, 0).float(), ref.alphas_cumprod, atol=1e-6, rtol=0)


@pytest.mark.parametrize("T", [1000, 100])
def test_cosine_matches_diffusers(T):
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(cosine_betas(T).float(), ref.betas, atol=1e-6, rtol=0)


def test_scaled_linear_matches_diffusers():
    """Stable Diffusion's schedule: diffusers' "scaled_linear" with SD's end points."""
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ours = make_betas("scaled_linear", 1000)
    torch.testing.assert_close(ours.float(), ref.betas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.cumprod(1 - ours, 0).float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear"])
def test_zero_terminal_snr_matches_diffusers(name):
    betas = make_betas(name, 1000)
    ours = rescale_zero_terminal_snr(betas)
    ref = diffusers_zero_snr(betas.clone())  # float64 in, float64 out: compares the formula, not float32 rounding
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)
    ab = torch.cumprod(1 - ours, 0)
    assert ab[-1] == 0 and ours[-1] == 1.0
    torch.testing.assert_close(ab[0], torch.cumprod(1 - betas, 0)[0])  # first ᾱ unchanged


def test_linear_scaled_for_other_T_keeps_total_noise():
    # The 1000/T scaling keeps ᾱ_T near its T = 1000 value.
    ab_1000 = torch.cumprod(1 - linear_betas(1000), 0)[-1]
    ab_100 = torch.cumprod(1 - linear_betas(100), 0)[-1]
    assert abs(torch.log(ab_100) / torch.log(ab_1000) - 1) < 0.1


@pytest.mark.parametrize("T", [0, -3, 2.5, True])
def test_bad_num_steps(T):
    with pytest.raises(ValueError, match="num_steps"):
        linear_betas(T)
    with pytest.raises(ValueError, match="num_steps"):
        cosine_betas(T)


def test_bad_schedule_name_lists_allowed():
    with pytest.raises(ValueError, match="allowed values: linear, cosine, scaled_linear"):
        make_betas("sigmoid", 1000)


@pytest.mark.parametrize("betas", [[0.1, 0.0, 0.2], [0.1, 1.0, 0.2], [0.1, -0.2], [0.5, 1.5]])
def test_betas_outside_unit_interval_rejected(betas):
    with pytest.raises(ValueError, match=r"beta.*\(0, 1\)"):
        GaussianDiffusion(torch.tensor(betas))


def test_linear_too_few_steps_says_what_to_do():
    with pytest.raises(ValueError, match="at least 21 steps"):
        linear_betas(10)


def test_zero_terminal_snr_needs_v_prediction():
    with pytest.raises(ValueError, match="prediction='v'"):
        GaussianDiffusion.from_config(DiffusionConfig(zero_terminal_snr=True))
    d = GaussianDiffusion.from_config(DiffusionConfig(zero_terminal_snr=True, prediction="v"))
    assert d.zero_terminal_snr and d.alphas_cumprod[-1] == 0


def test_unknown_config_choices():
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(linear_betas(100), prediction="score")
    with pytest.raises(ValueError, match="loss_weighting.*allowed values"):
        GaussianDiffusion(linear_betas(100), loss_weighting="p2")


@pytest.mark.parametrize("schedule,zero_snr", [("linear", False), ("cosine", False), ("linear", True), ("cosine", True)])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "logsnr", "karras"])
def test_every_spacing_returns_the_steps_asked_for_every_n(spacing, schedule, zero_snr):
    """Exactly n distinct timesteps for every n in 1..T: log-SNR / Karras grids no longer merge steps where the schedule
    is steep (ends of cosine, zero terminal SNR), and trailing never returns n + 1 or a −1."""
    d = GaussianDiffusion.from_config(DiffusionConfig(schedule=schedule, zero_terminal_snr=zero_snr, prediction="v"))
    T = d.num_steps
    for n in range(1, T + 1):
        ts = d.timesteps(n, spacing)
        assert ts.dtype == torch.long and len(ts) == n, (n, len(ts))
        assert bool((ts[:-1] > ts[1:]).all()) and 0 <= int(ts[-1]) and int(ts[0]) <= T - 1, (n, ts)
        if spacing != "leading":
            assert int(ts[0]) == T - 1, (n, ts[:3])  # every run but DDIM's `leading` starts from the noisiest step
        if spacing not in ("trailing",) and n > 1:
            assert int(ts[-1]) == 0
    trailing = d.timesteps(10, "trailing")
    assert trailing.tolist() == list(range(999, 0, -100))  # Lin et al. 2024, Table 2


def test_log_snr_spacing_is_uniform_in_log_snr_where_the_schedule_allows():
    """Consecutive log-SNR steps differ by the grid's Δλ, to rounding to whole timesteps (coarse near t = 0, where the
    linear schedule's λ is steepest)."""
    d = GaussianDiffusion.from_config(DiffusionConfig(schedule="linear"))
    ts = d.timesteps(20, "logsnr")
    lam = 0.5 * torch.log(d.snr[ts])
    steps = lam[1:] - lam[:-1]
    expected = (0.5 * torch.log(d.snr[0]) - 0.5 * torch.log(d.snr[-1])) / 19
    assert ((steps[:-4] - expected).abs() / expected).max() < 0.03, steps
    assert ((steps - expected).abs() / expected).max() < 0.25, steps
