"""The paths that only run on a CUDA GPU, checked there against float64 references (skipped without a GPU; CI has
none, so run these where one is: ``pytest tests/test_gpu.py``).

- The GroupNorm → scale-shift → SiLU node: the NCHW fold onto CUDA's GroupNorm kernel (N = 1, B·G groups), the
  channels_last path, and the upcast of bf16/fp16 inputs that only runs off a CPU.
- The upsampling convolution's reformulation under cuDNN, and the 1×1 convolution (plain there), fp32 and autocast.
- Attention: SDPA's CUDA kernels and xformers (when installed), with text padding masks, forward and backward.
- The U-Net: a bf16 / fp16 autocast training step follows fp32; gradient checkpointing changes nothing; torch.compile.
- The jobs on CUDA: training with bf16 mixed precision, then sampling in bf16 and fp16 from its export; the
  shipped recipes (ZeRO-2 launch file with the base64 config in bf16 and fp16; one GPU, bf16 + torch.compile) under
  accelerate launch.
- Likelihood (`evaluate.py nll`) on the GPU against the CPU.
- Latent diffusion: the VAE in bf16 by default on a GPU (close to fp32; fp16 for a force_upcast VAE is warned
  about); the 256 px latent recipe, shrunk, from image shards and from latent shards precomputed on the GPU.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import attention as attn_mod
from models import build_model
from models.attention import attention, naive_attention, select_backend, xformers_available, xformers_problem
from models.layers import UpsampleConv
from models.norm_act import group_norm_silu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def exact_fp32():
    """Plain fp32 matmuls and convolutions (no TF32), so fp32 results can be compared tightly."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _norm_inputs(dtype, channels_last, b=3, c=64, hw=(9, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = nn.GroupNorm(32, c)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c, generator=g)), norm.bias.copy_(torch.randn(c, generator=g))
    x = torch.randn(b, c, *hw, generator=g) * 3 + 1
    ss = [torch.randn(b, c, 1, 1, generator=g) * 0.5 for _ in range(2)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return norm.cuda(), x.cuda().to(dtype).contiguous(memory_format=fmt), [s.cuda() for s in ss]


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("scale_shift", [False, True])
def test_group_norm_silu_on_cuda_follows_float64(dtype, channels_last, scale_shift):
    """Low-precision x with fp32 parameters (as under autocast) takes the upcast path; only x is saved."""
    norm, x0, ss0 = _norm_inputs(dtype, channels_last)
    x = x0.clone().requires_grad_()
    ss = [s.clone().requires_grad_() for s in ss0] if scale_shift else []
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = group_norm_silu(x, norm, *ss)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last if channels_last else
                                                    torch.contiguous_format)
    assert [t.dtype for t in saved if t.numel() == x.numel()] == [dtype]  # x alone, in its own precision
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).cuda()
    got = torch.autograd.grad(out, [x, norm.weight, norm.bias, *ss], gy.to(dtype))

    ref_norm = nn.GroupNorm(32, x.shape[1]).cuda().double()
    ref_norm.load_state_dict(norm.state_dict())
    leaves = [t.detach().double().requires_grad_() for t in (x0, *ss0[:len(ss)])]
    h = ref_norm(leaves[0])
    ref = F.silu(torch.addcmul(leaves[2], h, 1 + leaves[1]) if ss else h)
    want = torch.autograd.grad(ref, [leaves[0], ref_norm.weight, ref_norm.bias, *leaves[1:]], gy.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(out, ref) < tol
    for a, b in zip(got, want):
        assert rel(a, b) < tol


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("cls, k", [(UpsampleConv, 3)])
def test_conv_reformulations_on_cuda(cls, k, fmt):
    torch.manual_seed(0)
    ours = cls(32, 48).cuda()
    ref = nn.Conv2d(32, 48, k, padding=k // 2).cuda()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 32, 8, 8, device="cuda").contiguous(memory_format=fmt)
    direct = (lambda z: ref(F.interpolate(z, scale_factor=2.0, mode="nearest"))) if cls is UpsampleConv else ref
    torch.testing.assert_close(ours(x), direct(x), atol=1e-4, rtol=1e-4)
    xr = x.clone().requires_grad_()
    a = torch.autograd.grad(ours(xr).square().sum(), [xr, ours.weight, ours.bias])
    b = torch.autograd.grad(direct(xr).square().sum(), [xr, ref.weight, ref.bias])
    for u, v in zip(a, b):
        assert rel(u, v) < 1e-5
    for dtype in HALF:
        with torch.autocast("cuda", dtype=dtype):
            out = ours(x)
        assert out.dtype == dtype and rel(out, direct(x)) < 1e-2


def _qkv(dtype, b=3, heads=4, lq=64, lk=77, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, lq, d, generator=g)
    k, v = torch.randn(b, heads, lk, d, generator=g), torch.randn(b, heads, lk, d, generator=g)
    mask = torch.arange(lk)[None].expand(b, -1) < torch.tensor([[5], [lk], [1]])  # captions of 5, 77 and 1 tokens
    return [t.cuda().to(dtype) for t in (q, k, v)], mask.cuda()


XFORMERS_RUNS = torch.cuda.is_available() and xformers_available() and xformers_problem(torch.device("cuda")) is None
BACKENDS_ON_CUDA = ["sdpa", "math", pytest.param("xformers", marks=pytest.mark.skipif(
    not XFORMERS_RUNS, reason="xformers is not installed, or does not run on this GPU"))]


@pytest.mark.parametrize("backend", BACKENDS_ON_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_backends_on_cuda_follow_float64(backend, dtype, masked):
    """77 text tokens (not a multiple of 8, as xformers' biases need) with padding; values and gradients."""
    (q, k, v), mask = _qkv(dtype)
    mask = mask if masked else None
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, mask=mask, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*ref_leaves, mask)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).cuda()
    got = torch.autograd.grad(out, leaves, gy.to(dtype))
    want = torch.autograd.grad(ref, ref_leaves, gy.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(out, ref) < tol
    for a, b in zip(got, want):
        assert rel(a, b) < tol


def test_auto_backend_on_cuda_is_xformers_when_it_runs_else_sdpa():
    want = "xformers" if XFORMERS_RUNS else "sdpa"
    assert select_backend("auto", torch.device("cuda")) == want
    assert select_backend("auto", torch.device("cpu")) == "sdpa"


def _model_and_batch(**kw):
    m = build_model("tiny", context_dim=64, pooled_dim=64, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():  # break the zero-initialised output layers so that every weight matters
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    mask = torch.arange(12)[None].expand(2, -1) < torch.tensor([[5], [12]])
    cond = {"tokens": torch.randn(2, 12, 64, generator=g), "mask": mask, "pooled": torch.randn(2, 64, generator=g)}
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([3, 700])
    return m.cuda(), (x.cuda(), t.cuda(), {k: v.cuda() for k, v in cond.items()})


def _step(m, data, dtype=None):
    m.zero_grad()
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = m(*data)
    out.float().pow(2).mean().backward()
    return out.float().detach(), torch.cat([p.grad.flatten() for p in m.parameters()])


@pytest.mark.parametrize("channels_last", [False, True])
def test_unet_autocast_training_step_on_cuda_follows_fp32(channels_last):
    m, (x, t, c) = _model_and_batch()
    if channels_last:
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    out32, grad32 = _step(m, (x, t, c))
    for dtype in HALF:
        out, grad = _step(m, (x, t, c), dtype)
        assert torch.isfinite(grad).all()
        assert rel(out, out32) < 0.03 and rel(grad, grad32) < 0.05, dtype


def test_gradient_checkpointing_on_cuda_gives_the_same_gradients():
    m, data = _model_and_batch()
    out_a, grad_a = _step(m, data)
    m.cfg.gradient_checkpointing = True
    out_b, grad_b = _step(m, data)
    torch.testing.assert_close(out_b, out_a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_b, grad_a, atol=1e-6, rtol=1e-5)


def test_compiled_unet_on_cuda_follows_eager(monkeypatch):
    """inductor's Triton kernels for the U-Net (train.compile on a GPU): one graph, eager's output and gradients."""
    torch._dynamo.reset()
    m, data = _model_and_batch()
    out_a, grad_a = _step(m, data, torch.bfloat16)
    monkeypatch.setattr(attn_mod, "_logged", set())
    compiled = torch.compile(m, fullgraph=True)
    out_b, grad_b = _step(compiled, data, torch.bfloat16)
    assert rel(out_b, out_a) < 0.02 and rel(grad_b, grad_a) < 0.03


@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def test_deterministic_runs_and_resume_on_cuda_are_exact(tmp_path, restore_determinism):
    """train.deterministic=true: two runs from one seed, and a run resumed half-way, end with the same weights bit
    for bit on a GPU (without it, atomics in the convolutions' backward make runs differ in the last bits)."""
    from safetensors.torch import load_file

    from data.write_shards import write_toy
    from pipeline import train

    write_toy(tmp_path / "shards", count=64, resolution=16, max_samples=16)

    def run(name, steps, *extra):
        train.main(["--config", str(ROOT / "launch/configs/demo.yaml"), "--output-dir", str(tmp_path / name),
                    "--max-steps", str(steps), f"data.shards={tmp_path / 'shards'}", "data.resolution=16",
                    "data.num_workers=0", "optim.batch_size=8", "optim.mixed_precision=bf16", "logging.tracker=none",
                    "logging.sample_every=0", "logging.sample_steps=2", "checkpoint.every=4",
                    "train.deterministic=true", *extra])
        return tmp_path / name / "checkpoints" / f"step_{steps:08d}"

    a, b = run("a", 8), run("b", 8)
    run("c", 4)
    c = run("c", 8, "--resume", "latest")
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb, wc = (load_file(str(d / name)) for d in (a, b, c))
        for k in wa:
            assert torch.equal(wa[k], wb[k]) and torch.equal(wa[k], wc[k]), (name, k)


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    """A short training run on the GPU with bf16 mixed precision (Accelerate picks CUDA by itself)."""
    from data.write_shards import write_toy
    from pipeline import train

    tmp = tmp_path_factory.mktemp("cuda_run")
    write_toy(tmp / "shards", count=64, resolution=16, max_samples=16)
    train.main(["--config", str(ROOT / "launch/configs/demo.yaml"), "--output-dir", str(tmp / "run"), "--max-steps", "8",
                f"data.shards={tmp / 'shards'}", "data.resolution=16", "data.num_workers=0",
                "optim.batch_size=8", "optim.mixed_precision=bf16", "logging.tracker=none", "logging.every=4",
                "logging.sample_every=0", "logging.sample_steps=2", "checkpoint.every=4", "optim.lr=3e-3"])
    return tmp / "run"


def _sample(run, out, *extra):
    import numpy as np
    from PIL import Image

    from pipeline import sample

    out = sample.main(["--model", str(run / "model"), "--out", str(out), "--steps", "4", "--device", "cuda",
                       "--prompt", "a red circle", "--prompt", "a small blue square at the top left", *extra])
    assert (out / "grid.png").is_file()
    return {p.name: np.asarray(Image.open(p), dtype=np.float64) for p in sorted((out / "images").glob("*.png"))}


def test_train_then_sample_on_cuda(cuda_run, tmp_path):
    """Finite losses, a checkpoint and the last step's sample grid from the GPU run; the sampling script in fp32,
    bf16 and fp16 from its export, whose low-precision images follow the fp32 ones (same seeds)."""
    import numpy as np

    metrics = [json.loads(line) for line in (cuda_run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) and m["nan_skips"] == 0 for m in metrics)
    assert (cuda_run / "checkpoints" / "step_00000008" / "train_state.json").is_file()
    assert (cuda_run / "samples" / "step_00000008.png").is_file()
    pics = {p: _sample(cuda_run, tmp_path / p, "--num-images", "2", "--precision", p) for p in ("fp32", "bf16", "fp16")}
    assert len(pics["fp32"]) == 4
    for precision in ("bf16", "fp16"):
        diff = np.mean([np.abs(pics[precision][k] - pics["fp32"][k]).mean() for k in pics["fp32"]])
        assert diff < 8, (precision, diff)


def test_images_on_cuda_barely_depend_on_the_batch_size(cuda_run, tmp_path):
    """On a CPU an image is bit-identical whatever batch it was made in (tests/test_sample.py). GPU kernels choose
    other algorithms for other batch sizes, so on a GPU the same seed gives the same image up to rounding: at most
    a few uint8 levels, in few pixels."""
    import numpy as np

    common = ["--num-images", "2", "--seed", "7"]
    a, b = _sample(cuda_run, tmp_path / "a", *common, "--batch-size", "4"), _sample(cuda_run, tmp_path / "b", *common, "--batch-size", "1")
    other = _sample(cuda_run, tmp_path / "c", "--num-images", "2", "--seed", "8")
    diff = np.stack([np.abs(a[k] - b[k]) for k in a])
    assert diff.max() <= 4 and (diff > 0).mean() < 0.05, (diff.max(), (diff > 0).mean())
    assert np.mean([np.abs(a[k] - other[k]).mean() for k in a]) > 10 * diff.mean() + 1  # another seed: other images


def test_likelihood_on_cuda_follows_the_cpu(cuda_run):
    """`evaluate.py nll` on the GPU (the U-Net in fp32, probes and dequantisation drawn on the CPU from per-image
    seeds): the same bits/dim as on the CPU up to the solver's tolerance and fp32 rounding."""
    import os
    import subprocess
    import sys

    from data.write_shards import write_toy
    from pipeline import evaluate

    held = cuda_run.parent / "held_nll"
    write_toy(held, count=4, resolution=16, seed=5, max_samples=4)
    args = ["nll", "--model", str(cuda_run / "model"), "--images", str(held / "00000.tar"), "--num-images", "4",
            "--elbo-timesteps", "20", "--rtol", "1e-5", "--atol", "1e-5", "--json"]
    gpu = evaluate.main(args)
    res = subprocess.run([sys.executable, "pipeline/evaluate.py", *args], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    cpu = json.loads(res.stdout.strip().splitlines()[-1])
    assert abs(gpu["bits_per_dim"] - cpu["bits_per_dim"]) < 1e-3
    assert abs(gpu["elbo_bits_per_dim"] - cpu["elbo_bits_per_dim"]) < 1e-3


@pytest.mark.parametrize("launch_file,precision,extra", [
    ("8gpu_zero2.yaml", "bf16", []),                  # the flagship: base64 recipe, bf16, DeepSpeed ZeRO-2
    ("8gpu_zero2.yaml", "fp16", []),                  # DeepSpeed's fp16 (its loss scaler): GPUs only
    ("1gpu.yaml", "bf16", ["train.compile=true"]),   # bf16 + torch.compile
])
def test_recipes_run_on_cuda(launch_file, precision, extra, tmp_path):
    """The shipped recipes in bf16 / fp16 on the GPU(s) here, launched as users launch them (accelerate launch), the
    base64 config shrunk to a few steps: finite losses, identical replicas, an export, and a resume that continues."""
    import os
    import subprocess
    import sys

    from data.write_shards import write_toy
    from helpers import free_port

    write_toy(tmp_path / "shards", count=64, resolution=16, max_samples=16)
    nproc = 1 if launch_file == "1gpu.yaml" else min(2, torch.cuda.device_count())
    run = tmp_path / "run"
    args = ["--config", "launch/configs/base64.yaml", "--output-dir", str(run), f"data.shards={tmp_path / 'shards'}",
            "data.resolution=16", "data.min_size=16", "data.num_workers=1", "data.shuffle_buffer=64",
            "data.epoch_samples=1000", "optim.batch_size=4", "optim.warmup_steps=2", "model.overrides.base_channels=32",
            "model.overrides.head_channels=32", "text_encoder.name=toy-clip",
            "text_encoder.config_file=launch/configs/clip/toy-clip.json", "text_encoder.pretrained=null",
            f"optim.mixed_precision={precision}", "logging.tracker=none", "logging.every=1", "logging.sample_every=0",
            "logging.sample_steps=2", "checkpoint.every=2", *extra]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/accelerate/{launch_file}",
           "--num_processes", str(nproc), "--main_process_port", str(free_port()), "pipeline/train.py"]
    for max_steps, resume in [("2", []), ("4", ["--resume", "latest"])]:
        res = subprocess.run([*cmd, *args, "--max-steps", max_steps, *resume], cwd=ROOT, capture_output=True,
                             text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "4"})
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
        assert f"precision {precision}" in res.stdout + res.stderr
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["nan_skips"] == 0 and m["loss"] == m["loss"] for m in metrics)
    assert metrics[-1]["optimizer_steps"] + metrics[-1]["overflow_skips"] == 4  # fp16's scaler may skip early steps
    assert metrics[-1]["optimizer_steps"] >= 2 and (precision == "fp16" or metrics[-1]["overflow_skips"] == 0)
    ranks = [json.loads(p.read_text()) for p in (run / "checkpoints" / "step_00000004" / "data").glob("rank*.json")]
    assert len(ranks) == nproc and len({r["weights_checksum"] for r in ranks}) == 1
    assert (run / "model" / "unet.safetensors").is_file()


def test_vae_on_cuda_defaults_to_bf16_and_follows_fp32(tmp_path):
    """autoencoder.dtype=auto on a GPU with bf16: the VAE runs in bf16 (never fp16 unless asked), its encode and
    decode follow fp32 closely; fp16, when asked for a force_upcast VAE, is warned about."""
    import logging

    from helpers import make_vae
    from models.autoencoder import AutoencoderConfig, load_autoencoder

    folder = make_vae(tmp_path / "vae")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "force_upcast": True}))
    ref = load_autoencoder(AutoencoderConfig(path=str(folder), dtype="fp32"), "cuda")
    auto = load_autoencoder(AutoencoderConfig(path=str(folder)), "cuda")
    assert auto.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    x = torch.rand(4, 3, 64, 64, device="cuda") * 2 - 1
    z, z_ref = auto.encode(x), ref.encode(x)
    assert rel(z, z_ref) < 2e-2 and rel(auto.decode(z_ref), ref.decode(z_ref)) < 2e-2
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("models.autoencoder").addHandler(handler)
    try:
        load_autoencoder(AutoencoderConfig(path=str(folder), dtype="fp16"), "cuda")
    finally:
        logging.getLogger("models.autoencoder").removeHandler(handler)
    assert any("force_upcast" in r.getMessage() for r in records)


