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


def decode_image(data: bytes | None, draft_size: int | None = None, alpha: str = "white",
                 size: list | None = None) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image, fully loaded (a truncated file fails here, not later).

    ``draft_size``: let the JPEG decoder downscale by a power of two while the shorter side stays ≥ this
    (DCT-domain scaling: much faster for big photos; the final resize still sets the exact size).
    ``alpha``: transparency composited on "white" or dropped ("drop", as pytorch-fid reads a folder).
    ``size``, when given, receives the file's own [width, height] (before any draft downscaling)."""
    if data is None:
        raise BadSample("missing_image")
    if len(data) == 0:
        raise BadSample("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF / palette transparency; the sample is fine
            img = Image.open(io.BytesIO(data))
            if size is not None:
                size[:] = list(img.size)
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


def _target(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a crop: a square side, or a (width, height) bucket."""
    return (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))


def crop_box(size: tuple[int, int], resolution: int | tuple[int, int], crop: str = "center",
             rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of the crop that ``resize_crop`` takes from an image of ``size`` =
    (w, h): resized to cover the target (a ``resolution`` square, or a (width, height) bucket), the crop centred or
    at a uniformly random offset."""
    w, h = size
    tw, th = _target(resolution)
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if crop == "random":
        assert rng is not None, "random crops need a generator"
        return nw, nh, int(rng.integers(nw - tw + 1)), int(rng.integers(nh - th + 1))
    if crop == "center":
        return nw, nh, (nw - tw) // 2, (nh - th) // 2
    raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")


def resize_crop(img: Image.Image, resolution: int | tuple[int, int], crop: str = "center", flip: bool = False,
                rng: np.random.Generator | None = None, resample: str = "bicubic", box: list | None = None) -> np.ndarray:
    """Resize the image to cover the target (anti-aliased ``resample`` filter: the shorter side to ``resolution`` for
    a square), crop it — centred, or at a uniformly random offset with ``crop="random"`` — and mirror it horizontally
    half of the time if ``flip``. Returns a (height, width, 3) uint8 array; ``box``, when given, receives [top, left]
    of the crop in the resized image, then the left of the same crop in the mirrored resized image (when the
    output is mirrored, the two lefts swap: [top, left] is what the returned pixels show)."""
    nw, nh, left, top = crop_box(img.size, resolution, crop, rng)
    tw, th = _target(resolution)
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), FILTERS[resample], reducing_gap=None)
    if box is not None:
        box[:] = [top, left, nw - left - tw]
    arr = np.asarray(img.crop((left, top, left + tw, top + th)))
    if flip and rng is not None and rng.random() < 0.5:
        arr = arr[:, ::-1]
        if box is not None:  # the crop as seen in the mirrored image (what SDXL's crop conditioning describes)
            box[1], box[2] = box[2], box[1]
    return np.ascontiguousarray(arr)
