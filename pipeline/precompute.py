"""Run the frozen text encoder once over every caption in the shards and store the embeddings (fp16).

    python pipeline/precompute.py --config launch/configs/demo.yaml --out runs/demo_captions.safetensors [key=value ...]

Then train with ``text_encoder.cache=runs/demo_captions.safetensors``: the loop looks captions up instead of running
the encoder (the empty caption of caption dropout and the sample-grid prompts are stored too). The file records the
encoder's identity and refuses to load for a different encoder. Images are not decoded: only captions are read.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from data.loader import read_captions  # noqa: E402
from models.text_encoders import CachedTextEncoder, build_text_encoder  # noqa: E402
from pipeline.config import ConfigError, load_config  # noqa: E402

log = logging.getLogger("precompute")


def collect_captions(shards, caption_keys) -> tuple[list[str], Counter]:
    skipped: Counter = Counter()
    captions: dict[str, None] = {"": None}  # the unconditional caption first; a dict keeps order, drops repeats
    for caption in tqdm(read_captions(shards, caption_keys, skipped), desc="reading captions", unit=" captions"):
        captions[caption] = None
    return list(captions), skipped


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the run's YAML config (data.shards and text_encoder are used)")
    p.add_argument("--out", required=True, help="output .safetensors file of caption embeddings")
    p.add_argument("--batch-size", type=int, default=256, help="captions per encoder batch")
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu",
                   help="where the encoder runs")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        captions, skipped = collect_captions(cfg.data.shards, cfg.data.caption_keys)
        captions += [p for p in cfg.logging.sample_prompts if p not in set(captions)]  # the sample grids' prompts
        encoder = CachedTextEncoder(build_text_encoder(cfg.text_encoder).to(args.device))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    for i in tqdm(range(0, len(captions), args.batch_size), desc="encoding", unit="batch"):
        encoder.encode(captions[i:i + args.batch_size])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    encoder.save(args.out)
    log.info("stored %d distinct captions (+ the empty one) in %s; skipped %s", len(captions) - 1, args.out,
             dict(skipped) or "none")
    return args.out


if __name__ == "__main__":
    main()
