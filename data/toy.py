"""The built-in toy data set: deterministic synthetic captioned images.

Each image is one shape drawn on a plain background. Five attributes vary independently — shape, colour, size,
position and background colour — and the caption names all of them ("a small red triangle at the top left on a
light blue background"), so a model can only draw the right picture by reading the caption. Sample ``i`` of seed
``s`` depends on (s, i) alone: any resolution, any count, the same images on every machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "black": (20, 20, 20),
}
BACKGROUNDS = {
    "white": (250, 250, 250), "light blue": (175, 215, 240), "light gray": (200, 200, 200), "beige": (240, 230, 200),
}
SIZES = {"small": 0.32, "large": 0.62}  # shape extent as a fraction of the image side
POSITIONS = {  # direction of the shape's centre from the image centre; corners keep the shape inside the image
    "center": (0, 0), "top left": (-1, -1), "top right": (1, -1), "bottom left": (-1, 1), "bottom right": (1, 1),
}
MARGIN = 0.04  # gap between a corner shape and the image border, as a fraction of the side
SUPERSAMPLE = 4  # draw at 4× and downsample: anti-aliased edges at any resolution


@dataclass(frozen=True)
class ToyAttributes:
    shape: str
    colour: str
    size: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where} on a {self.background} background"


def toy_attributes(index: int, seed: int = 0, shapes=SHAPES, colours=tuple(COLOURS),
                   sizes=tuple(SIZES), positions=tuple(POSITIONS), backgrounds=tuple(BACKGROUNDS)) -> ToyAttributes:
    """The attributes of sample ``index``: independent uniform draws from a generator seeded by (seed, index)."""
    rng = np.random.default_rng([seed, index])
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    return ToyAttributes(pick(tuple(shapes)), pick(tuple(colours)), pick(tuple(sizes)), pick(tuple(positions)),
                         pick(tuple(backgrounds)))


def render(attrs: ToyAttributes, resolution: int) -> Image.Image:
    """Draw the shape described by ``attrs`` on a ``resolution``² RGB canvas."""
    side = resolution * SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUNDS[attrs.background])
    draw = ImageDraw.Draw(img)
    r = SIZES[attrs.size] * side / 2
    offset = side / 2 - r - MARGIN * side  # centre-to-corner-centre distance that keeps the shape inside
    cx, cy = (side / 2 + d * offset for d in POSITIONS[attrs.position])
    fill = COLOURS[attrs.colour]
    if attrs.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif attrs.shape == "square":
        s = r * 0.886  # same area as the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif attrs.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.75), (cx + r * 0.95, cy + r * 0.75)], fill=fill)
    elif attrs.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    else:
        raise ValueError(f"unknown toy shape {attrs.shape!r}; known: {SHAPES}")
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS)


def toy_sample(index: int, seed: int = 0, resolution: int = 32, **choices) -> tuple[Image.Image, str, dict]:
    """(image, caption, metadata) of sample ``index``. ``choices`` narrow the attribute lists (e.g. ``sizes=("large",)``)."""
    attrs = toy_attributes(index, seed, **choices)
    return render(attrs, resolution), attrs.caption, {**asdict(attrs), "caption": attrs.caption, "index": index,
                                                      "seed": seed}
