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


@pytest.mark.parametrize("name", ["linear", "cosine"])
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
    with pytest.raises(ValueError, match="allowed values: linear, cosine"):
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
