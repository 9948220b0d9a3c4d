"""WebDataset loading for many ranks and workers, with an exact, resumable epoch and bad-sample skipping.

Shards are tar files in img2dataset's layout (``key.jpg|png|webp``, ``key.txt``, ``key.json``), read with the
webdataset library (brace patterns, local paths, ``pipe:`` and http URLs). Two modes:

* ``exact`` — every sample once per epoch. The shard list is permuted from (seed, epoch), dealt to ranks
  (``shards[rank::world]``) and then to DataLoader workers. Each worker reads its shards through a shuffle buffer
  whose RNG is seeded by (seed, epoch, rank, worker), so its order is a pure function of those numbers. Every batch
  carries its worker's position (epoch, raw samples consumed); restoring a position replays that worker's tar
  stream *without decoding* up to it and goes on with exactly the samples not yet seen, in the same order.
* ``resampled`` — shards drawn with replacement, an endless stream for training at scale; ``epoch_samples`` is the
  nominal epoch length over all ranks (used for the per-sample epoch tag). On restore each worker continues
  with a fresh stream (resampling has no position to replay).

The stream is endless in both modes (epoch after epoch), so ranks never run out at different times and a
step-based training loop never hangs on an uneven last batch. Broken samples are skipped and counted by reason;
the run stops with :class:`DataError` only when nothing can be read or too large a fraction fails.

Latent shards (``pipeline/precompute.py latents``, see ``data.latents``) are read the same way: batches then carry
``latents`` (and, when stored, the caption embeddings) instead of images; a latent of the wrong shape or with
NaN/inf values is skipped and counted like a corrupt image.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from . import latents as latent_shards
from .images import FILTERS, BadSample, decode_image, image_keys, resize_crop

log = logging.getLogger(__name__)
IMAGE_KEYS = image_keys()
FILTERED = ("too_small", "bad_aspect", "empty_caption")  # skipped on purpose: do not count as failures
MIN_SAMPLES_FOR_FRACTION = 100  # judge the failed fraction only once this many samples were tried


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
    shuffle_buffer: int = 1000  # samples held per worker for shuffling (0 = shard order)
    caption_keys: list[str] = field(default_factory=lambda: ["txt", "json.caption"])  # first one present wins
    drop_empty_captions: bool = False  # otherwise "" is kept (it is the unconditional caption anyway)
    min_size: int = 0  # drop images whose shorter side is below this (0 = keep all)
    max_aspect: float = 0.0  # drop images with long/short side ratio above this (0 = keep all)
    max_bad_fraction: float = 0.2  # stop when more than this fraction of tried samples is broken
    latent_manifest: str | None = None  # latent shards behind URLs: a local copy of their manifest.json
    num_workers: int = 2  # DataLoader worker processes per rank
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
        if self.resolution < 1 or self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("data.resolution must be ≥ 1, data.num_workers and data.shuffle_buffer ≥ 0")
        if not 0 < self.max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be in (0, 1], got {self.max_bad_fraction}")


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
    if isinstance(exn, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return "unreadable_shard"
    if isinstance(exn, ValueError) and "duplicate" in str(exn):
        return "duplicate_member"
    return "truncated_tar"  # tarfile.ReadError / EOFError / a short read: the shard ends early


def read_shard(url: str, counts: Counter):
    """Yield the raw samples ({"__key__", "__url__", ext: bytes}) of one shard. An unreadable shard or a truncated
    tar is counted once (by reason) and the samples read before the damage are kept."""
    failed = []

    def handler(exn: Exception) -> bool:
        if not failed:
            failed.append(_tar_error_reason(exn))
            counts[failed[0]] += 1
            log.warning("shard %s: %s (%s); keeping the samples before it", url, failed[0], exn)
        return True  # go on with what can still be read

    try:
        stream = gopen(url)
    except Exception as exn:  # noqa: BLE001 — any failure to open is an unreadable shard
        counts["unreadable_shard"] += 1
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
        stream.close()


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


class ShardStream(IterableDataset):
    """The per-worker stream of ready batches (see the module docstring). Each item is a dict:
    images (B, R, R, 3) uint8, captions [str], keys [str], epochs [int], sizes (B, 2) original (w, h),
    and ``position`` = {worker, epoch, consumed, counts, tried}: where this worker is after the batch."""

    def __init__(self, cfg: DataConfig, urls: list[str], batch_size: int, rank: int, world_size: int,
                 starts: dict[int, tuple[int, int]], worker_offset: int = 0, resume_round: int = 0,
                 manifest: dict | None = None):
        self.cfg, self.urls, self.batch_size = cfg, urls, batch_size
        self.manifest = manifest  # a latent manifest: the shards hold latents, not images
        self.rank, self.world_size = rank, world_size
        self.starts = starts  # logical worker → (epoch, raw samples consumed in it)
        self.worker_offset = worker_offset  # DataLoader worker i plays logical worker (i + offset) % W
        self.resume_round = resume_round

    # -- raw sample streams ------------------------------------------------------------------------------------
    def _shuffled(self, samples, *seed):
        if self.cfg.shuffle_buffer <= 1:
            return samples
        rng = random.Random(hash_seed(self.cfg.seed, *seed))
        return wds.filters.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng)(samples)

    def epoch_shards(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        """The shards a (rank, worker) reads in an exact epoch: a permutation of all shards by (seed, epoch)."""
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.urls))
        mine = order[self.rank::self.world_size][worker::num_workers]
        return [self.urls[i] for i in mine]

    def _exact_raw(self, worker, num_workers, counts):
        epoch, skip = self.starts.get(worker, (0, 0))
        while True:
            shards = self.epoch_shards(epoch, worker, num_workers)
            raw = (s for url in shards for s in read_shard(url, counts))
            n = 0
            for n, sample in enumerate(self._shuffled(raw, epoch, self.rank, worker), start=1):
                if n > skip:
                    yield epoch, n, sample
            if n == 0:
                raise DataError(f"rank {self.rank} worker {worker}: no sample could be read from its shards "
                                f"{shards} in epoch {epoch} (skipped so far: {dict(counts)})")
            epoch, skip = epoch + 1, 0

    def _resampled_raw(self, worker, num_workers, counts):
        epoch, consumed = self.starts.get(worker, (0, 0))
        readers = self.world_size * num_workers
        reader = self.rank * num_workers + worker
        quota = self.cfg.epoch_samples // readers + (reader < self.cfg.epoch_samples % readers)
        rng = random.Random(hash_seed(self.cfg.seed, self.rank, worker, self.resume_round))

        def raw():
            empty_in_a_row = 0
            while True:
                url = rng.choice(self.urls)
                got = False
                for s in read_shard(url, counts):
                    got = True
                    yield s
                empty_in_a_row = 0 if got else empty_in_a_row + 1
                if empty_in_a_row >= 2 * len(self.urls) + 2:
                    raise DataError(f"rank {self.rank} worker {worker}: {empty_in_a_row} shards in a row gave no "
                                    f"sample (skipped so far: {dict(counts)})")

        for sample in self._shuffled(raw(), self.rank, worker, self.resume_round):
            consumed += 1
            if consumed > quota:
                epoch, consumed = epoch + 1, 1
            yield epoch, consumed, sample

    # -- decoding and batching ---------------------------------------------------------------------------------
    def process(self, raw: dict, epoch: int, box: list | None = None):
        """raw sample → (image uint8 (R, R, 3) or latent (C, h, w), caption, key, (w, h), text embedding or None);
        raises BadSample. ``box`` receives the crop's [top, left]."""
        cfg = self.cfg
        caption = caption_of(raw, ["txt"] if self.manifest is not None else cfg.caption_keys)  # precompute writes txt
        if not caption and cfg.drop_empty_captions:
            raise BadSample("empty_caption")
        if self.manifest is not None:
            return self.process_latent(raw, epoch, caption)
        if "latent.npy" in raw:
            raise DataError(f"{raw.get('__url__')} holds latents, but no manifest.json was found beside the first "
                            f"shard: keep the precompute's manifest.json with its shards, or name a local copy with "
                            f"data.latent_manifest=PATH (shards behind URLs)")
        ext = next((k for k in IMAGE_KEYS if k in raw), None)
        if ext is None:
            raise BadSample("missing_image")
        img = decode_image(raw[ext], draft_size=2 * cfg.resolution if cfg.jpeg_draft else None)
        size = img.size
        if cfg.min_size and min(size) < cfg.min_size:
            raise BadSample("too_small")
        if cfg.max_aspect and max(size) / min(size) > cfg.max_aspect:
            raise BadSample("bad_aspect")
        rng = None
        if cfg.crop == "random" or cfg.flip:  # per-sample RNG: the same crop whatever the worker or position
            rng = np.random.default_rng([cfg.seed, epoch, zlib.crc32(raw["__key__"].encode())])
        arr = resize_crop(img, cfg.resolution, cfg.crop, cfg.flip, rng, cfg.resize_filter, box)
        return arr, caption, raw["__key__"], size, None

    def process_latent(self, raw: dict, epoch: int, caption: str):
        """A latent-shard sample: the stored latent (the mirrored one half of the time with data.flip, chosen as
        the image path chooses), checked for shape and finiteness."""
        name = "latent.npy"
        if self.cfg.flip and np.random.default_rng([self.cfg.seed, epoch, zlib.crc32(raw["__key__"].encode())]) \
                .random() < 0.5:
            name = "latent_flip.npy"
        z = latent_shards.read_latent(raw.get(name), self.manifest["latent_shape"])
        try:
            size = tuple(json.loads(raw["json"]).get("original_size", (0, 0))) if "json" in raw else (0, 0)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise BadSample("bad_json") from None
        text = latent_shards.read_text(raw["text.npz"], self.manifest.get("text_shapes")) \
            if self.manifest.get("text") and "text.npz" in raw else None
        if self.manifest.get("text") and text is None:
            raise BadSample("missing_text_embedding")
        return z, caption, raw["__key__"], size, text

    def __iter__(self):
        info = get_worker_info()
        slot, num_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (slot + self.worker_offset) % num_workers
        counts: Counter = Counter()
        tried = failed = 0
        stream = self._exact_raw if self.cfg.mode == "exact" else self._resampled_raw
        items = []
        for epoch, consumed, raw in stream(worker, num_workers, counts):
            tried += 1
            try:
                items.append((*self.process(raw, epoch), epoch))
            except BadSample as bad:
                counts[bad.reason] += 1
                failed += bad.reason not in FILTERED
                if tried >= MIN_SAMPLES_FOR_FRACTION and failed / tried > self.cfg.max_bad_fraction:
                    raise DataError(
                        f"rank {self.rank} worker {worker}: {failed} of {tried} samples failed ({dict(counts)}), "
                        f"above data.max_bad_fraction={self.cfg.max_bad_fraction}. Inspect the shards with "
                        f"`python -m data.inspect SHARDS`, or raise the limit.") from None
                continue
            if len(items) == self.batch_size:
                xs, captions, keys, sizes, texts, epochs = zip(*items)
                items = []
                text = {k: np.stack([t[k] for t in texts]) for k in texts[0]} if texts[0] is not None else None
                yield {"latents" if self.manifest is not None else "images": np.stack(xs), "text": text,
                       "captions": list(captions), "keys": list(keys), "sizes": np.array(sizes), "epochs": list(epochs),
                       "position": {"worker": worker, "epoch": epoch, "consumed": consumed,
                                    "counts": dict(counts), "tried": tried}}


