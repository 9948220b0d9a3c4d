"""Train a small VAE (diffusers' ``AutoencoderKL``) on image shards: the frozen autoencoder of the latent demo.

    python pipeline/train_vae.py --shards "toy64/{00000..00007}.tar" --resolution 64 --out runs/toy_vae [--steps 600]

Loss: reconstruction (mean squared error of the pixels) + ``--kl`` × KL(q(z|x) ‖ N(0, I)) (Kingma & Welling 2014;
the small weight of Rombach et al. 2022, who add a perceptual and an adversarial term: neither network is available
offline, and the toy images' flat colours and hard edges do not need them). The folder written is a
``save_pretrained`` VAE carrying the per-channel mean and standard deviation of the posterior means over a batch of
training images (``latents_mean`` / ``latents_std``: the latents are standardised channel by channel, a per-channel
form of Rombach et al.'s 1/std scale), so that ``autoencoder.path=OUT`` needs nothing else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import DataConfig, Loader  # noqa: E402

log = logging.getLogger("train_vae")
# 64 px → 16 × 16 × 4 (factor 4), 0.23M parameters: ~0.3 s per step of 32 images on 2 CPU cores.
TOY_VAE = dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
               down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
               mid_block_add_attention=False)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="image shards (brace pattern, folder, list)")
    p.add_argument("--out", required=True, help="output folder (diffusers' save_pretrained layout)")
    p.add_argument("--resolution", type=int, default=64, help="training crops (px)")
    p.add_argument("--steps", type=int, default=600, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl", type=float, default=1e-5, help="weight of the KL term")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_toy_vae(latent_channels: int = 4, sample_size: int = 64):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**TOY_VAE, "latent_channels": latent_channels}, sample_size=sample_size)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)
    import time

    started = time.perf_counter()
    try:
        loader = Loader(DataConfig(shards=args.shards, resolution=args.resolution, num_workers=1, seed=args.seed),
                        args.batch_size, rank=0, world_size=1)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    vae = build_toy_vae(args.latent_channels, args.resolution)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    batches = iter(loader)
    bar = tqdm(range(args.steps), desc="train VAE", dynamic_ncols=True)
    for step in bar:
        x = next(batches).pixels()
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()  # per pixel value, as the reconstruction term
        loss = mse + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.2f}")
            log.info("step %d: reconstruction MSE %.5f (PSNR %.1f dB), KL %.3f", step, mse.item(),
                     10 * torch.log10(4 / mse).item(), kl.item())
    vae.eval()
    with torch.no_grad():
        x = torch.cat([next(batches).pixels() for _ in range(4)])
        z = vae.encode(x).latent_dist.mean
        # Per-channel statistics (diffusers' latents_mean / latents_std): one global scale left the toy latents'
        # channel means up to one standard deviation from 0 (benchmarks/README.md, the latent demo), which the
        # diffusion prior N(0, I) does not have; standardised channel by channel they are centred and of unit spread.
        per = z.transpose(0, 1).flatten(1)  # (C, N·h·w)
        vae.register_to_config(scaling_factor=1.0, latents_mean=per.mean(1).tolist(), latents_std=per.std(1).tolist())
        psnr = 10 * torch.log10(4 / torch.nn.functional.mse_loss(vae.decode(z).sample.clamp(-1, 1), x)).item()
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    vae.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps({"shards": args.shards, "steps": args.steps, "psnr_db": psnr,
                                                   "resolution": args.resolution, "kl_weight": args.kl,
                                                   "seconds": time.perf_counter() - started}))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    log.info("saved %s: PSNR %.1f dB on training images, latents_mean %s, latents_std %s", out, psnr,
             [round(v, 3) for v in vae.config.latents_mean], [round(v, 3) for v in vae.config.latents_std])
    return out


if __name__ == "__main__":
    main()
