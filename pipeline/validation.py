"""The validation loss: the training objective on held-out samples with fixed timesteps and noise, so that its curve
shows the model and not the draw (a training loss mixes every timestep's very different loss at random).

Held-out sample i (the first ``num_samples`` usable samples of ``validation.shards``, in shard order, through the
training data's transform) gets the timestep t_i = ⌊(i + u_i)·T/N⌋ (stratified: the N samples cover the T steps
evenly) and the noise ε_i, both from the run's seed and i alone. The per-sample losses are computed in fixed chunks of
``validation.batch_size`` dealt to the processes round-robin and gathered in index order: the same number for any
training batch size and any number of processes. Reported: ``val_loss`` (their mean) and ``val_loss/tA-B`` (the mean
over the samples whose t lies in each of ``bins`` equal ranges: where the model is weak).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from data.loader import DataConfig, SampleTransform, hash_seed, read_shard, resolve_shards
from data.images import BadSample

log = logging.getLogger("train")


@dataclass
class ValidationConfig:
    """The validation section of a run's config (off while ``shards`` is null)."""

    shards: str | list[str] | None = None  # held-out shards (image or latent shards like data.shards)
    every: int = 1000  # optimiser steps between validation losses (and one at step 0)
    num_samples: int = 256  # the first this many usable held-out samples
    batch_size: int = 32  # samples per forward (fixed: the result does not depend on the training batch)
    bins: int = 10  # timestep ranges reported separately (val_loss/t000-099, …)
    latent_manifest: str | None = None  # held-out latent shards behind URLs: a local copy of their manifest.json

    def validate(self, num_steps: int):
        if self.shards is None:
            return
        if self.every < 1 or self.num_samples < 1 or self.batch_size < 1:
            raise ValueError("validation.every, num_samples and batch_size must be ≥ 1")
        if not 1 <= self.bins <= num_steps:
            raise ValueError(f"validation.bins must be in [1, T = {num_steps}], got {self.bins}")


def held_out(cfg: ValidationConfig, data: DataConfig, urls: list[str], manifest: dict | None) -> list[tuple]:
    """The first ``num_samples`` usable samples of the held-out shards, in order: (image or latent, caption, size and
    crop conditioning (6,): original (h, w), crop (top, left), target (h, w), for models that take it)."""
    transform = SampleTransform(DataConfig(**{**data.__dict__, "shards": cfg.shards, "flip": False,
                                              "crop": "center"}), manifest)
    skipped = {}

    def usable():
        from collections import Counter

        counts = Counter()
        for url in urls:
            for raw in read_shard(url, counts, data.retries, data.retry_delay):
                try:
                    smp = transform.sample(raw, epoch=0)
                except BadSample as bad:
                    counts[bad.reason] += 1
                    continue
                r = data.resolution  # held-out samples are square centre crops
                yield smp.x, smp.caption, [smp.size[1], smp.size[0], *smp.box, r, r]
        skipped.update(counts)

    samples = list(islice(usable(), cfg.num_samples))
    if not samples:
        raise ValueError(f"validation.shards={cfg.shards!r}: no usable sample (skipped: {skipped or 'none'})")
    if len(samples) < cfg.num_samples:
        log.warning("validation: only %d held-out samples in %s (validation.num_samples=%d)", len(samples),
                    cfg.shards, cfg.num_samples)
    return samples


