"""Held-out images and captions for evaluation: image folders, caption files, shards (what the evaluation job, the
likelihood and the human study read).

Folders are read as pytorch-fid reads them (PIL, transparency dropped); shards through the training loader's decode,
resize and centre crop. Unreadable images are counted, not fatal.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from .images import BadSample, decode_image, resize_crop

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"}  # pytorch-fid's list


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def load_folder(files: list[Path], skipped: Counter):
    """(index, PIL RGB image) for every readable file; unreadable ones are counted, not fatal. Transparency is
    dropped, as pytorch-fid and clean-fid read a folder (PIL's convert("RGB")), so FIDs of one folder agree; 16-bit
    images are rescaled where they clip to white."""
    for i, path in enumerate(files):
        try:
            yield i, decode_image(path.read_bytes(), alpha="drop")
        except BadSample as bad:
            skipped[bad.reason] += 1
            log.warning("skipping %s: %s", path, bad)


def load_shards(spec: str, resolution: int | tuple[int, int], limit: int, skipped: Counter, captions: bool = False):
    """(index, PIL image resized and centre-cropped like the training data[, caption]) from shards, up to ``limit``
    samples (with ``captions``: only samples whose caption reads, as the training loader would take them)."""
    from PIL import Image

    from .loader import IMAGE_KEYS, caption_of, read_shard, resolve_shards

    n = 0
    for url in resolve_shards(spec):
        for raw in read_shard(url, skipped):
            if n >= limit:
                return
            ext = next((k for k in IMAGE_KEYS if k in raw), None)
            try:
                if ext is None:
                    raise BadSample("missing_image")
                caption = caption_of(raw, ["txt", "json.caption"]) if captions else None
                arr = resize_crop(decode_image(raw[ext]), resolution)
            except BadSample as bad:
                skipped[bad.reason] += 1
                continue
            yield (n, Image.fromarray(arr), caption) if captions else (n, Image.fromarray(arr))
            n += 1


def held_out_captions(source: str, limit: int) -> list[str]:
    """Held-out captions from a text file (one per line), JSONL ("caption" or "prompt") or shards."""
    path = Path(source)
    if path.is_file() and path.suffix in (".txt", ".jsonl"):
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [json.loads(line) for line in lines] if path.suffix == ".jsonl" else None
        captions = [r.get("caption", r.get("prompt")) for r in rows] if rows else [line.strip() for line in lines]
    else:
        from itertools import islice

        from .loader import read_captions as shard_captions

        captions = list(islice(shard_captions(source, ["txt", "json.caption"], Counter()), limit))
    captions = [c for c in captions if c is not None]
    if not captions:
        raise ValueError(f"no captions in {source}")
    return captions[:limit]


def captions_for_images(files: list[Path], captions_file: str | None) -> list[str]:
    """The caption of each image: from a JSONL of {"file", "caption"} or same-named .txt files."""
    if captions_file:
        table = {}
        for line in Path(captions_file).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                table[Path(row["file"]).name] = row["caption"] if "caption" in row else row["prompt"]
        missing = [f.name for f in files if f.name not in table]
        if missing:
            raise ValueError(f"{captions_file} has no caption for {len(missing)} of {len(files)} images, e.g. "
                             f"{missing[:3]}")
        return [table[f.name] for f in files]
    missing = [f.name for f in files if not f.with_suffix(".txt").is_file()]
    if missing:
        raise ValueError(f"no caption for {len(missing)} of {len(files)} images (e.g. {missing[:3]}): put same-named "
                         f".txt files beside them or pass --captions FILE.jsonl")
    return [f.with_suffix(".txt").read_text(encoding="utf-8").strip() for f in files]


def is_shard_spec(spec: str) -> bool:
    """Whether an image source names WebDataset shards (a .tar file or a brace pattern) rather than a folder."""
    return ".tar" in spec or "{" in spec


def labelled_images(spec: str, resolution: int, limit: int, unconditional: bool, captions_file: str | None,
                    skipped: Counter) -> list[tuple[np.ndarray, str]]:
    """Up to ``limit`` (uint8 (R, R, 3) image resized and centre-cropped like the training data, caption) pairs from a
    folder or shards; unreadable images are counted in ``skipped``. Captions are "" when ``unconditional``."""
    if is_shard_spec(spec):
        samples = [(np.asarray(im), "" if unconditional else c)
                   for _, im, c in load_shards(spec, resolution, limit, skipped, captions=True)]
    else:
        files = list_images(spec)[:limit]
        captions = [""] * len(files) if unconditional else captions_for_images(files, captions_file)
        samples = [(resize_crop(im, resolution), captions[i]) for i, im in load_folder(files, skipped)]
    if not samples:
        raise ValueError(f"{spec}: no readable images (skipped: {dict(skipped) or 'none'})")
    return samples
