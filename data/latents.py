"""Precomputed latent shards: what ``pipeline/precompute.py latents`` writes and the loader reads.

A latent shard is a WebDataset tar like the image shards, one sample per image that the loader would have taken:

    KEY.latent.npy       the VAE's scaled posterior mean of the cropped image, float16 (C, R/f, R/f)
    KEY.latent_flip.npy  the same for the horizontally mirrored crop (only with --flip: data.flip works on it)
    KEY.text.npz         the caption's embedding: tokens (L, D) float16, mask (L,) bool, pooled (D,) float16
                         (only with --text)
    KEY.txt              the caption
    KEY.json             {"original_size": [w, h], "crop_top_left": [top, left], "source": shard URL; with --flip
                         "crop_top_left_flip": the crop's corner in the mirrored image; with buckets "bucket"}

``DIR/manifest.json`` (``"kind": "latents"``) names the VAE (a fingerprint of its weights), its scale and shift, the
resolution, the crop, the latent shape, the text encoder when embeddings are stored, and the counts. Training reads
it from the folder of the first shard and refuses shards whose VAE, scale, shift or resolution differ from the run's.
Arrays are stored as ``.npy``/``.npz`` and read with ``allow_pickle=False``: a shard cannot run code.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .files import read_json
from .images import BadSample

KIND = "latents"
MANIFEST = "manifest.json"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_latent(data: bytes | None, shape: tuple[int, ...]) -> np.ndarray:
    """A stored latent, checked: the right shape and finite. Raises BadSample (counted by the loader)."""
    if data is None:
        raise BadSample("missing_latent")
    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BadSample("bad_latent", str(e)) from None
    if tuple(z.shape) != tuple(shape):
        raise BadSample("bad_latent_shape", f"{tuple(z.shape)}, expected {tuple(shape)}")
    if not np.isfinite(z).all():
        raise BadSample("nonfinite_latent")
    return z


def read_text(data: bytes, shapes: dict | None) -> dict[str, np.ndarray]:
    """Stored caption embeddings, checked against the manifest's shapes and for finiteness (BadSample otherwise)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            text = {k: f[k] for k in ("tokens", "mask", "pooled")}
    except (ValueError, OSError, EOFError, KeyError) as e:
        raise BadSample("bad_text_embedding", str(e)) from None
    if shapes and any(list(text[k].shape) != list(v) for k, v in shapes.items()):
        raise BadSample("bad_text_embedding", f"shapes {({k: v.shape for k, v in text.items()})}, expected {shapes}")
    if not (np.isfinite(text["tokens"]).all() and np.isfinite(text["pooled"]).all()):
        raise BadSample("bad_text_embedding", "non-finite values")
    return text


def find_manifest(urls: list[str], explicit: str | None = None) -> dict | None:
    """The latent manifest: ``explicit`` (data.latent_manifest, for shards behind URLs), else the one beside the first
    local shard; None for image shards."""
    if explicit:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"data.latent_manifest={explicit!r} does not exist")
        manifest = read_json(Path(explicit))
        if manifest.get("kind") != KIND:
            raise ValueError(f"data.latent_manifest={explicit!r} is not a latent-shard manifest")
        return manifest
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    if not local:
        return None
    path = Path(local[0]).parent / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path)
    return manifest if isinstance(manifest, dict) and manifest.get("kind") == KIND else None


def check_manifest(manifest: dict, vae_identity: dict | None, resolution: int, where: str = "data.shards"):
    """Refuse latent shards that the configured VAE and resolution did not make (a ValueError saying what differs)."""
    made = manifest["vae"]
    if not manifest.get("complete"):
        raise ValueError(f"{where}: the latent precompute that writes these shards has not finished (its manifest "
                         f"is incomplete): run it again with the same arguments, it keeps the shards already written")
    if vae_identity is None:
        raise ValueError(f"{where} holds latents (made by the VAE {made.get('source')}) but autoencoder.path is null: "
                         f"set autoencoder.path to that VAE, or point {where} at image shards")
    keys = ("fingerprint", "scaling_factor", "shift_factor", "latents_mean", "latents_std")
    diff = {k: (made.get(k), vae_identity.get(k)) for k in keys
            if (k in made or k in vae_identity) and made.get(k) != vae_identity.get(k)}
    if manifest["resolution"] != resolution:
        diff["resolution"] = (manifest["resolution"], resolution)
    if diff:
        raise ValueError(f"{where} holds latents made by another VAE, scale, shift or resolution: {diff} (shards, "
                         f"run). Train with the VAE and resolution that made them ({made.get('source')}), or "
                         f"precompute again: python pipeline/precompute.py latents --config CFG --out NEW_DIR")


# The image transform a latent precompute applied once; on latent shards these data settings cannot apply again.
TRANSFORM_KEYS = ("resize_filter", "min_size", "max_aspect", "caption_keys")


def check_transform(manifest: dict, data, where: str = "data.shards") -> list[str]:
    """Refuse a run whose image-transform settings contradict the ones the latents were made with (they would be
    silently ignored: the images were resized, filtered and captioned at precompute time). Returns warnings for
    settings that cannot be checked (a manifest that does not record them)."""
    made = manifest.get("transform") or {}
    diff = {k: (made[k], getattr(data, k)) for k in TRANSFORM_KEYS if k in made and made[k] != getattr(data, k)}
    if diff:
        raise ValueError(f"{where} holds latents made with other image settings: {diff} (shards, run). Those settings "
                         f"applied when the latents were made and cannot apply again: set them as the manifest says, "
                         f"or precompute again with the new ones")
    return [f"{where}: data.{k} cannot be checked against the latents (their manifest does not record it) and does "
            f"not apply to them" for k in TRANSFORM_KEYS if k not in made]