class Validation:
    """Computes the validation loss of a network (see the module docstring). Collective when ``world`` > 1."""

    def __init__(self, cfg: ValidationConfig, data: DataConfig, diffusion, encoder, vae, device, seed: int,
                 rank: int = 0, world: int = 1):
        from data import latents as latent_shards

        self.cfg, self.diffusion, self.encoder, self.device = cfg, diffusion, encoder, device
        self.rank, self.world = rank, world
        urls = resolve_shards(cfg.shards)
        manifest = latent_shards.find_manifest(urls, cfg.latent_manifest)  # latent shards: made by the run's VAE?
        if manifest is not None and manifest.get("buckets"):
            raise ValueError(f"validation.shards={cfg.shards!r} are latent shards of aspect-ratio buckets; the "
                             f"validation loss takes square centre crops of data.resolution: precompute the held-out "
                             f"shards without data.buckets (or name the image shards)")
        if manifest is not None:
            latent_shards.check_manifest(manifest, vae.identity() if vae is not None else None, data.resolution,
                                         "validation.shards")
        samples = held_out(cfg, data, urls, manifest)
        if world > 1:  # every rank must hold the same set (a remote shard given up on one rank would differ)
            from accelerate.utils import gather_object

            print_ = hashlib.sha256("\n".join(c for _, c, _ in samples).encode()).hexdigest()[:16]
            seen = set(gather_object([(len(samples), print_)]))
            if len(seen) > 1:
                raise ValueError(f"validation.shards={cfg.shards!r}: the processes read different held-out sets "
                                 f"{sorted(seen)} (a shard unreadable on some of them?)")
        self.captions = [c for _, c, _ in samples]
        self.micro = torch.tensor([m for _, _, m in samples], dtype=torch.float32)  # (N, 6)
        x = torch.from_numpy(np.stack([s for s, _, _ in samples]))
        if manifest is None:  # image shards: (N, R, R, 3) uint8 → pixels, encoded once when there is a VAE
            x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1)
            if vae is not None:
                x = torch.cat([vae.encode(c.to(device)).cpu() for c in x.split(cfg.batch_size)])
        self.x0 = x.float()  # (N, C, h, w) on the CPU
        n, T = len(samples), diffusion.num_steps
        gens = [torch.Generator().manual_seed(hash_seed(seed, i, 2)) for i in range(n)]
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])
        self.t = ((torch.arange(n, dtype=torch.float64) + u) * T / n).floor().long().clamp(max=T - 1)
        self.noise = torch.stack([torch.randn(self.x0.shape[1:], generator=g) for g in gens])
        log.info("validation: %d held-out samples from %s every %d steps", n, cfg.shards, cfg.every)

    @torch.no_grad()
    def __call__(self, net, autocast=None) -> dict:
        """{"val_loss", "val_loss/tA-B" …, "val_seconds"} of ``net`` ((x_t, t, cond) → output)."""
        start = time.perf_counter()
        n, b = len(self.captions), self.cfg.batch_size
        chunks = math.ceil(n / b)
        rows = []
        for j in range(math.ceil(chunks / self.world)):  # every rank the same number of forwards (ZeRO-3 gathers)
            c = self.rank + j * self.world
            sl = slice((c if c < chunks else 0) * b, min(n, ((c if c < chunks else 0) + 1) * b))
            cond = {k: v.to(self.device) for k, v in self.encoder.encode(self.captions[sl]).items()}
            cond = {k: v.float() if v.is_floating_point() else v for k, v in cond.items()}
            cond["micro"] = self.micro[sl].to(self.device)  # read by models with size and crop conditioning only
            x0, t, noise = (v[sl].to(self.device) for v in (self.x0, self.t, self.noise))
            with autocast() if autocast is not None else contextlib.nullcontext():
                losses = self.diffusion.training_losses(net, x0, cond, t=t, noise=noise)["loss"].float().cpu()
            if c < chunks:
                rows += list(zip(range(sl.start, sl.stop), losses.tolist()))
        if self.world > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        losses = torch.tensor([loss for _, loss in sorted(rows)], dtype=torch.float64)
        out = {"val_loss": float(losses.mean())}
        T, bins = self.diffusion.num_steps, self.cfg.bins
        edges = [round(k * T / bins) for k in range(bins + 1)]
        for lo, hi in zip(edges, edges[1:]):
            mask = (self.t >= lo) & (self.t < hi)
            if mask.any():
                out[f"val_loss/t{lo:03d}-{hi - 1:03d}"] = float(losses[mask].mean())
        out["val_seconds"] = time.perf_counter() - start
        return out
