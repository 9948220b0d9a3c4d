"""Tensors made on the wrong device, caught without a GPU: the paths that run on a GPU are run with the model and the
data on PyTorch's ``meta`` device, where any tensor made on the CPU and mixed in raises ("Tensor on device cpu is
not on the expected device meta"), the error a CUDA run would give. Data-dependent steps (an adaptive solver's step
control, ``.item()``) cannot run on meta: those paths are driven around them (the ODE's drift called directly)."""

import pytest
import torch

from diffusion import DiffusionConfig, GaussianDiffusion
from diffusion.likelihood import elbo, ode_log_likelihood
from metrics.likelihood import dequantize, generators
from models.registry import build_model

META = torch.device("meta")


def _old_dequantize(k, gens):  # the GPU crash this file was written for: the noise stayed on the CPU
    u = torch.stack([torch.rand(k.shape[1:], generator=g, dtype=torch.float64) for g in gens])
    return ((k.double() + u - 0.5) / 127.5 - 1).float().to(k.device)


def _meta_model():
    model = build_model("tiny", context_dim=32, pooled_dim=32, attention_backend="math").eval()
    return model.to(META)


def _cond(b):
    return {"tokens": torch.zeros(b, 77, 32, device=META), "mask": torch.ones(b, 77, dtype=torch.bool, device=META),
            "pooled": torch.zeros(b, 32, device=META)}


def test_the_check_catches_cpu_tensors_meeting_device_tensors():
    k = torch.zeros(2, 3, 8, 8, dtype=torch.uint8, device=META)
    with pytest.raises(RuntimeError, match="device"):
        _old_dequantize(k, generators(0, [0, 1], 1))
    out = dequantize(k, generators(0, [0, 1], 1))
    assert out.device == META and out.shape == k.shape and out.dtype == torch.float32


@pytest.mark.parametrize("convention", [("beta", False), ("posterior", True)])
def test_elbo_runs_on_the_models_device(convention):
    d = GaussianDiffusion.from_config(DiffusionConfig(num_steps=50))
    x = torch.zeros(2, 3, 8, 8, device=META)
    out = elbo(_meta_model(), d, x, _cond(2), timesteps=3, generators=generators(0, [0, 1], 3),
               decoder_variance=convention[0], clip_x0=convention[1])
    assert all(v.device == META and v.shape == (2,) for v in out.values())


@pytest.mark.parametrize("trace", ["hutchinson"])  # (the exact trace's D backward passes are slow even on meta)
def test_the_odes_drift_runs_on_the_models_device(monkeypatch, trace):
    """The probability-flow ODE's drift (network, probes, trace, timestep lookup) at one σ: torchdiffeq's adaptive
    stepping needs real numbers, so odeint is replaced by one call of the drift."""
    import torchdiffeq

    calls = []

    def one_step(f, y0, t, **kw):  # t lives on the data's device (meta: no value); the drift reads σ as a float
        calls.append(f(torch.tensor(0.5), y0))
        return tuple(torch.stack([y, y]) for y in y0)

    monkeypatch.setattr(torchdiffeq, "odeint", one_step)
    d = GaussianDiffusion.from_config(DiffusionConfig(num_steps=50, prediction="v"))
    x = torch.zeros(2, 3, 8, 8, device=META)
    out = ode_log_likelihood(_meta_model(), d, x, _cond(2), trace=trace, generators=generators(0, [0, 1], 2))
    assert out["log_px"].device == META
    eps, tr = calls[0]
    assert eps.device == tr.device == META and eps.shape == x.shape and tr.shape == (2,)


def test_training_draws_and_validation_run_on_the_datas_device(tmp_path):
    from data import DataConfig
    from data.write_shards import write_toy
    from pipeline.train import sample_draws
    from pipeline.validation import Validation, ValidationConfig

    d = GaussianDiffusion.from_config(DiffusionConfig(num_steps=50))
    x0 = torch.zeros(3, 4, 4, 4)
    t, noise = sample_draws(d, x0.to(torch.float64), [5, 6, 7], seed=0)
    assert t.device == noise.device == x0.device and noise.dtype == torch.float64  # the data's device and dtype
    assert sample_draws(d, x0, [5, 6, 7], seed=0, stratify=4)[0].device == x0.device
    assert d.stratified_timesteps(torch.rand(3, device=META), torch.arange(3, device=META), 4).device == META
    write_toy(tmp_path / "held", count=4, resolution=8, max_samples=4)

    class Encoder:  # a CPU text encoder, as the frozen one often is: its outputs are moved to the model's device
        def encode(self, captions):
            b = len(captions)
            return {"tokens": torch.zeros(b, 77, 32), "mask": torch.ones(b, 77, dtype=torch.bool),
                    "pooled": torch.zeros(b, 32)}

    val = Validation(ValidationConfig(shards=str(tmp_path / "held" / "00000.tar"), num_samples=4, batch_size=2, bins=2),
                     DataConfig(resolution=8), d, Encoder(), None, META, seed=0)
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):  # the losses' values go to
        val(_meta_model())  # the CPU after the forwards ran on meta
