"""Sampling throughput: images/s of every sampler at its default steps, and batched cond+uncond vs two forwards.

    python benchmarks/bench_sample.py [--model runs/demo/model] [--batch 16] [--guidance 3]

Without --model a randomly initialised `tiny` U-Net and toy text tower at 32 px are used (speed does not depend
on the weights).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from diffusion import DEFAULT_STEPS, SAMPLERS, DiffusionConfig, GaussianDiffusion  # noqa: E402
from models.registry import build_model  # noqa: E402
from models.text_encoders import TextEncoderConfig, build_text_encoder  # noqa: E402
from pipeline.checkpoint import load_exported  # noqa: E402
from pipeline.generate import generate  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an exported model folder (default: random tiny model)")
    p.add_argument("--batch", type=int, default=16, help="images per batch")
    p.add_argument("--guidance", type=float, default=3.0)
    args = p.parse_args()
    torch.manual_seed(0)
    if args.model:
        model, encoder, diffusion, vae, meta = load_exported(args.model)
        res = meta["resolution"]
    else:
        encoder = build_text_encoder(TextEncoderConfig(name="toy-clip", config_file=os.path.join(
            os.path.dirname(__file__), "..", "launch", "configs", "clip", "toy-clip.json")))
        model = build_model("tiny", context_dim=encoder.dim, pooled_dim=encoder.pooled_dim).eval()
        diffusion, res, vae = GaussianDiffusion.from_config(DiffusionConfig(schedule="cosine")), 32, None
    prompts = ["a large red circle in the center on a white background"] * args.batch
    print(f"{torch.get_num_threads()} threads, {res} px, batch {args.batch}, guidance {args.guidance}")
    print("| sampler | steps | forward calls (cond+uncond batched) | images/s |")
    print("|---|---:|---:|---:|")
    for name in SAMPLERS:
        steps = min(DEFAULT_STEPS[name] or diffusion.num_steps, diffusion.num_steps)
        calls = []
        real_forward = model.forward
        model.forward = lambda *a, **k: calls.append(1) or real_forward(*a, **k)
        t = time.perf_counter()
        generate(model, encoder, diffusion, prompts, list(range(args.batch)), res, guidance=args.guidance,
                 sampler=name, steps=steps, channels=model.cfg.in_channels, vae=vae)
        dt = time.perf_counter() - t
        model.forward = real_forward
        print(f"| {name} | {steps} | {len(calls)} | {args.batch / dt:.1f} |", flush=True)

    # One batched forward of cond + uncond (2B) vs two forwards of B.
    cond = encoder.encode(prompts)
    both = {k: torch.cat([v, v]) for k, v in cond.items()}
    size = res // vae.factor if vae is not None else res
    x, t = torch.randn(args.batch, model.cfg.in_channels, size, size), torch.full((args.batch,), 500)
    with torch.no_grad():
        for _ in range(2):
            model(torch.cat([x, x]), torch.cat([t, t]), both)
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            model(torch.cat([x, x]), torch.cat([t, t]), both)
        batched = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x, t, cond)
            model(x, t, cond)
        separate = (time.perf_counter() - t0) / reps
    print(f"\nguided step, batch {args.batch}: one batched forward {batched * 1e3:.1f} ms, two forwards "
          f"{separate * 1e3:.1f} ms (batched is {separate / batched:.2f}× faster)")


if __name__ == "__main__":
    main()
