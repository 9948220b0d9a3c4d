"""Why does the latent demo follow its prompts less as guidance grows? Attribute accuracy of the quickstart's latent
model at guidance 1, 3 and 5 under sampling-time variants, on the same held-out captions and seeds.

    python benchmarks/bench_latent_guidance.py --run runs/quickstart [--images 256] [--variants none rescale range]

Variants: ``none`` (the quickstart's: latents unclipped), ``rescale`` (guidance rescale φ = 0.7, Lin et al. 2024),
``range`` (x̂₀ clamped per channel to the range of the training latents, the latent analogue of the pixel run's
clipping to [−1, 1]), ``threshold`` (Imagen's dynamic thresholding at p = 0.995). Also prints the latents'
per-channel statistics: a mean far from 0, or channels of very different spread, is what a single scaling factor
leaves behind. Figures in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import DataConfig, Loader  # noqa: E402
from data.folders import held_out_captions  # noqa: E402
from diffusion import Guidance, sample  # noqa: E402
from metrics.toy_attributes import attribute_accuracy  # noqa: E402
from pipeline.checkpoint import load_exported  # noqa: E402
from pipeline.generate import cond_to, image_seed, to_uint8  # noqa: E402


def latent_stats(shards: str, batches: int = 16) -> dict:
    loader = Loader(DataConfig(shards=shards, resolution=64, num_workers=0, shuffle_buffer=0), 64)
    it = iter(loader)
    z = torch.cat([next(it).latents.float() for _ in range(batches)])  # (N, C, h, w)
    per = z.transpose(0, 1).flatten(1)  # (C, N·h·w)
    return {"mean": per.mean(1), "std": per.std(1), "lo": per.quantile(0.001, dim=1), "hi": per.quantile(0.999, dim=1)}


@torch.no_grad()
def images(model, encoder, diffusion, vae, captions, scale: float, options: dict, steps: int, batch: int = 32):
    out = []
    for i in range(0, len(captions), batch):
        caps = captions[i:i + batch]
        gens = [torch.Generator().manual_seed(image_seed(0, i + j, 0)) for j in range(len(caps))]
        noise = torch.stack([torch.randn(vae.channels, 16, 16, generator=g) for g in gens])
        cond = cond_to(encoder.encode(caps), "cpu")
        g = Guidance(scale=scale, uncond=cond_to(encoder.encode([""] * len(caps)), "cpu"), **options)
        x = sample("ddim", lambda x, t, c: model(x, t, c).float(), noise, diffusion, steps=steps, cond=cond,
                   guidance=g, generator=gens)
        out += [np.asarray(im) for im in to_uint8(vae.decode(x)).permute(0, 2, 3, 1).numpy()]
    from PIL import Image

    return [Image.fromarray(a) for a in out]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/quickstart", help="the quickstart's output folder")
    p.add_argument("--model", help="the latent model (default: RUN/latent_run/model)")
    p.add_argument("--latents", help="its latent shards (default: RUN/toy64_latents)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    p.add_argument("--variants", nargs="+", default=["none", "rescale", "range", "threshold"])
    args = p.parse_args()
    torch.set_num_threads(2)
    run = Path(args.run)
    model, encoder, diffusion, vae, _ = load_exported(args.model or run / "latent_run" / "model")
    stats = latent_stats(args.latents or str(run / "toy64_latents"))
    print("latent channel  mean  std  0.1%  99.9%")
    for c in range(len(stats["mean"])):
        print(f"  {c}  {stats['mean'][c]:+.3f}  {stats['std'][c]:.3f}  {stats['lo'][c]:+.3f}  {stats['hi'][c]:+.3f}")
    captions = held_out_captions(str(run / "held_out64" / "00000.tar"), args.images)
    variants = {"none": {}, "rescale": {"rescale": 0.7}, "range": {"x0_range": (stats["lo"], stats["hi"])},
                "threshold": {"dynamic_threshold": 0.995}}
    print("| variant | " + " | ".join(f"all @ w={g:g} | colour | background" for g in args.guidance) + " |")
    for name in args.variants:
        cells = []
        for w in args.guidance:
            ims = images(model, encoder, diffusion, vae, captions, w, variants[name], args.steps)
            acc = attribute_accuracy(ims, captions)
            cells += [f"{100 * acc['all']:.0f}%", f"{100 * acc['colour']:.0f}%", f"{100 * acc['background']:.0f}%"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
