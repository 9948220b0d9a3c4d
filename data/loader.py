"""WebDataset loading for many ranks and workers: exact, resumable epochs that continue on any number of processes,
remote shards that retry, bad samples skipped and counted.

Shards are tar files in img2dataset's layout (``key.jpg|png|webp``, ``key.txt``, ``key.json``), read with the
webdataset library's tar reader (brace patterns, local paths, ``pipe:`` and http(s) URLs; remote reads resume after
faults, ``data.remote``).

**Canonical streams** (the idea of mosaicml streaming's canonical nodes). The data are read by a fixed number S of
streams (``data.streams``; by default the first run's processes × workers, kept for the run's life). In an exact
epoch the shard list is permuted from (seed, epoch) and stream s reads shards ``order[s::S]`` through a shuffle
buffer seeded by (seed, epoch, s): its sample sequence is a pure function of those numbers. Every optimiser step
takes the same number q of samples from every stream: the step's global batch of G = batch × processes ×
accumulation samples is streams 0..S−1's next q samples, stream-major, and sample i of stream s in step k has the
global index k·G + s·q + i. Rank r owns the streams r·S/W … (r+1)·S/W − 1 (its slice of the global batch), its
DataLoader workers split those. So the sequence of global batches does not depend on the number of processes or
workers: a run stopped on 2 processes continues on 1 (or 4) with the same global batch from each stream's saved
position (epoch, raw samples consumed), replaying the stream's tar reads *without decoding* up to it. What cannot be
honoured (a global batch that S does not divide, S not divisible by the processes) is refused before the first step.

``resampled`` mode: the streams draw shards with replacement, endless; ``epoch_samples`` is the nominal epoch length
over all streams. On restore each stream starts fresh draws (resampling has no position to replay).

The stream is endless in both modes (epoch after epoch), so ranks never run out at different times and a step-based
training loop never hangs on an uneven last batch. Broken samples are skipped and counted by reason; the run stops
with :class:`DataError` only when nothing can be read or too large a fraction fails.

Latent shards (``pipeline/precompute.py latents``, see ``data.latents``) are read the same way: batches then carry
``latents`` (and, when stored, the caption embeddings) instead of images; a latent of the wrong shape or with
NaN/inf values is skipped and counted like a corrupt image.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import random
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from . import latents as latent_shards
from .images import FILTERS, BadSample, decode_image, image_keys, resize_crop
from .buckets import LOOKAHEAD, choose_bucket, nearest_bucket, parse_buckets
from .remote import RemoteShardError, open_shard

log = logging.getLogger(__name__)
IMAGE_KEYS = image_keys()
FILTERED = ("too_small", "bad_aspect", "empty_caption")  # skipped on purpose: do not count as failures
MIN_SAMPLES_FOR_FRACTION = 100  # judge the failed fraction only once this many samples were tried
STATE_VERSION = 2


class DataError(RuntimeError):
    """The data cannot feed training: nothing readable, or too many broken samples."""


@dataclass
class DataConfig:
    """The data section of a run's config."""

    shards: str | list[str] = "toy_shards/{00000..00007}.tar"  # brace pattern, glob, folder, list, pipe:/http URL
    mode: str = "exact"  # exact | resampled
    epoch_samples: int = 0  # resampled: nominal samples per epoch over all ranks (required there)
    resolution: int = 32
    crop: str = "center"  # center | random
    flip: bool = False  # random horizontal flip (mind captions that say "left"/"right")
    resize_filter: str = "bicubic"  # lanczos | bicubic | bilinear | box (PIL's anti-aliased filters)
    jpeg_draft: bool = True  # let the JPEG decoder downscale big photos by 2^k first (stays ≥ 2× the target)
    shuffle_buffer: int = 1000  # samples held per stream for shuffling (0 = shard order)
    caption_keys: list[str] = field(default_factory=lambda: ["txt", "json.caption"])  # first one present wins
    drop_empty_captions: bool = False  # otherwise "" is kept (it is the unconditional caption anyway)
    min_size: int = 0  # drop images whose shorter side is below this (0 = keep all)
    max_aspect: float = 0.0  # drop images with long/short side ratio above this (0 = keep all)
    max_bad_fraction: float = 0.2  # stop when more than this fraction of tried samples is broken
    latent_manifest: str | None = None  # latent shards behind URLs: a local copy of their manifest.json
    num_workers: int = 2  # DataLoader worker processes per rank
    # Canonical streams reading the shards (see the module docstring); 0 = processes × workers of the run's first
    # start (the largest such count the global batch divides), then kept: a resumed run reads the same sequence on
    # any number of processes.
    streams: int = 0
    # Aspect-ratio buckets (data/buckets.py): a list of [width, height], or "auto" (about resolution² pixels, sides
    # multiples of bucket_step, up to max_aspect or 2:1); null = square crops of `resolution`
    buckets: list[list[int]] | str | None = None
    bucket_step: int = 0  # bucket sides' multiple: the VAE's factor × the U-Net's downsampling (the job sets it)
    retries: int = 5  # http(s) and pipe: shards: attempts after a transient failure before skipping the shard's rest
    retry_delay: float = 1.0  # seconds before the first retry, doubled after each (at most 60)
    seed: int = 0

    def validate(self):
        if self.mode not in ("exact", "resampled"):
            raise ValueError(f"data.mode must be 'exact' or 'resampled', got {self.mode!r}")
        if self.mode == "resampled" and self.epoch_samples <= 0:
            raise ValueError("data.mode=resampled needs data.epoch_samples > 0 (the nominal epoch length)")
        if self.crop not in ("center", "random"):
            raise ValueError(f"data.crop must be 'center' or 'random', got {self.crop!r}")
        if self.resize_filter not in FILTERS:
            raise ValueError(f"data.resize_filter must be one of {sorted(FILTERS)}, got {self.resize_filter!r}")
        if self.resolution < 1 or self.num_workers < 0 or self.shuffle_buffer < 0 or self.streams < 0:
            raise ValueError("data.resolution must be ≥ 1, data.num_workers, data.shuffle_buffer and data.streams ≥ 0")
        if not 0 < self.max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be in (0, 1], got {self.max_bad_fraction}")
        if not 0 <= self.retries <= 100:
            raise ValueError(f"data.retries must be in [0, 100], got {self.retries}")
        if not 0 <= self.retry_delay <= 600:
            raise ValueError(f"data.retry_delay must be in [0, 600] seconds, got {self.retry_delay}")
        if self.max_aspect and self.max_aspect < 1:
            raise ValueError(f"data.max_aspect is a long/short side ratio: 0 (off) or ≥ 1, got {self.max_aspect}")
        if self.bucket_step < 0:
            raise ValueError(f"data.bucket_step must be ≥ 0, got {self.bucket_step}")
        if self.buckets is not None and self.buckets != "auto":  # a list: checked now, before any model loads
            parse_buckets(self.buckets, self.resolution, self.bucket_step, self.max_aspect)


