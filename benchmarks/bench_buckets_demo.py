"""Do aspect-ratio buckets keep the whole object in frame? A small demo on mixed-shape toy data.

    python benchmarks/bench_buckets_demo.py --out runs/buckets_demo [--steps 600] [--images 32]

The data: portraits (64×128) with a disc near the top, landscapes (128×64) with a disc near the left, squares
(96×96) with a disc in the centre, in red, green or blue on white, captioned "a red disc" and so on. A square centre
crop cuts the disc of every portrait and landscape (as it cuts the heads off portraits); a bucket of the image's own
shape keeps it whole.

Two runs of the demo recipe at 32 px (the tiny U-Net, pixel space), the same steps and seed: ``square`` (centre crops
of 32×32, the default) and ``buckets`` (data.buckets = 24×48, 32×32, 48×24, with size and crop conditioning). Each
samples ``--images`` images per shape; an image keeps the object whole when its coloured pixels form a blob of at
least 20 px that touches no border. Prints a table (figures in benchmarks/README.md) and writes OUT/comparison.png:
a row of sample grids per run, one grid per shape.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 50, 220)}
SHAPES = {"portrait": ((64, 128), (32, 28)), "landscape": ((128, 64), (28, 32)), "square": ((96, 96), (48, 48))}
BUCKETS = [[24, 48], [32, 32], [48, 24]]


def write_data(folder: Path, count: int = 3072, per_shard: int = 384, seed: int = 0) -> str:
    """Shards of the three shapes in turn, each with a disc of radius 20 (±3 px jitter) at its shape's place."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(SHAPES)
    for s in range(count // per_shard):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                (w, h), (cx, cy) = SHAPES[names[i % 3]]
                colour = list(COLOURS)[int(rng.integers(3))]
                cx, cy = cx + int(rng.integers(-3, 4)), cy + int(rng.integers(-3, 4))
                img = Image.new("RGB", (w, h), "white")
                ImageDraw.Draw(img).ellipse((cx - 20, cy - 20, cx + 20, cy + 20), fill=COLOURS[colour])
                buf = io.BytesIO()
                img.save(buf, "PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", f"a {colour} disc".encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{count // per_shard - 1:05d}}}.tar")


def whole(img: np.ndarray) -> bool:
    """The object is in frame: its coloured pixels (far from white) number ≥ 20 and none lies on the border."""
    mask = (img.astype(int).min(-1) < 150)
    if mask.sum() < 20:
        return False
    return not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def write_comparison(out: Path):
    """OUT/comparison.png: one row per run (square, buckets), one sample grid per shape, on grey."""
    grids = [[Image.open(out / "samples" / f"{name}_{w}x{h}" / "grid.png").convert("RGB") for w, h in BUCKETS]
             for name in ("square", "buckets")]
    gap = 10
    width = sum(g.width for g in grids[0]) + gap * (len(BUCKETS) - 1)
    height = max(g.height for g in grids[0])
    canvas = Image.new("RGB", (width, 2 * height + gap), (128, 128, 128))
    for r, row in enumerate(grids):
        x = 0
        for g in row:
            canvas.paste(g, (x, r * (height + gap)))
            x += g.width + gap
    canvas.save(out / "comparison.png")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/buckets_demo", help="folder for the data, the runs and the samples")
    p.add_argument("--steps", type=int, default=600, help="training steps of each run")
    p.add_argument("--images", type=int, default=32, help="samples per shape")
    p.add_argument("--text-encoder", help="trained toy CLIP weights (the quickstart's), else a random tower")
    args = p.parse_args()
    out = Path(args.out)
    shards = write_data(out / "data") if not (out / "data").is_dir() else str(out / "data" / "{00000..00007}.tar")
    python = sys.executable
    common = [f"data.shards={shards}", "data.resolution=32", "data.shuffle_buffer=256", "logging.tracker=none",
              "logging.sample_every=0", f"optim.decay_steps={args.steps}", "checkpoint.every=100000"]
    if args.text_encoder:
        common.append(f"text_encoder.pretrained={args.text_encoder}")
    runs = {"square": [], "buckets": [f"data.buckets={json.dumps(BUCKETS)}", "model.overrides.micro_conditioning=true"]}
    rows = []
    for name, extra in runs.items():
        run = out / name
        if not (run / "model").is_dir():
            subprocess.run([python, str(ROOT / "pipeline" / "train.py"), "--config",
                            str(ROOT / "launch" / "configs" / "demo.yaml"), "--output-dir", str(run), "--max-steps",
                            str(args.steps), *common, *extra], check=True)
        for w, h in BUCKETS:
            folder = out / "samples" / f"{name}_{w}x{h}"
            if not (folder / "metadata.jsonl").is_file():
                subprocess.run([python, str(ROOT / "pipeline" / "sample.py"), "--model", str(run / "model"),
                                "--prompt", "a red disc", "--prompt", "a green disc", "--prompt", "a blue disc",
                                "--num-images", str(-(-args.images // 3)), "--guidance", "3", "--steps", "25",
                                "--width", str(w), "--height", str(h), "--out", str(folder)], check=True)
            files = sorted((folder / "images").glob("*.png"))
            ok = [whole(np.asarray(Image.open(f).convert("RGB"))) for f in files]
            rows.append((name, f"{w}×{h}", sum(ok), len(ok)))
    write_comparison(out)
    print("| training crops | sampled at | object whole |")
    print("|---|---|---|")
    for name, shape, k, n in rows:
        print(f"| {name} | {shape} | {k}/{n} = {100 * k / n:.0f}% |")


if __name__ == "__main__":
    main()
