"""Captions → images with classifier-free guidance: the one generation routine behind the training job's sample
grids, the sampling script and the evaluation job.

Each image's starting noise and sampler noise come from its own ``torch.Generator`` seeded by ``image_seed``,
so an image does not depend on the batch it was generated in, nor on how many processes shared the work (on a GPU,
up to the rounding of kernels that differ by batch size: tests/test_gpu.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from diffusion import DEFAULT_STEPS, GaussianDiffusion, Guidance, sample
from diffusion.samplers import DEFAULT_SPACING
from data.loader import hash_seed


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index`` in a run started with ``seed``."""
    return hash_seed(seed, prompt_index, image_index)


@torch.no_grad()
def generate(model, encoder, diffusion: GaussianDiffusion, prompts: list[str], seeds: list[int],
             resolution: int | tuple[int, int], guidance: float = 3.0, negative: list[str] | None = None,
             sampler: str = "ddim", steps: int | None = None, channels: int = 3, device=None, dtype=torch.float32,
             clip_x0: float | None = 1.0, progress_callback=None, vae=None, spacing: str | None = None,
             noise: torch.Tensor | None = None, micro: list[float] | None = None,
             rescale: float = 0.0, interval: tuple[float, float] | None = None) -> torch.Tensor:
    """One batch: images (B, 3, H, W) in [-1, 1] for ``prompts[i]`` from ``seeds[i]``; ``resolution`` is a square's
    side or a (width, height) (an aspect-ratio bucket's shape, say).

    With a ``vae`` the sampler runs on (B, ``channels``, H/f, W/f) latents, unclipped (latents are not bounded by
    ±1), and the VAE decodes them to H×W px.
    ``negative[i]`` (default "") is what the unconditional branch sees. Guidance 1 runs the conditional branch
    only; otherwise both branches run in one batched forward (diffusion.guidance). ``spacing``: the timestep
    spacing (default: the sampler's). ``noise``: the initial x_T itself, instead of drawing it from the seeds.
    ``micro``: for a model with size and crop conditioning, original (h, w), crop (top, left), target (h, w) in
    pixels (default: the output size, crop 0, 0, as SDXL's pipeline asks); the unconditional branch gets none, as
    training drops it with the caption. ``rescale``: guidance rescale φ (Lin et al. 2024; diffusers'
    ``guidance_rescale``), which keeps the guided prediction's spread at the conditional one's. ``interval``:
    (σ_lo, σ_hi), guidance only at noise levels σ_lo < σ ≤ σ_hi (Kynkäänniemi et al. 2024; diffusion.guidance)."""
    device = device or next(model.parameters()).device
    negative = negative or [""] * len(prompts)
    gens = [torch.Generator(device).manual_seed(s) for s in seeds]
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    f = vae.factor if vae is not None else 1
    if width % f or height % f:
        raise ValueError(f"{width}×{height} px does not divide by the VAE's factor {f}")
    if noise is None:
        noise = torch.stack([torch.randn(channels, height // f, width // f, generator=g, device=device) for g in gens])
    cond = cond_to(encoder.encode(list(prompts)), device, dtype)
    uncond = cond_to(encoder.encode(list(negative)), device, dtype) if guidance != 1 else None
    if getattr(model.cfg, "micro_conditioning", False):
        micro = micro if micro is not None else [height, width, 0, 0, height, width]
        cond["micro"] = torch.tensor([list(map(float, micro))] * len(prompts), device=device)
        if uncond is not None:
            uncond["micro"] = torch.zeros_like(cond["micro"])

    def net(x, t, c):
        return model(x.to(dtype), t, c).float()

    images = sample(sampler, net, noise, diffusion, steps=steps, cond=cond,
                    guidance=Guidance(scale=guidance, uncond=uncond, clip_x0=None if vae is not None else clip_x0,
                                      rescale=rescale, interval=interval),
                    generator=gens, callback=progress_callback, spacing=spacing)
    if vae is not None:
        images = vae.decode(images)
    return images.clamp(-1, 1)


def add_guidance_args(p) -> None:
    """--guidance-rescale and --guidance-interval, as sample.py and `evaluate.py run` take them."""
    p.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                   help="guidance rescale φ in [0, 1] (Lin et al. 2024; diffusers' guidance_rescale): keeps the guided "
                   "prediction's spread at the conditional one's; 0.7 helped latent models at guidance 3-5 "
                   "(benchmarks/README.md)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("SIGMA_LO", "SIGMA_HI"),
                   help="guide only at noise levels σ_lo < σ ≤ σ_hi, σ = √((1−ᾱ)/ᾱ) (Kynkäänniemi et al. 2024; "
                   "e.g. 0.28 2.9, the σ numbers of their EDM2-S setting); the conditional model alone elsewhere "
                   "(default: every step)")


def guidance_options(args) -> dict:
    """``rescale`` and ``interval`` for ``run_jobs`` / ``generate`` from add_guidance_args' flags (ValueError if
    bad)."""
    if not 0 <= args.guidance_rescale <= 1:
        raise ValueError(f"--guidance-rescale must lie in [0, 1], got {args.guidance_rescale}")
    lo_hi = args.guidance_interval
    if lo_hi is not None and not 0 <= lo_hi[0] < lo_hi[1]:
        raise ValueError(f"--guidance-interval SIGMA_LO SIGMA_HI needs 0 ≤ SIGMA_LO < SIGMA_HI, got {lo_hi[0]:g} "
                         f"{lo_hi[1]:g}")
    return {"rescale": args.guidance_rescale, "interval": tuple(lo_hi) if lo_hi is not None else None}


def output_size(resolution: int, width: int | None, height: int | None, model, vae=None) -> tuple[int, int]:
    """(width, height) to sample at: the training resolution's square, or --width / --height (either alone keeps
    the square's other side). Sides must be multiples of the VAE's factor × the U-Net's downsampling (ValueError)."""
    w, h = width or resolution, height or resolution
    multiple = (vae.factor if vae is not None else 1) * model.downsample_factor
    if w < 1 or h < 1 or w % multiple or h % multiple:
        raise ValueError(f"{w}×{h} px: width and height must be positive multiples of {multiple} (the VAE's factor × "
                         f"the U-Net's downsampling), e.g. {max(multiple, w // multiple * multiple)}×"
                         f"{max(multiple, h // multiple * multiple)}")
    return w, h


def micro_conditioning(model, size: tuple[int, int], original: list[int] | None = None,
                       crop: list[int] | None = None, target: list[int] | None = None) -> list[float] | None:
    """The six numbers of SDXL's size and crop conditioning for ``generate``: original (h, w), crop (top, left),
    target (h, w), from (width, height) pairs as the command lines take them (default: the output ``size``, crop
    0, 0). None for a model without it (ValueError if one was asked for)."""
    if not getattr(model.cfg, "micro_conditioning", False):
        if original or crop or target:
            raise ValueError("--original-size / --crop-top-left / --target-size need a model trained with "
                             "model.overrides.micro_conditioning=true")
        return None
    (ow, oh), (tw, th) = original or size, target or size
    top, left = crop or (0, 0)
    return [oh, ow, top, left, th, tw]


def cond_to(cond: dict, device, dtype=torch.float32) -> dict:
    """A text encoder's output dict on ``device``; floating tensors in ``dtype``, the mask as it is."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in cond.items()}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8 (rounded, as PIL would store them)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# --- many images: jobs, written as PNGs with their metadata (sample.py, the evaluation job, the human study) ----

@dataclass
class Job:
    """One image to make."""

    prompt_index: int
    image_index: int
    prompt: str
    negative: str
    seed: int
    guidance: float

    @property
    def name(self) -> str:
        return f"p{self.prompt_index:05d}_g{self.guidance:g}_i{self.image_index:03d}.png"


def make_jobs(prompts: list[dict], guidances: list[float], num_images: int, seed: int, negative: str) -> list[Job]:
    jobs = []
    for pi, row in enumerate(prompts):
        for ii in range(num_images):
            # A JSONL seed is used as is (image k: seed + k), so a metadata line's seed regenerates its image.
            s = int(row["seed"]) + ii if row.get("seed") is not None else image_seed(seed, pi, ii)
            for g in guidances:  # the same noise at every guidance scale: columns of the grid compare like with like
                jobs.append(Job(pi, ii, row["prompt"], row.get("negative_prompt", negative), s, g))
    return jobs


def run_jobs(jobs: list[Job], model, encoder, diffusion, resolution: int | tuple[int, int], out_dir: Path,
             sampler: str, steps: int | None, batch_size: int, rank: int = 0, world: int = 1, dtype=torch.float32,
             skip_existing: bool = False, progress: bool = True, extra_meta: dict | None = None,
             vae=None, spacing: str | None = None, micro: list[float] | None = None,
             rescale: float = 0.0, interval: tuple[float, float] | None = None) -> list[dict]:
    """Generate this rank's share (jobs[rank::world]) in batches of one guidance scale; write PNGs; return metadata.
    ``resolution``: a square's side or (width, height); ``micro``, ``rescale``, ``interval``: see ``generate``."""
    from PIL import Image

    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    mine = [j for j in jobs[rank::world] if not (skip_existing and (images_dir / j.name).is_file())]
    by_scale: dict[float, list[Job]] = {}
    for j in mine:
        by_scale.setdefault(j.guidance, []).append(j)
    device = next(model.parameters()).device
    bar = tqdm(total=len(mine), desc=f"sampling ({sampler})", unit="img", disable=not progress)
    for g, group in by_scale.items():
        for i in range(0, len(group), batch_size):
            batch = group[i:i + batch_size]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                images = generate(model, encoder, diffusion, [j.prompt for j in batch], [j.seed for j in batch],
                                  resolution, guidance=g, negative=[j.negative for j in batch], sampler=sampler,
                                  steps=steps, channels=model.cfg.in_channels, device=device, vae=vae,
                                  spacing=spacing, micro=micro, rescale=rescale, interval=interval)
            for j, img in zip(batch, to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()):
                tmp = images_dir / (j.name + ".tmp")
                Image.fromarray(img).save(tmp, format="PNG")
                tmp.replace(images_dir / j.name)  # a half-written image never has the final name
            bar.update(len(batch))
    bar.close()
    return [{"file": f"images/{j.name}", "prompt": j.prompt, "negative_prompt": j.negative, "seed": j.seed,
             "guidance": j.guidance, **({"guidance_rescale": rescale} if rescale else {}),
             **({"guidance_interval": list(interval)} if interval else {}), "sampler": sampler,
             "steps": steps or DEFAULT_STEPS[sampler],
             "spacing": spacing or DEFAULT_SPACING[sampler],
             "prompt_index": j.prompt_index, "image_index": j.image_index, **(extra_meta or {})} for j in jobs]


def save_grid(jobs: list[Job], out_dir: Path, path: Path):
    """Rows: prompts; columns: guidance scales × images (a grid of the PNGs already written)."""
    from PIL import Image
    from torchvision.utils import save_image

    import numpy as np

    prompts = sorted({j.prompt_index for j in jobs})
    cols = sorted({(j.guidance, j.image_index) for j in jobs})
    tiles = []
    for p in prompts:
        for g, i in cols:
            job = next(j for j in jobs if (j.prompt_index, j.guidance, j.image_index) == (p, g, i))
            tiles.append(torch.from_numpy(np.array(Image.open(out_dir / "images" / job.name).convert("RGB"))))
    grid = torch.stack(tiles).permute(0, 3, 1, 2).float() / 255
    save_image(grid, path, nrow=len(cols), padding=2, pad_value=1.0)
