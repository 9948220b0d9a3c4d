"""Read shards through the training loader's decode path and report what is in them.

    python -m data.inspect "shards/{00000..00099}.tar" [--resolution 64] [--json]

Reports samples read, samples skipped by reason, caption length and original image size statistics. With ``--json``
it prints one JSON object on stdout: {"samples": int, "skipped": {reason: count}, "shards": int, ...}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter

import numpy as np
from tqdm import tqdm

from .images import BadSample
from .loader import DataConfig, SampleTransform, read_shard, resolve_shards


def _stats(values) -> dict:
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "mean": round(float(a.mean()), 3), "max": float(a.max())}


def inspect(shards, resolution: int = 64, caption_keys=None, progress: bool = False) -> dict:
    """One pass over every shard, in order; each sample goes through the training loader's transform."""
    cfg = DataConfig(shards=shards, resolution=resolution, shuffle_buffer=0)
    if caption_keys:
        cfg.caption_keys = list(caption_keys)
    urls = resolve_shards(shards)
    transform = SampleTransform(cfg)
    skipped: Counter = Counter()
    words, chars, widths, heights = [], [], [], []
    samples = 0
    for url in tqdm(urls, desc="shards", disable=not progress):
        for raw in read_shard(url, skipped):
            try:
                _, caption, _, (w, h), _ = transform(raw, epoch=0)
            except BadSample as bad:
                skipped[bad.reason] += 1
                continue
            samples += 1
            words.append(len(caption.split()))
            chars.append(len(caption))
            widths.append(w)
            heights.append(h)
    return {"samples": samples, "skipped": dict(skipped), "skipped_total": sum(skipped.values()),
            "shards": len(urls), "resolution": resolution,
            "caption_words": _stats(words), "caption_chars": _stats(chars),
            "image_width": _stats(widths), "image_height": _stats(heights)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", help="shard spec(s): brace pattern, glob, folder, file or URL")
    parser.add_argument("--resolution", type=int, default=64, help="training resolution to decode to (default 64)")
    parser.add_argument("--caption-key", action="append", help="where captions come from, in order of preference "
                                                               "(default: txt, then json.caption)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.json else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        report = inspect(args.shards if len(args.shards) > 1 else args.shards[0], args.resolution,
                         args.caption_key, progress=not args.json and sys.stderr.isatty())
    except FileNotFoundError as e:
        parser.exit(2, f"error: {e}\n")
    if args.json:
        print(json.dumps(report))
        return report
    print(f"{report['samples']} samples in {report['shards']} shards; skipped {report['skipped_total']}")
    for reason, n in sorted(report["skipped"].items(), key=lambda kv: -kv[1]):
        print(f"  {reason:24s} {n}")
    for name in ("caption_words", "caption_chars", "image_width", "image_height"):
        s = report[name]
        if s:
            print(f"{name:14s} min {s['min']:g}  mean {s['mean']:g}  max {s['max']:g}")
    return report


if __name__ == "__main__":
    main()
