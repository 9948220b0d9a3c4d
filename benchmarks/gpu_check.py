"""The GPU check kit: the GPU-only paths run once, and the recipes' real speed beside a plain PyTorch loop.

    python benchmarks/gpu_check.py pack                      # on this (CPU) machine: what the GPU machine lacks
    python benchmarks/gpu_check.py run --out OUT             # on a one-GPU machine, ≤ 9 minutes
    python benchmarks/gpu_check.py run --dry-run --out OUT   # anywhere: tiny sizes, a few steps (tested in CI)

``pack`` installs the pure-Python packages a bare GPU machine may lack (diffusers, open_clip_torch, webdataset,
ema-pytorch, timm, ftfy) into ``gpu_kit/`` (ignored by git, < 64 MiB), which travels with the working tree; ``run``
puts it on the path. ``run`` then, with a time budget per part:

1. ``pytest tests/test_gpu.py`` (the CUDA paths against float64 references, bf16/fp16 steps, compile, the jobs on
   CUDA; parts whose packages are missing skip themselves);
2. training-step benchmarks in bf16, eager and ``torch.compile``: (a) the own U-Net ``base`` at 64 px, (b) Stable
   Diffusion 2.x's U-Net (``sd2``, SD2-base's architecture, as mosaicml's figures) on 32×32×4 and 64×64×4 latents (256 and 512 px) through this project's loss and
   optimiser, and (c) the same network driven by a plain PyTorch loop as diffusers' ``train_text_to_image.py`` does
   (DDPMScheduler.add_noise, ``unet(...).sample``, MSE, AdamW): images/s, FLOPs per image counted by
   ``torch.utils.flop_counter`` (not guessed), MFU against the card's dense bf16 peak, peak memory; a profile of the
   SD 256 px step (the top CUDA kernels) beside it;
3. the latent 256 recipe through the real job: latents precomputed from toy shards with an SD-architecture VAE and
   CLIP ViT-L text tower (random weights: nothing is downloaded), then a few hundred steps of
   ``accelerate launch pipeline/train.py --config launch/configs/latent256.yaml`` on one GPU.

Output: ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (a table to paste into benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "gpu_kit"
PACKAGES = ["diffusers", "open_clip_torch", "webdataset", "ema-pytorch", "timm", "ftfy", "braceexpand", "wcwidth"]
# Dense bf16 tensor-core peaks (TFLOP/s), from NVIDIA's data sheets: MFU is measured against these.
PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
MOSAIC = {256: 137.5, 512: 36.3}  # mosaicml's SD2-base U-Net on precomputed latents, images/s per A100 (8 GPUs)


def pack(out: Path = KIT / "site") -> Path:
    """pip install --target: pure-Python wheels only (no torch, no compiled packages), their size checked."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:", "--target",
                    str(out), *PACKAGES], check=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    print(f"packed {', '.join(PACKAGES)} into {out}: {size:.1f} MiB")
    if size > 64:
        raise SystemExit(f"the kit is {size:.0f} MiB, over the 64 MiB that travel to the device machine")
    return out


# --- step benchmarks ----------------------------------------------------------------------------------------------

