"""Run the frozen encoders once, offline, so that training reads their outputs instead of running them every step.

    python pipeline/precompute.py captions --config CFG --out caps.safetensors [section.key=value ...]
    python pipeline/precompute.py latents  --config CFG --out DIR [--flip] [--text] [section.key=value ...]
    accelerate launch pipeline/precompute.py latents ...      # the shards are split over the processes

``captions``: every caption of ``data.shards`` through the text encoder into one fp16 file; train with
``text_encoder.cache=caps.safetensors`` (the empty caption and the sample-grid prompts are stored too; the file
records the encoder and refuses another).

``latents``: every image of ``data.shards`` decoded, filtered, resized and cropped exactly as the training loader
does (the same skip reasons are counted), encoded by the VAE of ``autoencoder`` (its posterior mean, scaled), and
written as new shards ``DIR/00000.tar ...`` (one per input shard; layout in ``data/latents.py``), with ``--flip`` the
latent of the mirrored crop too (so ``data.flip`` still works) and with ``--text`` the caption embeddings. Then
train with ``data.shards=DIR``: the U-Net reads latents, the VAE only decodes sample grids. Each shard is written under
a temporary name and renamed when complete: a rerun keeps finished shards and does the rest. ``DIR/manifest.json``
names the VAE (fingerprint, scale, shift), the resolution and the counts; training refuses shards made otherwise.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import latents as latent_shards  # noqa: E402
from data.files import read_json, write_json_atomic  # noqa: E402
from data.buckets import parse_buckets  # noqa: E402
from data.loader import FILTERED, SampleTransform, read_captions, read_shard, resolve_shards  # noqa: E402
from data.images import BadSample  # noqa: E402
from models.autoencoder import load_autoencoder  # noqa: E402
from models.text_encoders import CachedTextEncoder, build_text_encoder  # noqa: E402
from pipeline.config import ConfigError, bucket_step, load_config  # noqa: E402

log = logging.getLogger("precompute")


def collect_captions(shards, caption_keys) -> tuple[list[str], Counter]:
    skipped: Counter = Counter()
    captions: dict[str, None] = {"": None}  # the unconditional caption first; a dict keeps order, drops repeats
    for caption in tqdm(read_captions(shards, caption_keys, skipped), desc="reading captions", unit=" captions"):
        captions[caption] = None
    return list(captions), skipped


def cmd_captions(args, cfg):
    captions, skipped = collect_captions(cfg.data.shards, cfg.data.caption_keys)
    captions += [p for p in cfg.logging.sample_prompts if p not in set(captions)]  # the sample grids' prompts
    encoder = CachedTextEncoder(build_text_encoder(cfg.text_encoder).to(args.device))
    for i in tqdm(range(0, len(captions), args.batch_size), desc="encoding", unit="batch"):
        encoder.encode(captions[i:i + args.batch_size])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    encoder.save(args.out)
    log.info("stored %d distinct captions (+ the empty one) in %s; skipped %s", len(captions) - 1, args.out,
             dict(skipped) or "none")
    return args.out


class LatentWriter:
    """Encodes one input shard into one latent shard (written as NAME.tmp, renamed when complete)."""

    def __init__(self, cfg, vae, text_encoder, flip: bool, batch_size: int, device, buckets=None):
        self.cfg, self.vae, self.text, self.flip = cfg, vae, text_encoder, flip
        self.batch_size, self.device = batch_size, device
        data = cfg.data
        if data.flip:  # the loader would mirror at random; here both sides are stored instead (--flip)
            from dataclasses import replace

            data = replace(data, flip=False)
        self.buckets = buckets
        self.transform = SampleTransform(data, buckets=buckets)  # the training loader's per-sample transform

    def write_shard(self, url: str, out: Path) -> dict:
        import webdataset as wds

        counts: Counter = Counter()
        tmp = out.with_name(out.name + ".tmp")
        # Samples are encoded in batches of one bucket's shape but written in the input shard's order (so that
        # training on the latents reads the same sequence as on the images): `order` holds them in input order,
        # each a dict that its batch's encoding fills in; the encoded front of it is written out.
        order: list[dict] = []
        batches: dict[int, list[dict]] = {}  # bucket → samples waiting to be encoded together
        written = 0
        with wds.TarWriter(str(tmp)) as sink:
            def encode(batch: list[dict]):
                if not batch:
                    return
                pixels = torch.from_numpy(np.stack([b["x"] for b in batch])).to(self.device)
                pixels = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1)
                z = self.vae.encode(pixels).half().cpu().numpy()
                z_flip = self.vae.encode(pixels.flip(-1)).half().cpu().numpy() if self.flip else None
                text = self.text.encode([b["caption"] for b in batch]) if self.text is not None else None
                for i, b in enumerate(batch):
                    meta = {"original_size": list(b["size"]), "crop_top_left": list(b["box"]), "source": url}
                    if self.buckets:
                        meta["bucket"] = list(self.buckets[b["bucket"]])
                    sample = {"__key__": b["key"], "latent.npy": latent_shards.npy_bytes(z[i]), "txt": b["caption"],
                              "json": meta}
                    if z_flip is not None:
                        sample["latent_flip.npy"] = latent_shards.npy_bytes(z_flip[i])
                        meta["crop_top_left_flip"] = [b["box"][0], b["mirror_left"]]  # the mirrored crop's corner
                    if text is not None:
                        sample["text.npz"] = latent_shards.npz_bytes(
                            tokens=text["tokens"][i].half().cpu().numpy(), mask=text["mask"][i].cpu().numpy(),
                            pooled=text["pooled"][i].half().cpu().numpy())
                    b["out"] = sample
                    del b["x"]
                batch.clear()

            def drain():
                nonlocal written
                while order and "out" in order[0]:
                    sink.write(order.pop(0)["out"])
                    written += 1

            for raw in read_shard(url, counts, self.cfg.data.retries, self.cfg.data.retry_delay):
                try:
                    smp = self.transform.sample(raw, 0)
                except BadSample as bad:
                    counts[bad.reason] += 1
                    continue
                item = {"x": smp.x, "caption": smp.caption, "key": smp.key, "size": smp.size, "box": smp.box,
                        "bucket": smp.bucket, "mirror_left": smp.mirror_left}
                order.append(item)
                batch = batches.setdefault(smp.bucket, [])
                batch.append(item)
                if len(batch) == self.batch_size:
                    encode(batch)
                if len(order) > 8 * self.batch_size:  # a rare bucket holds the rest back: encode it part-full
                    for batch in batches.values():
                        encode(batch)
                drain()
            for batch in batches.values():
                encode(batch)
            drain()
        info = {"source": url, "samples": written, "skipped": dict(counts)}
        write_json_atomic(out.with_suffix(".json"), info)  # before the rename: a done shard has both
        tmp.replace(out)
        return info


DAMAGE = ("unreadable_shard", "truncated_tar")  # a shard written despite these is redone by a rerun (may be transient)
OWN = re.compile(r"^(\d{5}\.(tar|json)(\.tmp)?|manifest\.json(\.tmp)?)$")  # what a latent-shard folder holds


def text_shapes(text_encoder) -> dict | None:
    if text_encoder is None:
        return None
    probe = text_encoder.encode([""])
    return {k: list(probe[k].shape[1:]) for k in ("tokens", "mask", "pooled")}


def manifest_of(cfg, vae, text_encoder, flip: bool, urls: list[str], infos: list[dict], buckets=None) -> dict:
    skipped = sum((Counter(i["skipped"]) for i in infos), Counter())
    size = cfg.data.resolution // vae.factor
    d = cfg.data
    return {"kind": latent_shards.KIND, "format": 1,
            "vae": {**vae.identity(), "source": vae.source}, "resolution": d.resolution,
            "latent_shape": [vae.channels, size, size], "dtype": "float16", "flip": flip,
            "buckets": [list(b) for b in buckets] if buckets else None,  # each latent at its bucket's shape
            "transform": {"crop": d.crop, "resize_filter": d.resize_filter, "min_size": d.min_size,
                          "max_aspect": d.max_aspect, "caption_keys": d.caption_keys,
                          "drop_empty_captions": d.drop_empty_captions, "seed": d.seed},
            "text": text_encoder.identity if text_encoder is not None else None, "text_shapes": text_shapes(text_encoder),
            "shards": [f"{i:05d}.tar" for i in range(len(urls))], "sources": urls,
            "shards_pattern": f"{{00000..{len(urls) - 1:05d}}}.tar", "samples": sum(i["samples"] for i in infos),
            "skipped": dict(skipped), "failed": sum(v for k, v in skipped.items() if k not in FILTERED),
            "complete": True}


def check_out_folder(out: Path, urls: list[str], started: dict):
    """Refuse an output folder that holds anything but this precompute's own files (the image shards themselves,
    another data set, latents made otherwise): nothing there is changed."""
    if any(Path(u).resolve().parent == out.resolve() for u in urls if "://" not in u and not u.startswith("pipe:")):
        raise ValueError(f"--out {out} is the folder of the image shards: write the latents to another folder")
    foreign = sorted(p.name for p in out.iterdir() if not OWN.match(p.name)) if out.is_dir() else []
    if foreign:
        raise ValueError(f"--out {out} holds other files ({', '.join(foreign[:3])}): write to an empty folder")
    previous = latent_shards.find_manifest([str(out / "00000.tar")])
    if previous is None and any(out.glob("*.tar")):
        raise ValueError(f"--out {out} holds .tar files but no latent manifest: write to an empty folder")
    if previous is not None:  # a rerun: the shards already there must have been made the same way
        keys = ("vae", "resolution", "latent_shape", "flip", "transform", "text", "sources")
        diff = [k for k in keys if previous.get(k) != started[k]]
        if diff:
            raise ValueError(f"{out} holds latent shards made with another {', '.join(diff)}; write to an empty "
                             f"folder (nothing there was changed)")
    return previous


def shard_done(out: Path, i: int) -> bool:
    info = out / f"{i:05d}.json"
    if not ((out / f"{i:05d}.tar").is_file() and info.is_file()):
        return False
    return not any(reason in read_json(info)["skipped"] for reason in DAMAGE)


def cmd_latents(args, cfg):
    from datetime import timedelta

    from accelerate import PartialState

    # Ranks wait for each other at the end; a long barrier must not time out (NCCL's default: 10–30 minutes).
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=12))
    rank, world = state.process_index, state.num_processes
    device = state.device if world > 1 else torch.device(args.device)
    if cfg.autoencoder.path is None:
        raise ValueError("precompute latents needs a VAE: set autoencoder.path (a VAE folder or .safetensors file)")
    urls = resolve_shards(cfg.data.shards)
    if latent_shards.find_manifest(urls) is not None:
        raise ValueError(f"data.shards={cfg.data.shards!r} already holds latents; point it at the image shards")
    vae = load_autoencoder(cfg.autoencoder, device)
    if cfg.data.resolution % vae.factor:
        raise ValueError(f"data.resolution={cfg.data.resolution} does not divide by the VAE's factor {vae.factor}")
    buckets = parse_buckets(cfg.data.buckets, cfg.data.resolution, bucket_step(cfg, vae.factor),
                            cfg.data.max_aspect) if cfg.data.buckets is not None else None
    if cfg.data.crop == "random" and state.is_main_process:
        log.warning("data.crop=random: each image is encoded once, with one random crop (and --flip stores its "
                    "mirror image); training on the latents cannot draw new crops")
    text_encoder = build_text_encoder(cfg.text_encoder).to(device) if args.text else None
    out = Path(args.out)
    started = manifest_of(cfg, vae, text_encoder, args.flip, urls, [], buckets)
    previous = check_out_folder(out, urls, started)
    # Every rank sees the same finished shards (before anyone writes) and takes its share of those left.
    todo = [i for i in range(len(urls)) if not shard_done(out, i)]
    state.wait_for_everyone()
    if previous is None and state.is_main_process:  # names what the folder holds before any shard is written
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / latent_shards.MANIFEST, {**started, "samples": None, "complete": False})
    state.wait_for_everyone()
    if len(todo) < len(urls) and state.is_main_process:
        log.info("%d of %d shards are already written; keeping them", len(urls) - len(todo), len(urls))
    writer = LatentWriter(cfg, vae, text_encoder, args.flip, args.batch_size, device, buckets)
    for i in tqdm(todo[rank::world], desc=f"encoding shards (rank {rank})", unit="shard",
                  disable=not state.is_main_process):
        info = writer.write_shard(urls[i], out / f"{i:05d}.tar")
        damage = [r for r in DAMAGE if r in info["skipped"]]
        log.log(logging.WARNING if damage else logging.INFO, "rank %d: %s → %05d.tar: %d samples, skipped %s%s",
                rank, urls[i], i, info["samples"], info["skipped"] or "none",
                "; the source shard is damaged or unreadable: a rerun tries it again" if damage else "")
    state.wait_for_everyone()
    if state.is_main_process:
        infos = [read_json(out / f"{i:05d}.json") for i in range(len(urls))]
        manifest = manifest_of(cfg, vae, text_encoder, args.flip, urls, infos, buckets)
        write_json_atomic(out / latent_shards.MANIFEST, manifest)
        log.info("wrote %d latent samples (%s) in %d shards to %s; skipped %s. Train with data.shards=%s",
                 manifest["samples"], "×".join(map(str, manifest["latent_shape"])), len(urls), out,
                 manifest["skipped"] or "none", out)
    state.wait_for_everyone()
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("captions", "latents", "-h", "--help"):
        argv = ["captions", *argv]  # the earlier form: precompute.py --config CFG --out FILE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["captions", "latents"],
                   help="captions: caption embeddings → one .safetensors file (text_encoder.cache); latents: VAE "
                        "latents (+ optional mirrored latents and caption embeddings) → latent shards")
    p.add_argument("--config", help="the run's YAML config (data, text_encoder, autoencoder are used)")
    p.add_argument("--out", required=True, help="captions: output .safetensors file; latents: output folder")
    p.add_argument("--batch-size", type=int, help="captions per encoder batch (default 256) / images per VAE batch "
                                                  "(default 32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the encoders run (one process; under accelerate launch, each process's own)")
    p.add_argument("--flip", action="store_true", help="latents: also store the latent of the mirrored crop")
    p.add_argument("--text", action="store_true", help="latents: also store each caption's text-encoder embedding")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = p.parse_intermixed_args(argv)
    args.batch_size = args.batch_size or (256 if args.command == "captions" else 32)
    if args.command == "captions" and (args.flip or args.text):
        p.error("--flip and --text belong to `latents`")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        return (cmd_captions if args.command == "captions" else cmd_latents)(args, cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
