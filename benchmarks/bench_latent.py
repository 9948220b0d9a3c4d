"""Latent diffusion's speed-up, measured through the real jobs: training images/s at one output resolution in pixel
space, in latent space with the VAE encoding every batch (live), and from precomputed latent shards; the VAE's
encode (precompute job) and decode images/s; bytes per sample on disk for each kind of shard.

    python benchmarks/bench_latent.py [--resolutions 64 256] [--steps 40] [--batch 32]

The same U-Net (`tiny`, the toy text tower) in all three runs: only its input channels and size differ. The VAEs
are random (speed does not depend on the weights): at 64 px the toy demo's (pipeline/train_vae.py, factor 4); at
256 px Stable Diffusion's architecture (factor 8) with a quarter of its widths (``--vae-width``; the full SD VAE
takes seconds per 256 px image on a 2-core CPU, so the live/precomputed ratio measured here understates a real
one). images/s is the job's own steady-state figure (the last logging window: the first steps are warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.write_shards import write_toy  # noqa: E402
from models.autoencoder import FAMILIES, AutoencoderConfig, load_autoencoder  # noqa: E402
from pipeline.train_vae import build_toy_vae  # noqa: E402


def make_vae(folder: Path, resolution: int, width: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    if resolution <= 64:
        vae = build_toy_vae(4, resolution)
    else:
        cfg = {k: v for k, v in FAMILIES["sd"].items() if not k.startswith("_")}
        cfg["block_out_channels"] = [int(c * width) for c in cfg["block_out_channels"]]
        vae = AutoencoderKL(**cfg)
    vae.save_pretrained(folder)
    return folder


def job(script: str, argv: list[str]) -> float:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, str(ROOT / "pipeline" / script), *argv], cwd=ROOT, capture_output=True,
                         text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return time.perf_counter() - t


def per_sample(folder: Path, count: int) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.tar")) / count


def bench(resolution: int, steps: int, batch: int, width: float, tmp: Path) -> list[str]:
    count = 8 * batch * 4
    shards = tmp / f"images{resolution}"
    write_toy(shards, count=count, resolution=resolution, max_samples=count // 8)
    vae_dir = make_vae(tmp / f"vae{resolution}", resolution, width)
    vae = load_autoencoder(AutoencoderConfig(path=str(vae_dir)))
    common = ["--config", str(ROOT / "launch/configs/demo_latent.yaml"), f"data.resolution={resolution}",
              "data.num_workers=1", "logging.tracker=none", f"logging.every={steps // 2}", "logging.sample_every=0",
              "logging.sample_steps=1", "logging.sample_per_prompt=1", f"checkpoint.every={10 * steps}",
              f"optim.batch_size={batch}"]
    vae_arg = f"autoencoder.path={vae_dir}"
    latents, rich = tmp / f"latents{resolution}", tmp / f"latents{resolution}_flip_text"
    encode_s = job("precompute.py", ["latents", *common[:2], "--out", str(latents), f"data.shards={shards}",
                                     *common[2:], vae_arg])
    job("precompute.py", ["latents", *common[:2], "--out", str(rich), "--flip", "--text", f"data.shards={shards}",
                          *common[2:], vae_arg])
    with torch.no_grad():  # decode: the sampling and evaluation jobs' last step
        z = torch.randn(batch, vae.channels, resolution // vae.factor, resolution // vae.factor)
        vae.decode(z[:2])
        t = time.perf_counter()
        vae.decode(z)
        decode = batch / (time.perf_counter() - t)
    rows, speeds = [], {}
    for label, extra in [("pixel space", [f"data.shards={shards}", "autoencoder.path=null"]),
                         ("latent, live encoding", [f"data.shards={shards}", vae_arg]),
                         ("latent, precomputed shards", [f"data.shards={latents}", vae_arg])]:
        out = tmp / f"run{resolution}_{len(speeds)}"
        job("train.py", [*common, "--output-dir", str(out), "--max-steps", str(steps), *extra])
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        speeds[label] = last["images_per_s"]
        rows.append(f"| {resolution} | {label} | {last['images_per_s']:.1f} | "
                    f"{last['images_per_s'] / speeds['pixel space']:.2f}× | {100 * last['data_wait_fraction']:.0f}% |")
    live, pre = speeds["latent, live encoding"], speeds["latent, precomputed shards"]
    rows.append(f"| {resolution} | precomputed vs live | | **{pre / live:.2f}×** | |")
    sizes = (f"{resolution} px: image shard {per_sample(shards, count) / 1024:.1f} KiB/sample, latent shard "
             f"{per_sample(latents, count) / 1024:.1f} KiB, latent + mirrored + caption embedding "
             f"{per_sample(rich, count) / 1024:.1f} KiB; VAE ({sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M, "
             f"{vae.channels}×{resolution // vae.factor}² latents) encode {count / encode_s:.1f} img/s (the whole "
             f"precompute job, start-up included), decode {decode:.1f} img/s")
    return rows, sizes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 256], help="output resolutions (px)")
    p.add_argument("--steps", type=int, default=40, help="optimiser steps per run; the last half is measured")
    p.add_argument("--batch", type=int, default=32, help="images per step (halved at each doubling above 64 px)")
    p.add_argument("--vae-width", type=float, default=0.25, help="above 64 px: SD VAE widths × this")
    args = p.parse_args()
    print(f"{torch.get_num_threads()} threads, {args.steps} steps per run")
    print("| px | training | img/s | vs pixel space | data wait |\n|---:|---|---:|---:|---:|")
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in args.resolutions:
            batch = max(4, args.batch * 64 // max(r, 64) // (2 if r > 64 else 1))
            rows, sizes = bench(r, args.steps, batch, args.vae_width, Path(tmp))
            print("\n".join(rows), flush=True)
            notes.append(f"batch {batch}; {sizes}")
    print("\n" + "\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