def _cases(dry: bool):
    """(name, U-Net size or diffusers config, input (C, H, W), token width, batch)."""
    if dry:
        from models.registry import SIZES  # noqa: F401

        tiny_sd = {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
                   "attention_head_dim": 2, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
        return [("own tiny, 16 px", "tiny", {}, (3, 16, 16), 64, 2),
                ("SD U-Net (tiny), 8×8×4", "sd", tiny_sd, (4, 8, 8), 32, 2)]
    # SD 2.x's U-Net (1024-wide tokens): the architecture of mosaicml's SD2-base figures
    return [("own `base`, 64 px", "base", {}, (3, 64, 64), 768, 64),
            ("SD 2.x U-Net, 256 px (32×32×4)", "sd2", {}, (4, 32, 32), 1024, 64),
            ("SD 2.x U-Net, 512 px (64×64×4)", "sd2", {}, (4, 64, 64), 1024, 16)]


def _flops_per_image(model, x, t, cond) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(x[:1], t[:1], {k: v[:1] for k, v in cond.items()}).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _time(step, steps: int, warmup: int, device) -> float:
    import torch

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def bench_case(name, size, overrides, shape, width, batch, compile_: bool, plain: bool, steps: int, warmup: int,
               device) -> dict:
    """Images/s, FLOPs/image, peak memory of one training step (bf16 autocast; fused AdamW)."""
    import torch

    from diffusion import DiffusionConfig, GaussianDiffusion
    from models.registry import build_model

    torch.manual_seed(0)
    model = build_model(size, in_channels=shape[0], context_dim=width, pooled_dim=width, **overrides).to(device)
    x = torch.randn(batch, *shape, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    cond = {"tokens": torch.randn(batch, 77, width, device=device),
            "mask": torch.ones(batch, 77, dtype=torch.bool, device=device),
            "pooled": torch.randn(batch, width, device=device)}
    flops = _flops_per_image(model, x, t, cond)
    bf16 = device.type == "cuda"
    if plain:  # diffusers' training example: the bare UNet2DConditionModel, DDPMScheduler, F.mse_loss
        from diffusers import DDPMScheduler

        unet = model.unet
        sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
        net = torch.compile(unet) if compile_ else unet

        def loss_fn():
            noise = torch.randn_like(x)
            noisy = sched.add_noise(x, noise, t)
            return torch.nn.functional.mse_loss(net(noisy, t, cond["tokens"]).sample.float(), noise)
        params = unet.parameters()
    else:  # this project's: the diffusion core's loss through the U-Net wrapper
        diffusion = GaussianDiffusion.from_config(DiffusionConfig(schedule="scaled_linear"))
        if compile_:
            model.compile()

        def loss_fn():
            return diffusion.training_losses(model, x, cond)["loss"].mean()
        params = model.parameters()
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = _time(step, steps, warmup, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    row = {"case": name, "driver": "plain PyTorch loop (diffusers' example)" if plain else "this project",
           "compile": compile_, "batch": batch, "images_per_s": batch / seconds, "step_s": seconds,
           "gflops_per_image": flops / 1e9, "peak_gib": peak}
    peak_tflops = _peak_tflops(device)
    row["mfu"] = flops * row["images_per_s"] / (peak_tflops * 1e12) if peak_tflops else None
    return row


def _peak_tflops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def profile_case(out: Path, device, dry: bool) -> str:
    """The top kernels of a few SD 256 px steps (CUDA time; CPU time on a CPU), as a text table."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from diffusion import DiffusionConfig, GaussianDiffusion
    from models.registry import build_model

    name, size, overrides, shape, width, batch = _cases(dry)[1]
    model = build_model(size, in_channels=shape[0], context_dim=width, **overrides).to(device)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(schedule="scaled_linear"))
    x = torch.randn(batch, *shape, device=device)
    cond = {"tokens": torch.randn(batch, 77, width, device=device)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = diffusion.training_losses(model, x, cond)["loss"].mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=15)
    (out / "profile_sd256.txt").write_text(f"{name}, batch {batch}, 3 steps\n{table}\n")
    return table


# --- the recipe through the real job ------------------------------------------------------------------------------

def sd_parts(folder: Path, dry: bool) -> tuple[Path, Path]:
    """A random VAE of SD's architecture and a random CLIP ViT-L/14 text tower with CLIP's tokenizer (local folders)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.autoencoder import FAMILIES
    from models.stable_diffusion import TEXT_CONFIGS, clip_tokenizer

    torch.manual_seed(0)
    cfg = {k: v for k, v in FAMILIES["sd"].items() if not k.startswith("_")}
    text_cfg = dict(TEXT_CONFIGS["sd1"])
    if dry:
        cfg.update(block_out_channels=[8, 8, 8], layers_per_block=1, norm_num_groups=4,
                   down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)
        text_cfg.update(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    AutoencoderKL(**cfg).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(**text_cfg)).save_pretrained(folder / "clip")
    clip_tokenizer().save_pretrained(folder / "clip")
    return folder / "vae", folder / "clip"


def recipe(out: Path, dry: bool, steps: int, budget: int) -> dict:
    """latent256.yaml through `accelerate launch` on one device: precompute, then train; images/s from the job."""
    from data.write_shards import write_toy

    work = out / "recipe"
    res = 32 if dry else 256
    write_toy(work / "shards", count=64 if dry else 2048, resolution=res, max_samples=16 if dry else 256)
    vae, clip = sd_parts(work, dry)
    common = [f"data.shards={work / 'shards'}", f"data.resolution={res}", f"data.min_size={res}", "data.num_workers=2",
              f"autoencoder.path={vae}", f"text_encoder.name={clip}", "logging.tracker=none", "logging.every=25",
              "logging.sample_every=0", "logging.sample_steps=2", "checkpoint.every=100000",
              "optim.batch_size=4" if dry else "optim.batch_size=64"]
    if dry:
        common += ["model.overrides.block_out_channels=[16, 32]", "model.overrides.layers_per_block=1",
                   "model.overrides.norm_num_groups=8", "model.overrides.attention_head_dim=2",
                   "model.overrides.down_block_types=[CrossAttnDownBlock2D, DownBlock2D]",
                   "model.overrides.up_block_types=[UpBlock2D, CrossAttnUpBlock2D]", "optim.mixed_precision=no",
                   "data.epoch_samples=64"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    if not dry:
        launch += ["--config_file", "launch/accelerate/1gpu.yaml"]
    cfg = ["--config", "launch/configs/latent256.yaml"]
    t0 = time.perf_counter()
    subprocess.run([*launch, "pipeline/precompute.py", "latents", *cfg, "--out", str(work / "latents"), *common],
                   cwd=ROOT, check=True, timeout=budget)
    precompute_s = time.perf_counter() - t0
    run = work / "run"
    subprocess.run([*launch, "pipeline/train.py", *cfg, "--output-dir", str(run), "--max-steps", str(steps),
                    *[c for c in common if not c.startswith("data.shards=")], f"data.shards={work / 'latents'}"],
                   cwd=ROOT, check=True, timeout=budget)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    return {"steps": steps, "precompute_s": precompute_s, "images_per_s": rows[-1]["images_per_s"],
            "data_wait_fraction": rows[-1]["data_wait_fraction"], "final_loss": rows[-1]["loss"]}


# --- the run ------------------------------------------------------------------------------------------------------

def run(out: Path, dry: bool) -> dict:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "dry_run": dry, "peak_bf16_tflops": _peak_tflops(device)}
    start = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x" if dry else "-q", "tests/test_gpu.py",
                            f"--junitxml={out / 'test_gpu.xml'}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60 if dry else 300)
    report["test_gpu"] = {"returncode": tests.returncode, "summary": tests.stdout.strip().splitlines()[-1:]}
    (out / "test_gpu.log").write_text(tests.stdout + tests.stderr)
    rows = []
    steps, warmup = (2, 1) if dry else (20, 5)
    for name, size, overrides, shape, width, batch in _cases(dry):
        for compile_ in (False, True):
            drivers = [False, True] if size in ("sd", "sd2") else [False]
            for plain in drivers:
                try:
                    rows.append(bench_case(name, size, overrides, shape, width, batch, compile_, plain, steps,
                                           warmup, device))
                except Exception as e:  # noqa: BLE001 — one failing case must not hide the others
                    rows.append({"case": name, "compile": compile_, "plain": plain, "error": repr(e)[:300]})
            if dry:
                break  # compile on a CPU takes minutes: the dry run checks the eager paths
    report["steps"] = rows
    report["profile"] = profile_case(out, device, dry).splitlines()[:20]
    report["recipe"] = recipe(out, dry, 5 if dry else 300, 60 if dry else 240)
    report["seconds"] = time.perf_counter() - start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    lines = [f"GPU check on {report['device']} (torch {report['torch']}{', dry run' if report['dry_run'] else ''}): "
             f"tests/test_gpu.py → {' '.join(report['test_gpu']['summary']) or report['test_gpu']['returncode']}", "",
             "| case | driver | compile | batch | images/s | GFLOPs/img | MFU | peak GiB |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in report["steps"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {'plain' if r['plain'] else 'this project'} | {r['compile']} | | "
                         f"error: {r['error'][:80]} | | | |")
            continue
        lines.append(f"| {r['case']} | {r['driver']} | {'yes' if r['compile'] else 'no'} | {r['batch']} | "
                     f"{r['images_per_s']:.1f} | {r['gflops_per_image']:.1f} | {f(r['mfu'], '.0%')} | "
                     f"{f(r['peak_gib'], '.1f')} |")
    rec = report["recipe"]
    lines += ["", f"latent256.yaml through `accelerate launch` on one device, {rec['steps']} steps on precomputed "
              f"latents: {rec['images_per_s']:.1f} images/s (data wait {100 * rec['data_wait_fraction']:.0f}%; "
              f"mosaicml's published SD2-base figure: {MOSAIC[256]} images/s per A100 at 256 px, {MOSAIC[512]} at 512)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("pack", help="install the pure-Python packages a bare GPU machine lacks into gpu_kit/site")
    r = sub.add_parser("run", help="run the checks and benchmarks; write OUT/gpu_check.json and .md")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--dry-run", action="store_true", help="tiny sizes and a few steps, on the CPU (what CI runs)")
    args = p.parse_args(argv)
    if args.command == "pack":
        return pack()
    site = KIT / "site"
    if site.is_dir():  # the packed packages, for this process and the ones it starts
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, str(ROOT))
    return run(Path(args.out), args.dry_run)


if __name__ == "__main__":
    main()