def _is_url(s: str) -> bool:
    return s.startswith("pipe:") or "://" in s


def resolve_shards(spec: str | list[str]) -> list[str]:
    """Expand a shard spec to a list of URLs: brace patterns (``{000..099}``), ``::``-joined lists, globs, folders
    (every ``*.tar`` inside) and URLs. Local files are checked: a spec that matches no file is an error."""
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        for url in wds.shardlists.expand_urls(os.path.expanduser(item)):
            if _is_url(url):
                urls.append(url)
            elif os.path.isdir(url):
                urls.extend(sorted(glob.glob(os.path.join(url, "*.tar"))))
            elif any(c in url for c in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    local = [u for u in urls if not _is_url(u)]
    if not urls or (local and not any(os.path.isfile(u) for u in local)):
        hint = " (write toy shards with: python -m data.write_shards toy --out toy_shards)" if "toy" in str(spec) else ""
        raise FileNotFoundError(f"data.shards={spec!r} matches no file{hint}")
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        log.warning("%d of %d shards do not exist and will be counted as unreadable, e.g. %s",
                    len(missing), len(urls), missing[0])
    return urls


def _tar_error_reason(exn: Exception) -> str:
    if isinstance(exn, RemoteShardError):
        return "remote_shard_failed"
    if isinstance(exn, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return "unreadable_shard"
    if isinstance(exn, ValueError) and "duplicate" in str(exn):
        return "duplicate_member"
    return "truncated_tar"  # tarfile.ReadError / EOFError / a short read: the shard ends early


def read_shard(url: str, counts: Counter, retries: int = 5, retry_delay: float = 1.0):
    """Yield the raw samples ({"__key__", "__url__", ext: bytes}) of one shard. An unreadable shard, a truncated tar or
    a remote shard whose retries ran out is counted once (by reason) and the samples read before are kept."""
    failed = []

    def handler(exn: Exception) -> bool:
        if not failed:
            failed.append(_tar_error_reason(exn))
            counts[failed[0]] += 1
            log.warning("shard %s: %s (%s); keeping the samples before it", url, failed[0], exn)
        return True  # go on with what can still be read

    try:
        stream = open_shard(url, retries, retry_delay, counts)
    except Exception as exn:  # noqa: BLE001 — any failure to open is an unreadable shard
        counts["remote_shard_failed" if isinstance(exn, RemoteShardError) else "unreadable_shard"] += 1
        log.warning("shard %s cannot be opened (%s); skipping it", url, exn)
        return

    def files():
        try:
            for f in tar_file_iterator(stream, handler=handler):
                f["__url__"] = url
                yield f
        except Exception as exn:  # noqa: BLE001 — errors between members (a cut header) end the shard
            handler(exn)

    try:
        yield from group_by_keys(files(), handler=handler)
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001 — a pipe that failed says so at close: already counted
            pass


def caption_of(raw: dict, keys: list[str]) -> str:
    """The caption of a raw sample: the first of ``keys`` present ("txt", or "json.FIELD"); raises BadSample."""
    for key in keys:
        ext, _, fld = key.partition(".")
        if ext not in raw:
            continue
        try:
            text = raw[ext].decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample("bad_caption_encoding") from None
        if not fld:
            return text.strip()
        try:
            value = json.loads(text).get(fld)
        except (json.JSONDecodeError, AttributeError):
            raise BadSample("bad_json") from None
        if value is not None:
            return str(value).strip()
    raise BadSample("missing_caption")


def read_captions(spec, keys: list[str], skipped: Counter):
    """Every caption in the shards, in order, without decoding images (unusable captions are counted)."""
    for url in resolve_shards(spec):
        for raw in read_shard(url, skipped):
            try:
                yield caption_of(raw, keys)
            except BadSample as bad:
                skipped[bad.reason] += 1


@dataclass
class Sample:
    """One decoded training sample."""

    x: np.ndarray  # image uint8 (H, W, 3), or latent (C, h, w) (a tensor once a bucketing worker hands it over)
    caption: str
    key: str
    size: tuple[int, int]  # original (width, height)
    text: dict | None  # stored caption embedding (latent shards)
    box: tuple[int, int]  # the crop's (top, left) in the resized image
    bucket: int  # index into data.buckets (0 without buckets)
    mirror_left: int = 0  # the left of the same crop in the mirrored resized image (precompute --flip stores it)


class SampleTransform:
    """raw sample → what training takes: the decode, filters, resize and crop of image shards (to the nearest
    aspect-ratio bucket when there are buckets), or the stored latent (and caption embedding) of latent shards.
    Shared by the loader, the latent precompute, data.inspect and the validation loss."""

    def __init__(self, cfg: DataConfig, manifest: dict | None = None, buckets: list[tuple[int, int]] | None = None):
        self.cfg, self.manifest, self.buckets = cfg, manifest, buckets

    def __call__(self, raw: dict, epoch: int, box: list | None = None):
        """→ (image uint8 (R, R, 3) or latent (C, h, w), caption, key, (w, h), text embedding or None); raises
        BadSample. ``box`` receives the crop's [top, left]."""
        smp = self.sample(raw, epoch)
        if box is not None:
            box[:] = list(smp.box)
        return smp.x, smp.caption, smp.key, smp.size, smp.text

    def sample(self, raw: dict, epoch: int) -> Sample:
        """The decoded :class:`Sample`; raises BadSample."""
        cfg = self.cfg
        caption = caption_of(raw, ["txt"] if self.manifest is not None else cfg.caption_keys)  # precompute writes txt
        if not caption and cfg.drop_empty_captions:
            raise BadSample("empty_caption")
        if self.manifest is not None:
            return self.latent(raw, epoch, caption)
        if "latent.npy" in raw:
            raise DataError(f"{raw.get('__url__')} holds latents, but no manifest.json was found beside the first "
                            f"shard: keep the precompute's manifest.json with its shards, or name a local copy with "
                            f"data.latent_manifest=PATH (shards behind URLs)")
        ext = next((k for k in IMAGE_KEYS if k in raw), None)
        if ext is None:
            raise BadSample("missing_image")
        stored: list = []
        img = decode_image(raw[ext], draft_size=2 * cfg.resolution if cfg.jpeg_draft else None, size=stored)
        size = tuple(stored)  # the file's own size (a JPEG draft decodes smaller): SDXL's "original size"
        if cfg.min_size and min(size) < cfg.min_size:
            raise BadSample("too_small")
        if cfg.max_aspect and max(size) / min(size) > cfg.max_aspect:
            raise BadSample("bad_aspect")
        rng = None
        if cfg.crop == "random" or cfg.flip:  # per-sample RNG: the same crop whatever the worker or position
            rng = np.random.default_rng([cfg.seed, epoch, zlib.crc32(raw["__key__"].encode())])
        bucket = nearest_bucket(size, self.buckets) if self.buckets else 0
        target = self.buckets[bucket] if self.buckets else cfg.resolution
        box: list = []
        arr = resize_crop(img, target, cfg.crop, cfg.flip, rng, cfg.resize_filter, box)
        return Sample(arr, caption, raw["__key__"], size, None, tuple(box[:2]), bucket, box[2])

    def latent(self, raw: dict, epoch: int, caption: str) -> Sample:
        """A latent-shard sample: the stored latent (the mirrored one half of the time with data.flip, chosen as
        the image path chooses), checked for shape (its bucket's, with buckets) and finiteness."""
        name = "latent.npy"
        if self.cfg.flip and np.random.default_rng([self.cfg.seed, epoch, zlib.crc32(raw["__key__"].encode())]) \
                .random() < 0.5:
            name = "latent_flip.npy"
        try:
            meta = json.loads(raw["json"]) if "json" in raw else {}
            size = tuple(meta.get("original_size", (0, 0)))
            box = tuple(meta.get("crop_top_left", (0, 0)))
            if name == "latent_flip.npy":  # the mirrored crop's corner, as the image path gives it
                box = tuple(meta.get("crop_top_left_flip", box))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise BadSample("bad_json") from None
        bucket, shape = 0, self.manifest["latent_shape"]
        if self.buckets:
            wanted = tuple(meta.get("bucket", ()))
            if wanted not in self.buckets:
                raise BadSample("bad_bucket", f"{wanted} is not one of data.buckets")
            bucket = self.buckets.index(wanted)
            factor = self.manifest["vae"]["factor"]
            shape = [self.manifest["latent_shape"][0], wanted[1] // factor, wanted[0] // factor]
        z = latent_shards.read_latent(raw.get(name), shape)
        text = latent_shards.read_text(raw["text.npz"], self.manifest.get("text_shapes")) \
            if self.manifest.get("text") and "text.npz" in raw else None
        if self.manifest.get("text") and text is None:
            raise BadSample("missing_text_embedding")
        return Sample(z, caption, raw["__key__"], size, text, box, bucket)


def hash_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers, the same in every process and interpreter."""
    return int.from_bytes(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32).tobytes(),
                          "little") >> 1


@dataclass(frozen=True)
class Layout:
    """How a run's global batch is read: S streams, q samples from each per step, W ranks of S/W streams each."""

    streams: int
    per_stream: int  # q
    world_size: int
    grad_accum: int
    batch_size: int  # per rank, per micro-step

    @property
    def global_batch(self) -> int:
        return self.streams * self.per_stream

    def rank_streams(self, rank: int) -> list[int]:
        k = self.streams // self.world_size
        return list(range(rank * k, (rank + 1) * k))

    @classmethod
    def plan(cls, streams: int, batch_size: int, world_size: int, grad_accum: int, workers: int) -> "Layout":
        """The layout of a run (``streams`` 0: chosen from the processes and workers); ValueError if it cannot be."""
        g = batch_size * world_size * grad_accum
        if streams == 0:  # W × the most workers (up to num_workers) that a rank's share of the batch divides by
            streams = world_size * math.gcd(max(workers, 1), batch_size * grad_accum)
        if g % streams:
            raise ValueError(f"the global batch of {g} samples (optim.batch_size {batch_size} × {world_size} processes "
                             f"× grad_accum {grad_accum}) does not divide among the run's {streams} data streams: use "
                             f"a global batch that is a multiple of {streams} (the streams are fixed for the run's "
                             f"life, data.streams)")
        if streams % world_size:
            raise ValueError(f"the run's {streams} data streams do not divide among {world_size} processes: use a "
                             f"number of processes that divides {streams} (or that {streams} is a multiple of)")
        return cls(streams, g // streams, world_size, grad_accum, batch_size)


class ShardStream(IterableDataset):
    """One rank's streams, split over its DataLoader workers (worker w reads ``streams[w::workers]``). Each item is
    one round of a worker: q samples of each of its streams, stream by stream. Without buckets, as a dict of stacked
    arrays: images (n, R, R, 3) uint8 (or latents), text, captions, keys, sizes (n, 2), boxes (n, 2), epochs,
    ``streams`` (the stream of each sample), ``positions`` {stream: (epoch, raw samples consumed)} after the item,
    and the streams' skip counts. With buckets (shapes differ), ``samples``: a list of (Sample, epoch, position,
    requeued) instead of the arrays; ``requeued`` marks a sample a resumed run puts back into its bucket's queue."""

    def __init__(self, cfg: DataConfig, urls: list[str], streams: list[int], layout: Layout,
                 starts: dict[int, tuple[int, int]], counts: dict[int, dict], resume_round: int = 0,
                 manifest: dict | None = None, buckets: list[tuple[int, int]] | None = None,
                 queued: dict[int, list] | None = None):
        self.cfg, self.urls, self.streams, self.layout = cfg, urls, streams, layout
        self.starts, self.counts = starts, counts  # stream → (epoch, consumed); stream → skip counts so far
        self.queued = queued or {}  # stream → [(epoch, position)] waiting in bucket queues at the checkpoint
        self.resume_round = resume_round
        self.transform = SampleTransform(cfg, manifest, buckets)
        self.manifest, self.buckets = manifest, buckets

    # -- raw sample streams ------------------------------------------------------------------------------------
    def _shuffled(self, samples, *seed):
        if self.cfg.shuffle_buffer <= 1:
            return samples
        rng = random.Random(hash_seed(self.cfg.seed, *seed))
        return wds.filters.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng)(samples)

    def epoch_shards(self, epoch: int, stream: int) -> list[str]:
        """The shards stream ``stream`` reads in exact epoch ``epoch``: its share of a permutation by (seed, epoch)."""
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.urls))
        return [self.urls[i] for i in order[stream::self.layout.streams]]

    def _read(self, url, counts):
        return read_shard(url, counts, self.cfg.retries, self.cfg.retry_delay)

    def exact_raw(self, stream: int, counts: Counter):
        """(epoch, position, raw sample, requeued) of a stream from its saved position on: position is the count of
        raw samples read in the epoch. Samples waiting in bucket queues at the checkpoint are read again (without
        decoding what lies between them) and marked requeued."""
        last = tuple(self.starts.get(stream, (0, 0)))  # the last sample taken (or admitted to a queue)
        queued = {tuple(p) for p in self.queued.get(stream, [])}
        epoch, skip = min(queued) if queued else last
        skip = skip - 1 if queued else skip
        while True:
            shards = self.epoch_shards(epoch, stream)
            raw = (s for url in shards for s in self._read(url, counts))
            n = 0
            for n, sample in enumerate(self._shuffled(raw, epoch, stream), start=1):
                if n <= skip:
                    continue
                if (epoch, n) <= last:
                    if (epoch, n) in queued:
                        yield epoch, n, sample, True
                    continue
                yield epoch, n, sample, False
            if n == 0:
                raise DataError(f"data stream {stream}: no sample could be read from its shards {shards} in epoch "
                                f"{epoch} (skipped so far: {dict(counts)})")
            epoch, skip = epoch + 1, 0

    def resampled_raw(self, stream: int, counts: Counter):
        epoch, consumed = self.starts.get(stream, (0, 0))
        total, s = self.cfg.epoch_samples, self.layout.streams
        quota = total // s + (stream < total % s)
        rng = random.Random(hash_seed(self.cfg.seed, stream, self.resume_round))

        def raw():
            empty_in_a_row = 0
            while True:
                got = False
                for sample in self._read(rng.choice(self.urls), counts):
                    got = True
                    yield sample
                empty_in_a_row = 0 if got else empty_in_a_row + 1
                if empty_in_a_row >= 2 * len(self.urls) + 2:
                    raise DataError(f"data stream {stream}: {empty_in_a_row} shards in a row gave no sample "
                                    f"(skipped so far: {dict(counts)})")

        for sample in self._shuffled(raw(), stream, self.resume_round):
            consumed += 1
            if consumed > quota:
                epoch, consumed = epoch + 1, 1
            yield epoch, consumed, sample, False

    def samples(self, stream: int, counts: Counter, tally: list[int]):
        """The usable samples of a stream: (Sample, epoch, position, requeued); bad ones counted (once: a sample
        read again for its bucket queue decoded fine the first time)."""
        raws = self.exact_raw if self.cfg.mode == "exact" else self.resampled_raw
        for epoch, consumed, raw, requeued in raws(stream, counts):
            tally[0] += 1
            try:
                yield self.transform.sample(raw, epoch), epoch, (epoch, consumed), requeued
            except BadSample as bad:
                counts[bad.reason] += 1
                tally[1] += bad.reason not in FILTERED
                tried, failed = tally
                if tried >= MIN_SAMPLES_FOR_FRACTION and failed / tried > self.cfg.max_bad_fraction:
                    raise DataError(
                        f"data stream {stream}: {failed} of {tried} samples failed ({dict(counts)}), above "
                        f"data.max_bad_fraction={self.cfg.max_bad_fraction}. Inspect the shards with "
                        f"`python -m data.inspect SHARDS`, or raise the limit.") from None

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.streams[worker::num_workers]
        counts = {s: Counter(self.counts.get(s, {})) for s in mine}
        tally = [0, 0]  # samples tried, failed (this worker, for max_bad_fraction)
        its = {s: self.samples(s, counts[s], tally) for s in mine}
        positions = dict(self.starts)
        q = self.layout.per_stream
        while True:
            items, streams = [], []
            for s in mine:
                for _ in range(q):
                    smp, epoch, positions[s], requeued = next(its[s])
                    items.append((smp, epoch, positions[s], requeued))
                    streams.append(s)
            common = {"streams": streams, "positions": {s: positions[s] for s in mine},
                      "counts": {s: dict(counts[s]) for s in mine}}
            if self.buckets:  # tensors, not arrays: a worker hands them over in shared memory, not through a pipe
                for smp, *_ in items:
                    smp.x = torch.from_numpy(np.require(smp.x, requirements="W"))  # PIL gives read-only arrays
                    smp.text = {k: torch.from_numpy(v) for k, v in smp.text.items()} if smp.text is not None else None
                yield {**common, "samples": items}
                continue
            smps = [i[0] for i in items]
            text = {k: np.stack([m.text[k] for m in smps]) for k in smps[0].text} if smps[0].text is not None else None
            yield {**common, "latents" if self.manifest is not None else "images": np.stack([m.x for m in smps]),
                   "text": text, "captions": [m.caption for m in smps], "keys": [m.key for m in smps],
                   "sizes": np.array([m.size for m in smps]), "boxes": np.array([m.box for m in smps]),
                   "epochs": [i[1] for i in items]}


@dataclass
class Batch:
    images: torch.Tensor | None  # (B, 3, H, W) uint8 — 4× less to move than floats; convert with pixels(). None
    captions: list[str]           # for latent shards, which give ``latents`` (B, C, h, w) float16 instead
    keys: list[str]
    epochs: list[int]  # the epoch each sample belongs to
    sizes: torch.Tensor  # (B, 2) original (width, height)
    latents: torch.Tensor | None = None
    text: dict[str, torch.Tensor] | None = None  # stored caption embeddings (tokens, mask, pooled), when the shards have them
    index: list[int] = field(default_factory=list)  # each sample's global index k·G + s·q + i (seeds its noise)
    boxes: torch.Tensor | None = None  # (B, 2) the crop's (top, left) in the resized image

    def pixels(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """The images as contiguous (B, 3, H, W) ``dtype`` in [-1, 1], converted on ``device``.

        ``images`` is a channels-last view of the workers' (B, H, W, 3) arrays; without the explicit format the
        whole U-Net would silently run channels_last (on a CPU, bf16 GroupNorm is 2x slower that way)."""
        return self.images.to(device, non_blocking=True).to(dtype, memory_format=torch.contiguous_format) \
            .div_(127.5).sub_(1.0)

    def micro(self, factor: int = 1) -> torch.Tensor:
        """SDXL's size and crop conditioning per sample (Podell et al. 2023): (B, 6) float32 = original (height,
        width), crop (top, left), target (height, width) in pixels (``factor``: the VAE's, for latents)."""
        x = self.images if self.images is not None else self.latents
        h, w = x.shape[-2:]
        target = torch.tensor([h * factor, w * factor], dtype=torch.float32).expand(len(self.keys), 2)
        sizes = self.sizes.float()[:, [1, 0]]  # (w, h) → (h, w)
        boxes = self.boxes.float() if self.boxes is not None else torch.zeros(len(self.keys), 2)
        return torch.cat([sizes, boxes, target], dim=1)


def _cat(parts: list[dict], key: str):
    if parts[0][key] is None:
        return None
    if isinstance(parts[0][key], dict):
        return {k: torch.cat([torch.as_tensor(p[key][k]) for p in parts]) for k in parts[0][key]}
    return torch.cat([torch.as_tensor(p[key]) for p in parts])


def _gather(local: dict, world: int) -> dict:
    """Every rank's dict merged (a collective when there are several processes)."""
    if world == 1:
        return dict(local)
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("bucketed loading on several processes needs torch.distributed (the job initialises it)")
    parts = [None] * world
    dist.all_gather_object(parts, local)
    return {k: v for p in parts for k, v in p.items()}


class Loader:
    """Micro-batches of ``batch_size`` for one rank, endless, with a position that can be saved and restored on any
    number of processes.

    Each optimiser step reads one global batch (``grad_accum`` micro-batches per rank; see the module docstring).
    ``state_dict()`` after k steps, merged over the ranks (``merge_states``) and passed to a new
    ``Loader(..., state=...)`` on W' processes with the same global batch, makes the run continue with global batch
    k+1 exactly (exact mode). ``skipped`` counts skipped samples by reason (and remote retries). With
    ``data.buckets`` every global batch is of one bucket's shape (data/buckets.py).
    """

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int | None = None, world_size: int | None = None,
                 state: dict | None = None, pin_memory: bool = False, grad_accum: int = 1):
        cfg.validate()
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank, world_size = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
        self.cfg, self.batch_size, self.rank, self.world_size = cfg, batch_size, rank, world_size
        self.grad_accum = grad_accum
        self.urls = resolve_shards(cfg.shards)
        self.manifest = latent_shards.find_manifest(self.urls, cfg.latent_manifest)  # None: image shards
        self.buckets = parse_buckets(cfg.buckets, cfg.resolution, cfg.bucket_step, cfg.max_aspect)
        if self.manifest is not None:
            for warning in latent_shards.check_transform(self.manifest, cfg):
                if rank == 0:
                    log.warning(warning)
            if cfg.crop == "random" and rank == 0:
                log.warning("data.crop=random on latent shards: each image keeps the one crop it was encoded with")
            made = [tuple(b) for b in self.manifest.get("buckets") or []] or None
            if made != self.buckets:
                raise ValueError(f"the latent shards were made with buckets {made} but data.buckets gives "
                                 f"{self.buckets}: train with the buckets the latents were made with, or precompute "
                                 f"again")
        if self.manifest is not None and cfg.flip and not self.manifest.get("flip"):
            raise ValueError(f"data.flip=true but the latent shards {cfg.shards!r} hold no mirrored latents: set "
                             f"data.flip=false, or precompute them again with --flip")
        streams = cfg.streams
        if state is not None:
            self._check_state(state)
            streams = state["streams"]
        self.layout = Layout.plan(streams, batch_size, world_size, grad_accum, cfg.num_workers)
        mine = self.layout.rank_streams(rank)
        if cfg.mode == "exact" and len(self.urls) < self.layout.streams:
            raise ValueError(
                f"exact-epoch mode gives every data stream whole shards, so it needs at least data.streams = "
                f"{self.layout.streams} shards (processes × workers unless set); found {len(self.urls)}. Write smaller "
                f"shards (python -m data.write_shards ... --max-samples N), lower data.num_workers or data.streams, "
                f"or use data.mode=resampled.")
        # DataLoader workers: as many as divide this rank's streams evenly (each yields one piece per step)
        self.num_workers = math.gcd(cfg.num_workers, len(mine)) if cfg.num_workers else 0
        if cfg.num_workers > self.num_workers and rank == 0:
            log.info("data: %d of data.num_workers=%d DataLoader workers per process read its %d stream(s)",
                     self.num_workers, cfg.num_workers, len(mine))
        self.positions: dict[int, tuple[int, int]] = {}
        self._counts: dict[int, dict] = {}
        self.steps = 0  # global batches delivered since the start of the run (restored ones included)
        self.resume_round = 0
        self.queued: dict[int, list] = {}  # bucket mode: stream → [(epoch, position)] waiting, from the checkpoint
        if state is not None:
            self.positions = {int(s): tuple(p) for s, p in state["positions"].items() if int(s) in mine}
            self._counts = {int(s): dict(c) for s, c in state["skipped"].items() if int(s) in mine}
            missing = [s for s in mine if s not in self.positions]
            if missing and state["steps"]:
                raise ValueError(f"the saved data position lacks streams {missing[:5]}: the checkpoint holds only some "
                                 f"ranks' positions; resume from a complete checkpoint")
            self.steps = state["steps"]
            self.resume_round = state.get("resume_round", 0) + 1
            if cfg.mode == "exact":
                self.queued = {int(s): [tuple(p) for p in q] for s, q in (state.get("queued") or {}).items()
                               if int(s) in mine}
            if cfg.mode == "resampled" and state.get("world_size") not in (None, world_size) and rank == 0:
                log.warning("resampled data on another number of processes: each stream starts fresh random draws")
        self.dataset = ShardStream(cfg, self.urls, mine, self.layout, dict(self.positions), dict(self._counts),
                                   resume_round=self.resume_round, manifest=self.manifest, buckets=self.buckets,
                                   queued={s: [list(p) for p in q] for s, q in self.queued.items()})
        self.pin_memory = pin_memory
        self.mine = mine
        # bucket mode: per stream, decoded samples not yet admitted, and per-bucket queues of admitted ones
        self._pending: dict[int, list] = {s: [] for s in mine}
        self._queues: dict[int, list[list]] = {s: [[] for _ in self.buckets or [0]] for s in mine}

    def _check_state(self, state: dict):
        if state.get("version") != STATE_VERSION:
            raise ValueError("the saved data position was written by an older version of the loader (per-rank "
                             "streams): it cannot be continued exactly; start a new run, or resume with the version "
                             "that wrote it")
        g = self.batch_size * self.world_size * self.grad_accum
        mine = {"mode": self.cfg.mode, "num_shards": len(self.urls), "global_batch": g,
                "buckets": [list(b) for b in self.buckets] if self.buckets else None}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if self.cfg.streams and self.cfg.streams != state["streams"]:
            diff["streams"] = (state["streams"], self.cfg.streams)
        if diff:
            raise ValueError(f"the saved data position does not fit this run: {diff} (saved, now). Resume with the same "
                             f"data config and global batch (optim.batch_size × processes × optim.grad_accum = "
                             f"{state.get('global_batch')}); the number of processes and workers may change.")

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """One position from every rank's ``state_dict()`` (each holds its own streams)."""
        first = states[0]
        for st in states[1:]:
            if st.get("steps") != first.get("steps") or st.get("streams") != first.get("streams"):
                raise ValueError("the ranks' saved data positions disagree (a damaged checkpoint?)")
        merged = {k: v for k, v in first.items() if k not in ("positions", "skipped", "rank", "queued")}
        for key in ("positions", "skipped", "queued"):
            merged[key] = {s: p for st in states for s, p in (st.get(key) or {}).items()}
        return merged

    def __iter__(self):
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory and not self.buckets, persistent_workers=False,
                            prefetch_factor=4 if self.num_workers else None)
        pieces = iter(loader)
        if self.buckets:
            yield from self._bucketed(pieces)
            return
        lay, b = self.layout, self.batch_size
        first = self.rank * (lay.streams // lay.world_size) * lay.per_stream  # the rank's offset in a global batch
        while True:
            parts = [next(pieces) for _ in range(max(self.num_workers, 1))]  # one piece per worker: this step
            for p in parts:
                self.positions.update({int(s): tuple(pos) for s, pos in p["positions"].items()})
                self._counts.update({int(s): c for s, c in p["counts"].items()})
            # stream-major: sort the samples by stream (each worker's pieces are stream by stream already)
            streams = [s for p in parts for s in p["streams"]]
            order = torch.as_tensor(np.argsort(np.asarray(streams), kind="stable"))
            key = "latents" if self.manifest is not None else "images"
            data, text = _cat(parts, key)[order], _cat(parts, "text")
            text = {k: v[order] for k, v in text.items()} if text is not None else None
            listed = {k: [x for p in parts for x in p[k]] for k in ("captions", "keys", "epochs")}
            listed = {k: [v[i] for i in order.tolist()] for k, v in listed.items()}
            sizes, boxes = _cat(parts, "sizes")[order], _cat(parts, "boxes")[order]
            if self.pin_memory:  # the reordering made new (pageable) tensors: pin them for non-blocking copies
                data = data.pin_memory()
                text = {k: v.pin_memory() for k, v in text.items()} if text is not None else None
            base = self.steps * lay.global_batch + first
            self.steps += 1
            for m in range(lay.grad_accum):
                sl = slice(m * b, (m + 1) * b)
                x = data[sl]
                images = x.permute(0, 3, 1, 2) if key == "images" else None  # (B, H, W, 3) → (B, 3, H, W), uint8
                yield Batch(images, listed["captions"][sl], listed["keys"][sl], listed["epochs"][sl], sizes[sl],
                            x if key == "latents" else None, {k: v[sl] for k, v in text.items()} if text else None,
                            list(range(base + m * b, base + (m + 1) * b)), boxes[sl])

    # -- buckets ----------------------------------------------------------------------------------------------------
    def _pull(self, pieces):
        """One round of the DataLoader (a piece from every worker): decoded samples into their streams' pending lists,
        the requeued ones (a resumed run's waiting samples) straight back into their bucket queues."""
        for _ in range(max(self.num_workers, 1)):
            p = next(pieces)
            self._counts.update({int(s): c for s, c in p["counts"].items()})
            for s, (smp, epoch, pos, requeued) in zip(p["streams"], p["samples"]):
                if requeued:
                    self._queues[s][smp.bucket].append((smp, epoch, tuple(pos)))
                    self._restoring[s] -= 1
                else:
                    self._pending[s].append((smp, epoch, tuple(pos)))

    def _admit(self, s: int, pieces):
        while not self._pending[s]:
            self._pull(pieces)
        smp, epoch, pos = self._pending[s].pop(0)
        self._queues[s][smp.bucket].append((smp, epoch, pos))
        self.positions[s] = pos

    def _bucketed(self, pieces):
        """The bucket batcher (data/buckets.py): per step, the bucket with q samples queued in every stream and the
        most in all, the oldest q of each stream's queue of it. Collective: one all-gather of queue lengths per try."""
        lay, b, q = self.layout, self.batch_size, self.layout.per_stream
        first = self.rank * (lay.streams // lay.world_size) * q
        self._restoring = {s: len(self.queued.get(s, [])) for s in self.mine}
        while any(self._restoring.values()):  # a resumed run: the waiting samples back in their queues first
            self._pull(pieces)
            for s, left in self._restoring.items():
                if left and self._pending[s]:  # a new sample came first: the rest could not be read again
                    log.warning("data stream %d: %d sample(s) waiting in bucket queues at the checkpoint could not be "
                                "read again (counted among the skipped samples); going on without them", s, left)
                    self._restoring[s] = 0
        for s in self.mine:
            if self.queued.get(s):
                self.positions.setdefault(s, tuple(self.dataset.starts.get(s, (0, 0))))
        limit = 64 * q  # samples a stream may admit looking for a bucket every stream can fill
        while True:
            for s in self.mine:  # look ahead: every stream holds LOOKAHEAD·q admitted samples
                while sum(map(len, self._queues[s])) < LOOKAHEAD * q:
                    self._admit(s, pieces)
            tries = 0
            while True:
                counts = _gather({s: [len(x) for x in self._queues[s]] for s in self.mine}, lay.world_size)
                full = [[c if c >= q else 0 for c in counts[s]] for s in sorted(counts)]
                feasible = [all(row[i] for row in full) for i in range(len(self.buckets))]
                if any(feasible):
                    bucket = choose_bucket([[c if feasible[i] else -1 for i, c in enumerate(counts[s])]
                                            for s in sorted(counts)])
                    break
                tries += 1
                if tries > limit:
                    raise DataError(f"no bucket holds {q} samples in every data stream after {limit} more samples "
                                    f"each: the shapes are too uneven across the shards; use fewer buckets or fewer "
                                    f"data.streams")
                for s in self.mine:
                    self._admit(s, pieces)
            taken = []
            for s in self.mine:
                taken += self._queues[s][bucket][:q]
                del self._queues[s][bucket][:q]
            base = self.steps * lay.global_batch + first
            self.steps += 1
            key = "latents" if self.manifest is not None else "images"
            x = torch.stack([t[0].x for t in taken])
            if key == "images":
                x = x.permute(0, 3, 1, 2)  # (B, H, W, 3) → (B, 3, H, W), uint8
            texts = [t[0].text for t in taken]
            text = {k: torch.stack([t[k] for t in texts]) for k in texts[0]} if texts[0] else None
            sizes = torch.tensor([t[0].size for t in taken])
            boxes = torch.tensor([t[0].box for t in taken])
            for m in range(lay.grad_accum):
                sl = slice(m * b, (m + 1) * b)
                yield Batch(x[sl] if key == "images" else None, [t[0].caption for t in taken[sl]],
                            [t[0].key for t in taken[sl]], [t[1] for t in taken[sl]], sizes[sl],
                            x[sl] if key == "latents" else None, {k: v[sl] for k, v in text.items()} if text else None,
                            list(range(base + m * b, base + (m + 1) * b)), boxes[sl])

    @property
    def waiting(self) -> int:
        """Samples of this rank's streams waiting in bucket queues (carried over, never dropped)."""
        return sum(len(x) for qs in self._queues.values() for x in qs) if self.buckets else 0

    @property
    def skipped(self) -> dict[str, int]:
        total = Counter()
        for counts in self._counts.values():
            total.update(counts)
        return dict(total)

    @property
    def epoch(self) -> int:
        """The epoch the slowest of this rank's streams is in (0 before any batch)."""
        return min((e for e, _ in self.positions.values()), default=0)

    def state_dict(self) -> dict:
        """JSON-serialisable position of this rank's streams (merge every rank's with ``merge_states``)."""
        out = {"version": STATE_VERSION, "mode": self.cfg.mode, "streams": self.layout.streams,
               "global_batch": self.layout.global_batch, "num_shards": len(self.urls), "steps": self.steps,
               "world_size": self.world_size, "rank": self.rank, "resume_round": self.resume_round,
               "buckets": [list(b) for b in self.buckets] if self.buckets else None,
               "positions": {str(s): list(p) for s, p in self.positions.items()},
               "skipped": {str(s): c for s, c in self._counts.items()}}
        if self.buckets:  # the admitted samples still waiting, by position, in admission order
            out["queued"] = {str(s): sorted([list(t[2]) for x in self._queues[s] for t in x]) for s in self.mine}
        return out
