"""Aspect-ratio buckets: photos at their own shapes, each global batch of one shape.

``data.buckets`` is a list of [width, height] pairs, or ``auto``: shapes of about ``resolution``² pixels, sides
multiples of ``data.bucket_step`` (the VAE's factor × the U-Net's downsampling: the training job fills it in), from
1:``max_aspect`` to ``max_aspect``:1. Each sample goes to the bucket nearest its aspect ratio (in log ratio), is
resized to cover it and cropped (``data.crop``), its original size and crop kept for SDXL-style micro-conditioning.

How a global batch is chosen (data/loader.py's canonical streams): every stream admits its decoded samples, in its
own order, into per-bucket queues until it holds ``lookahead`` of them; the step's bucket is, among the buckets in
which every stream holds q samples, the one with the most queued over *all* streams (one small all-gather per try:
every rank gets the same answer); while no bucket qualifies, every stream admits one more sample and tries again.
Each stream then gives its oldest q samples of that bucket. All of it follows from the
streams' contents alone, so the sequence of (bucket, samples) does not depend on the number of processes or
workers, and a checkpoint saves each stream's queued samples (by position) with its read position: exact resume
includes the partly filled buckets.

Policy for what is left: a sample waits in its bucket's queue until its bucket is chosen, across epoch boundaries
(nothing is dropped); how many wait is logged (``bucket_waiting``). A bucket too rare to fill a batch keeps its
samples waiting (they are read again on resume, never decoded twice in one run); only when no bucket at all can be
filled after 64·q more samples per stream does the run stop, with an error that says what to change.
"""

from __future__ import annotations

import math

LOOKAHEAD = 4  # samples admitted per stream before a step's bucket is chosen, in units of q (its share of a batch)


def generate_buckets(side: int, step: int, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs of about side² pixels, both multiples of ``step``, aspect ratios within
    [1/max_aspect, max_aspect]: for each portrait width the height nearest the area, and each one's landscape
    mirror; sorted from the tallest to the widest (the square among them)."""
    if step < 1 or side < step:
        raise ValueError(f"buckets need a step ≥ 1 no larger than the resolution, got step {step}, side {side}")
    area = side * side
    out = set()
    for w in range(step, side + 1, step):  # portrait (and square) shapes, one per width; then their mirrors
        h = max(w, round(area / w / step) * step)
        if h / w <= max_aspect:
            out |= {(w, h), (h, w)}
    return sorted(out, key=lambda b: b[0] / b[1])


def parse_buckets(spec, resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]] | None:
    """``data.buckets`` → a list of (width, height), checked (ValueError saying what is wrong); None when off."""
    if spec is None:
        return None
    if spec == "auto":
        if step < 1:
            raise ValueError("data.buckets=auto needs data.bucket_step (the VAE's factor × the U-Net's "
                             "downsampling; the training job sets it)")
        return generate_buckets(resolution, step, max_aspect or 2.0)
    if isinstance(spec, str) or not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"data.buckets must be 'auto' or a non-empty list of [width, height], got {spec!r}")
    buckets = []
    for b in spec:
        if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(v, int) and v > 0 for v in b)):
            raise ValueError(f"data.buckets: {b!r} is not a [width, height] pair of positive integers")
        if step > 1 and (b[0] % step or b[1] % step):
            raise ValueError(f"data.buckets: {b[0]}×{b[1]} is not a multiple of {step} on both sides (the VAE's "
                             f"factor × the U-Net's downsampling)")
        buckets.append((int(b[0]), int(b[1])))
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"data.buckets lists a shape twice: {buckets}")
    return buckets


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest the image's (w, h), in log ratio (ties: the first)."""
    r = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - r), i))


def choose_bucket(counts: list[list[int]]) -> int:
    """The step's bucket from every stream's queue lengths (per stream, per bucket): the most samples queued in all,
    ties to the first bucket. The same on every rank, whatever the number of them."""
    totals = [sum(c[b] for c in counts) for b in range(len(counts[0]))]
    return max(range(len(totals)), key=lambda b: (totals[b], -b))
