"""Write WebDataset shards in img2dataset's layout (``key.jpg|png|webp``, ``key.txt``, ``key.json``).

Sources:
    python -m data.write_shards toy   --out toy_shards [--count 4096 --resolution 32 --seed 0]
    python -m data.write_shards folder PHOTOS/ --out shards     # every image with a same-named .txt caption
    python -m data.write_shards table pairs.csv --out shards    # CSV/TSV/JSONL with image path + caption columns

Shards are ``OUT/00000.tar, 00001.tar, …``, cut at ``--max-samples`` samples or ``--max-bytes`` bytes, each written
to a temporary name and renamed when complete (an interrupted run never leaves a half shard under a real name).
``OUT/manifest.json`` records the shards, their sample counts and sizes, the skipped inputs by reason, and the
brace pattern to give the loader (``data.shards``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from .files import write_json_atomic
from .images import BadSample, decode_image
from .toy import toy_sample

log = logging.getLogger(__name__)
IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp"}
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


class ShardWriter:
    """Rotating tar writer around ``webdataset.TarWriter`` with atomic shard files and a manifest."""

    def __init__(self, out: str | os.PathLike, max_samples: int = 1000, max_bytes: int = 0):
        if max_samples < 1 and max_bytes < 1:
            raise ValueError("give --max-samples or --max-bytes (≥ 1) so that shards have an end")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        if any(self.out.glob("*.tar")):
            raise FileExistsError(f"{self.out} already holds .tar shards; write to an empty folder")
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict] = []
        self._tar = None
        self.count = 0

    def _open(self):
        name = f"{len(self.shards):05d}.tar"
        self._tmp = self.out / (name + ".tmp")
        self._tar = wds.TarWriter(str(self._tmp))
        self.shards.append({"path": name, "samples": 0, "bytes": 0})

    def _close(self):
        if self._tar is not None:
            self._tar.close()
            final = self.out / self.shards[-1]["path"]
            os.replace(self._tmp, final)
            self.shards[-1]["bytes"] = final.stat().st_size
            self._tar = None

    def write(self, image: bytes, ext: str, caption: str, meta: dict):
        size = len(image) + len(caption.encode())
        cur = self.shards[-1] if self.shards else None
        if self._tar is None or (self.max_samples and cur["samples"] >= self.max_samples) or \
                (self.max_bytes and cur["samples"] and cur["bytes"] + size > self.max_bytes):
            self._close()
            self._open()
        key = f"{self.count:09d}"
        meta = {"key": key, "caption": caption, **meta}
        self._tar.write({"__key__": key, ext: image, "txt": caption, "json": json.dumps(meta).encode()})
        self.shards[-1]["samples"] += 1
        self.shards[-1]["bytes"] += size
        self.count += 1

    def finish(self, skipped: Counter, source: str) -> dict:
        self._close()
        n = len(self.shards)
        pattern = str(self.out / (f"{{00000..{n - 1:05d}}}.tar" if n > 1 else "00000.tar")) if n else None
        if not n:
            log.warning("no sample was written to %s", self.out)
        manifest = {"source": source, "samples": self.count, "num_shards": n, "shards_pattern": pattern,
                    "skipped": dict(skipped), "shards": self.shards}
        write_json_atomic(self.out / "manifest.json", manifest)
        return manifest


def encode(img, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, PIL_FORMATS[fmt], **({"quality": quality} if fmt in ("jpg", "webp") else {}))
    return buf.getvalue()


def _from_files(pairs, writer: ShardWriter, fmt: str, quality: int, skipped: Counter, progress: bool):
    """pairs: (image path, caption or None, extra metadata). Images are checked by a full decode; broken ones and
    ones without a caption are skipped and counted."""
    for path, caption, extra in tqdm(pairs, desc="writing shards", unit="img", disable=not progress):
        if caption is None:
            skipped["missing_caption"] += 1
            continue
        try:
            data = Path(path).read_bytes()
        except OSError:
            skipped["unreadable_file"] += 1
            continue
        try:
            img = decode_image(data)
        except BadSample as bad:
            skipped[bad.reason] += 1
            continue
        if fmt == "keep":
            ext = IMAGE_EXTS.get(Path(path).suffix.lower(), "png")
            if ext == "bmp":  # not a web format: store losslessly as PNG
                data, ext = encode(img, "png", quality), "png"
        else:
            data, ext = encode(img, fmt, quality), fmt
        writer.write(data, ext, caption, {"source": str(path), "width": img.width, "height": img.height, **extra})


def folder_pairs(root: Path):
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        txt = path.with_suffix(".txt")
        yield path, (txt.read_text(encoding="utf-8", errors="replace").strip() if txt.exists() else None), {}


def table_pairs(table: Path, image_column: str, caption_column: str):
    if table.suffix.lower() == ".jsonl":
        rows = (json.loads(line) for line in table.read_text(encoding="utf-8").splitlines() if line.strip())
    else:
        delimiter = "\t" if table.suffix.lower() in (".tsv", ".tab") else ","
        rows = list(csv.DictReader(table.open(encoding="utf-8", newline=""), delimiter=delimiter))
    for i, row in enumerate(rows):
        if image_column not in row:
            raise KeyError(f"{table}: row {i} has no column {image_column!r} (columns: {sorted(row)}); "
                           f"use --image-column")
        path = Path(row[image_column])
        path = path if path.is_absolute() else table.parent / path
        caption = row.get(caption_column)
        yield path, (str(caption).strip() if caption is not None else None), {}


def write_toy(out, count: int, resolution: int = 32, seed: int = 0, max_samples: int = 512, fmt: str = "png",
              quality: int = 95, progress: bool = False) -> dict:
    """Write ``count`` toy samples (see data/toy.py) to shards in ``out``; returns the manifest."""
    writer = ShardWriter(out, max_samples)
    fmt = "png" if fmt == "keep" else fmt  # synthetic images: lossless unless asked otherwise
    for i in tqdm(range(count), desc="toy shards", unit="img", disable=not progress):
        img, caption, meta = toy_sample(i, seed, resolution)
        writer.write(encode(img, fmt, quality), fmt, caption, meta)
    return writer.finish(Counter(), f"toy(count={count}, resolution={resolution}, seed={seed})")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data.write_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=["toy", "folder", "table"], help="where the (image, caption) pairs come from")
    parser.add_argument("path", nargs="?", help="folder (source=folder) or CSV/TSV/JSONL file (source=table)")
    parser.add_argument("--out", required=True, help="output folder for the .tar shards and manifest.json (must be "
                                                     "empty of shards)")
    parser.add_argument("--max-samples", type=int, default=1000, help="samples per shard (0 = no limit)")
    parser.add_argument("--max-bytes", type=int, default=0, help="bytes per shard, roughly (0 = no limit)")
    parser.add_argument("--format", default="keep", choices=["keep", "jpg", "png", "webp"],
                        help="keep = pass the image files through unchanged; otherwise re-encode")
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality when re-encoding")
    parser.add_argument("--image-column", default="image", help="table: the column with image paths (relative "
                                                                "paths are relative to the table's folder)")
    parser.add_argument("--caption-column", default="caption", help="table: the column with captions")
    parser.add_argument("--count", type=int, default=4096, help="toy: number of samples")
    parser.add_argument("--resolution", type=int, default=32, help="toy: image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="toy: seed (the same seed gives the same data set)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    progress = sys.stderr.isatty()

    if args.source == "toy":
        manifest = write_toy(args.out, args.count, args.resolution, args.seed, args.max_samples or 512,
                             args.format, args.quality, progress)
    else:
        if not args.path:
            parser.error(f"source={args.source} needs a path")
        src = Path(args.path)
        if not src.exists():
            parser.error(f"{src} does not exist")
        if args.source == "folder" and not src.is_dir():
            parser.error(f"{src} is not a folder")
        writer = ShardWriter(args.out, args.max_samples, args.max_bytes)
        skipped: Counter = Counter()
        pairs = folder_pairs(src) if args.source == "folder" else \
            table_pairs(src, args.image_column, args.caption_column)
        _from_files(pairs, writer, args.format, args.quality, skipped, progress)
        manifest = writer.finish(skipped, f"{args.source}:{src}")
    log.info("wrote %d samples in %d shards (skipped: %s); use data.shards=%s", manifest["samples"],
             manifest["num_shards"], manifest["skipped"] or "none", manifest["shards_pattern"])
    return manifest


if __name__ == "__main__":
    main()