def test_latent_recipe_runs_on_cuda(tmp_path):
    """The 256 px latent recipe shrunk (a small random VAE, 32 px, a two-level `sd` U-Net), bf16 on one GPU, from image
    shards (live encoding) and from latent shards precomputed on the GPU: finite losses, an export with its VAE."""
    from data.write_shards import write_toy
    from helpers import TINY_SD_OVERRIDES, make_vae
    from pipeline import precompute, train

    write_toy(tmp_path / "shards", count=64, resolution=32, max_samples=16)
    common = [f"data.shards={tmp_path / 'shards'}", "data.resolution=32", "data.min_size=16", "data.num_workers=1",
              "data.epoch_samples=1000", f"autoencoder.path={make_vae(tmp_path / 'vae')}", "optim.batch_size=8",
              *TINY_SD_OVERRIDES, "text_encoder.kind=openclip",
              "text_encoder.name=toy-clip", "text_encoder.config_file=launch/configs/clip/toy-clip.json",
              "logging.tracker=none", "logging.every=1", "logging.sample_every=0", "logging.sample_steps=2"]
    config = ["--config", str(ROOT / "launch/configs/latent256.yaml")]
    precompute.main(["latents", *config, "--out", str(tmp_path / "latents"), "--device", "cuda", *common])
    for name, data in [("live", []), ("shards", [f"data.shards={tmp_path / 'latents'}"])]:
        run = tmp_path / name
        train.main([*config, "--output-dir", str(run), "--max-steps", "3",
                    *[c for c in common if not (data and c.startswith("data.shards="))], *data])
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(m["loss"] == m["loss"] and m["nan_skips"] == 0 for m in metrics)
        # the bundled VAE is the original in fp32 (the one in use was bf16), and samples decode through it in bf16
        from pipeline.checkpoint import load_exported

        _, _, _, vae, meta = load_exported(run / "model", "cuda")
        assert vae.fingerprint == meta["autoencoder"]["fingerprint"]
        pics = _sample(run, tmp_path / f"samples_{name}", "--precision", "bf16")
        assert all(p.shape == (32, 32, 3) for p in pics.values())
