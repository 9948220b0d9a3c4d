"""Image decoding and the training transform: any PIL mode → RGB, shorter side resized, square crop, optional flip.

Failures raise :class:`BadSample` with a short reason (the key of the skip counters), never a bare PIL error.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

FILTERS = {
    "lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX,
}
Image.MAX_IMAGE_PIXELS = 16_000 * 16_000  # web scrapes hold huge images; refuse only the absurd (decompression bombs)


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` names why (the key under which it is counted)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _to_rgb(img: Image.Image, alpha: str = "white") -> Image.Image:
    """Convert any mode to RGB. Transparency is composited on white (``alpha="white"``: what a web page shows) or
    dropped (``alpha="drop"``: PIL's ``convert("RGB")``, what pytorch-fid and clean-fid do to a folder of images);
    16-bit and float images are rescaled, not clipped (PIL's own ``convert("RGB")`` clips a 16-bit image to white)."""
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if alpha == "white" and (img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "La", "RGBa")):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def image_keys() -> tuple[str, ...]:
    """The sample keys (file extensions) that hold an image: every extension Pillow can open (TIFF, GIF, BMP, ...),
    the common web formats first (the one read when a sample holds several). Pillow's stub formats (which need an
    outside handler: BUFR, GRIB, HDF5), EPS (Ghostscript) and MPEG (header only) are left out."""
    from PIL import ImageFile

    Image.init()
    readable = {fmt for fmt, (factory, _) in Image.OPEN.items()
                if not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    readable -= {"EPS", "MPEG"}
    first = ("jpg", "jpeg", "png", "webp")
    rest = sorted({ext.lstrip(".") for ext, fmt in Image.EXTENSION.items() if fmt in readable} - set(first))
    return first + tuple(rest)


def decode_image(data: bytes | None, draft_size: int | None = None, alpha: str = "white") -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image, fully loaded (a truncated file fails here, not later).

    ``draft_size``: let the JPEG decoder downscale by a power of two while the shorter side stays ≥ this
    (DCT-domain scaling: much faster for big photos; the final resize still sets the exact size).
    ``alpha``: transparency composited on "white" or dropped ("drop", as pytorch-fid reads a folder)."""
    if data is None:
        raise BadSample("missing_image")
    if len(data) == 0:
        raise BadSample("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF / palette transparency; the sample is fine
            img = Image.open(io.BytesIO(data))
            if draft_size and img.format == "JPEG":
                w, h = img.size
                scale = min(w, h) / draft_size
                if scale >= 2:
                    img.draft("RGB", (int(w / scale) + 1, int(h / scale) + 1))
            img.load()
            return _to_rgb(img, alpha)
    except UnidentifiedImageError as e:
        raise BadSample("not_an_image", str(e)) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadSample("corrupt_image", str(e)) from None


def crop_box(size: tuple[int, int], resolution: int, crop: str = "center",
             rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of the square crop that ``resize_crop`` takes from an image of
    ``size`` = (w, h): the shorter side resized to ``resolution``, the crop centred or at a uniformly random offset."""
    w, h = size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if crop == "random":
        assert rng is not None, "random crops need a generator"
        return nw, nh, int(rng.integers(nw - resolution + 1)), int(rng.integers(nh - resolution + 1))
    if crop == "center":
        return nw, nh, (nw - resolution) // 2, (nh - resolution) // 2
    raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")


def resize_crop(img: Image.Image, resolution: int, crop: str = "center", flip: bool = False,
                rng: np.random.Generator | None = None, resample: str = "bicubic", box: list | None = None) -> np.ndarray:
    """Resize the shorter side to ``resolution`` (anti-aliased ``resample`` filter), crop a square — centred, or at a
    uniformly random offset with ``crop="random"`` — and mirror it horizontally half of the time if ``flip``.
    Returns a (resolution, resolution, 3) uint8 array; ``box``, when given, receives [top, left] of the crop."""
    nw, nh, left, top = crop_box(img.size, resolution, crop, rng)
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), FILTERS[resample], reducing_gap=None)
    if box is not None:
        box[:] = [top, left]
    arr = np.asarray(img.crop((left, top, left + resolution, top + resolution)))
    if flip and rng is not None and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)