def hash_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers, the same in every process and interpreter."""
    return int.from_bytes(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32).tobytes(),
                          "little") >> 1


@dataclass
class Batch:
    images: torch.Tensor | None  # (B, 3, R, R) uint8 — 4× less to move than floats; convert with pixels(). None
    captions: list[str]           # for latent shards, which give ``latents`` (B, C, h, w) float16 instead
    keys: list[str]
    epochs: list[int]  # the epoch each sample belongs to
    sizes: torch.Tensor  # (B, 2) original (width, height)
    latents: torch.Tensor | None = None
    text: dict[str, torch.Tensor] | None = None  # stored caption embeddings (tokens, mask, pooled), when the shards have them

    def pixels(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """The images as contiguous (B, 3, R, R) ``dtype`` in [-1, 1], converted on ``device``.

        ``images`` is a channels-last view of the workers' (B, R, R, 3) arrays; without the explicit format the
        whole U-Net would silently run channels_last (on a CPU, bf16 GroupNorm is 2x slower that way)."""
        return self.images.to(device, non_blocking=True).to(dtype, memory_format=torch.contiguous_format) \
            .div_(127.5).sub_(1.0)


class Loader:
    """Batches of (images, captions, keys) for one rank, endless, with a position that can be saved and restored.

    ``state_dict()`` after consuming k batches, passed to a new ``Loader(..., state=...)``, makes it yield exactly
    batches k+1, k+2, … of the uninterrupted stream (exact mode). ``skipped`` counts skipped samples by reason.
    """

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int | None = None, world_size: int | None = None,
                 state: dict | None = None, pin_memory: bool = False):
        cfg.validate()
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank, world_size = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
        self.cfg, self.batch_size, self.rank, self.world_size = cfg, batch_size, rank, world_size
        self.urls = resolve_shards(cfg.shards)
        self.manifest = latent_shards.find_manifest(self.urls, cfg.latent_manifest)  # None: image shards
        if self.manifest is not None and cfg.flip and not self.manifest.get("flip"):
            raise ValueError(f"data.flip=true but the latent shards {cfg.shards!r} hold no mirrored latents: set "
                             f"data.flip=false, or precompute them again with --flip")
        if self.manifest is not None and cfg.crop == "random" and rank == 0:
            log.warning("data.crop=random on latent shards: each image keeps the one crop it was encoded with")
        self.num_workers = max(cfg.num_workers, 1)  # logical workers; 0 DataLoader workers = one, in-process
        if cfg.mode == "exact" and len(self.urls) < world_size * self.num_workers:
            raise ValueError(
                f"exact-epoch mode gives every (rank, worker) whole shards, so it needs at least world_size × "
                f"num_workers = {world_size} × {self.num_workers} shards; found {len(self.urls)}. Write smaller "
                f"shards (python -m data.write_shards ... --max-samples N), lower data.num_workers, or use "
                f"data.mode=resampled.")
        self.positions: dict[int, tuple[int, int]] = {}
        self._skipped_base: Counter = Counter()
        self._counts: dict[int, dict] = {}
        self.delivered = 0  # batches handed out since the start of the run (restored ones included)
        resume_round = 0
        if state is not None:
            self._check_state(state)
            self.positions = {int(w): tuple(p) for w, p in state["positions"].items()}
            self._skipped_base.update(state["skipped"])
            self.delivered = state["delivered"]
            resume_round = state.get("resume_round", 0) + 1
        self.resume_round = resume_round
        self.dataset = ShardStream(cfg, self.urls, batch_size, rank, world_size, dict(self.positions),
                                   worker_offset=self.delivered % self.num_workers, resume_round=resume_round,
                                   manifest=self.manifest)
        self.pin_memory = pin_memory

    def _check_state(self, state: dict):
        mine = {"mode": self.cfg.mode, "world_size": self.world_size, "rank": self.rank,
                "num_workers": self.num_workers, "batch_size": self.batch_size, "num_shards": len(self.urls)}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"the saved data position does not fit this run: {diff} (saved, now). Resume with the "
                             f"same data config, number of processes and data.num_workers.")

    def __iter__(self):
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.cfg.num_workers,
                            pin_memory=self.pin_memory, persistent_workers=False,
                            prefetch_factor=4 if self.cfg.num_workers else None)
        for item in loader:
            pos = item["position"]
            self.positions[pos["worker"]] = (pos["epoch"], pos["consumed"])
            self._counts[pos["worker"]] = pos["counts"]
            self.delivered += 1
            text = item["text"]
            if "latents" in item:
                yield Batch(None, item["captions"], item["keys"], item["epochs"], item["sizes"], item["latents"], text)
            else:
                images = item["images"].permute(0, 3, 1, 2)  # (B, R, R, 3) → (B, 3, R, R), still uint8
                yield Batch(images, item["captions"], item["keys"], item["epochs"], item["sizes"], None, text)

    @property
    def skipped(self) -> dict[str, int]:
        total = Counter(self._skipped_base)
        for counts in self._counts.values():
            total.update(counts)
        return dict(total)

    @property
    def epoch(self) -> int:
        """The epoch the slowest worker is in (0 before any batch)."""
        return min((e for e, _ in self.positions.values()), default=0)

    def state_dict(self) -> dict:
        """JSON-serialisable position of this rank's stream."""
        return {"version": 1, "mode": self.cfg.mode, "world_size": self.world_size, "rank": self.rank,
                "num_workers": self.num_workers, "batch_size": self.batch_size, "num_shards": len(self.urls),
                "delivered": self.delivered, "resume_round": self.resume_round,
                "positions": {str(w): list(p) for w, p in self.positions.items()}, "skipped": self.skipped}
