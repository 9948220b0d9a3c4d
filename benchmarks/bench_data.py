"""Loader throughput vs the per-core ceiling (a bare loop of PIL decode + resize + crop over the same JPEG bytes).

    python benchmarks/bench_data.py [--images 600] [--source-size 512]
    python benchmarks/bench_data.py --buckets      # aspect-ratio buckets vs square crops (data/buckets.py)

Writes JPEG shards of photo-like images (smooth colour fields + noise, ``--source-size`` px on the long side) to a
temporary folder, then measures samples/s of ``data.Loader`` (exact mode, shuffle buffer on) with 0, 1 and 2
DataLoader workers at 256 px and 64 px output, with the JPEG draft (DCT-domain downscale) on and off. The ceiling
decodes fully and resizes with the same filter, in one process, with the bytes already in memory.

``--buckets``: the same loader with ``data.buckets=auto`` (about 256² px, sides multiples of 64) against square
256 px crops, on the same landscape and portrait JPEGs, with 0, 1 and 2 workers; each side run three times,
alternating, best of three (use ``--images 1500`` or more: short runs are noisy).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from data import DataConfig, Loader  # noqa: E402
from data.images import resize_crop  # noqa: E402


def photo(rng, w, h):
    """A photo-like image: a smooth random colour field plus sensor-like noise (JPEGs of pure noise are atypical)."""
    small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def write_shards(folder, n, size, per_shard=100):
    rng = np.random.default_rng(0)
    blobs = []
    for s in range(0, n, per_shard):
        with tarfile.open(os.path.join(folder, f"{s // per_shard:05d}.tar"), "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                buf = io.BytesIO()
                w, h = (size, size * 3 // 4) if i % 2 else (size * 3 // 4, size)
                photo(rng, w, h).save(buf, "JPEG", quality=90)
                blobs.append(buf.getvalue())
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"caption {i}".encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return blobs


def ceiling(blobs, resolution):
    t = time.perf_counter()
    for data in blobs:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        resize_crop(img, resolution)
    return len(blobs) / (time.perf_counter() - t)


def loader_rate(folder, n, resolution, workers, draft, buckets=None):
    cfg = DataConfig(shards=folder, resolution=resolution, num_workers=workers, shuffle_buffer=100,
                     jpeg_draft=draft, buckets=buckets, bucket_step=64 if buckets else 0)
    loader = Loader(cfg, batch_size=25)
    it = iter(loader)
    for _ in range(4):  # worker start-up (and the buckets' look-ahead filling) is not throughput
        next(it)
    t, seen = time.perf_counter(), 0
    while seen < n - 250:  # steady state: stop before the epoch's end
        seen += len(next(it).keys)
    return seen / (time.perf_counter() - t)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600, help="number of JPEGs (even workers need ≥ 2 shards each)")
    parser.add_argument("--source-size", type=int, default=512, help="long side of the source JPEGs")
    parser.add_argument("--buckets", action="store_true", help="compare aspect-ratio buckets with square crops")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as folder:
        blobs = write_shards(folder, args.images, args.source_size)
        if args.buckets:
            print(f"{args.images} JPEGs of {args.source_size} px (landscape and portrait), {cores} cores; img/s, "
                  f"best of 3")
            print("| workers | square 256 px | buckets (auto, ~256² px) | buckets / square |")
            print("|---|---|---|---|")
            for workers in (0, 1, 2):
                square = bucketed = 0.0
                for _ in range(3):
                    square = max(square, loader_rate(folder, args.images, 256, workers, True))
                    bucketed = max(bucketed, loader_rate(folder, args.images, 256, workers, True, "auto"))
                print(f"| {workers} | {square:.0f} | {bucketed:.0f} | {bucketed / square:.3f} |", flush=True)
            return
        print(f"{args.images} JPEGs of {args.source_size} px, {cores} cores")
        print("| output | bare PIL loop (img/s) | loader, workers | draft | img/s | ratio to ceiling per core |")
        print("|---|---|---|---|---|---|")
        for res in (256, 64):
            top = ceiling(blobs, res)
            for draft in (False, True):
                for workers in (0, 1, 2):
                    rate = loader_rate(folder, args.images, res, workers, draft)
                    per_core = rate / max(1, min(workers, cores))
                    print(f"| {res} px | {top:.0f} | {workers} | {'on' if draft else 'off'} | {rate:.0f} | "
                          f"{per_core / top:.2f} |", flush=True)


if __name__ == "__main__":
    main()
