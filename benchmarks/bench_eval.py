"""FID speed: feature extraction, the Fréchet distance at 2048-d, and the whole FID vs pytorch-fid's command.

    python benchmarks/bench_eval.py [--images 1000] [--size 64]

Makes two folders of photo-like PNGs and a randomly initialised FID Inception file (speed does not depend on the
weights; it is placed in a temporary torch-hub cache so that pytorch-fid finds it offline), then times:
  * Inception feature extraction, images/s (ours, batch 50);
  * the Fréchet distance on 2048-d statistics: ours (eigenvalues) vs pytorch-fid's (scipy.linalg.sqrtm);
  * the whole FID of folder A vs folder B: `python pipeline/evaluate.py fid` vs `python -m pytorch_fid`, each a
    fresh process on the same files, one after the other.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from metrics.fid import FID_WEIGHTS_NAME, FeatureStats, frechet_distance  # noqa: E402


def make_weights(path: Path):
    import torchvision
    from pytorch_fid import inception

    # Build the architecture only: pytorch-fid's URL fetch is replaced by a no-op (nothing is downloaded) and the
    # random Kaiming weights below are what the benchmark saves and loads as a local file.
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(torchvision.models.Inception3, "load_state_dict", lambda self, *a, **k: None):
        net = inception.fid_inception_v3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    torch.save(net.state_dict(), path)


def make_images(folder: Path, n: int, size: int, seed: int):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        arr = np.clip(np.asarray(base, dtype=np.float32) + rng.normal(0, 15, (size, size, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i:05d}.png")


def timed(cmd, env) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="images per folder (the issue: ~2k in all)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "hub" / "checkpoints").mkdir(parents=True)
        weights = tmp / "hub" / "checkpoints" / FID_WEIGHTS_NAME
        make_weights(weights)
        make_images(tmp / "a", args.images, args.size, 0)
        make_images(tmp / "b", args.images, args.size, 1)
        env = {**os.environ, "TORCH_HOME": str(tmp)}  # torch.hub.get_dir() = $TORCH_HOME/hub
        print(f"{torch.get_num_threads()} threads, {args.images} + {args.images} images of {args.size} px")

        from data.folders import list_images, load_folder
        from pipeline.evaluate import InceptionExtractor, extract

        extractor = InceptionExtractor(str(weights), "cpu")
        t = time.perf_counter()
        feats = extract(extractor, load_folder(list_images(tmp / "a"), __import__("collections").Counter()), 50)
        print(f"Inception features: {len(feats) / (time.perf_counter() - t):.1f} img/s")

        rng = np.random.default_rng(0)
        a = FeatureStats.of(rng.normal(size=(3000, 2048)))
        b = FeatureStats.of(rng.normal(size=(3000, 2048)) * 1.1 + 0.1)
        t = time.perf_counter()
        ours = frechet_distance(a, b)
        t_ours = time.perf_counter() - t
        from pytorch_fid.fid_score import calculate_frechet_distance

        t = time.perf_counter()
        ref = calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
        t_ref = time.perf_counter() - t
        print(f"Fréchet distance at 2048-d: ours {t_ours:.2f} s, scipy sqrtm {t_ref:.2f} s "
              f"({t_ref / t_ours:.1f}× faster; values {ours:.6f} vs {ref:.6f})")

        t_ours = timed([sys.executable, "pipeline/evaluate.py", "fid", str(tmp / "a"), str(tmp / "b"), "--json"], env)
        t_ref = timed([sys.executable, "-m", "pytorch_fid", str(tmp / "a"), str(tmp / "b"), "--device", "cpu"], env)
        print(f"whole FID: ours {t_ours:.1f} s, pytorch-fid {t_ref:.1f} s (ratio {t_ours / t_ref:.2f})")


if __name__ == "__main__":
    main()
