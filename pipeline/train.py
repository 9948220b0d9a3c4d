"""Train a caption-conditioned diffusion U-Net (the DDPM ε-loss of Ho et al. 2020, with caption dropout for classifier-free guidance).

    accelerate launch pipeline/train.py --config launch/configs/demo.yaml [--output-dir DIR] [--max-steps N]
                                        [--resume latest|PATH] [section.key=value ...]

Also runs as plain ``python pipeline/train.py ...`` (one process). The loop: batch → frozen text encoder (or
precomputed embeddings) → caption dropout → the diffusion core's loss → backward (accumulation, clipping, AdamW,
warm-up) → EMA → logs, sample grids, checkpoints. The run folder holds config.yaml, logs/, samples/,
checkpoints/ and model/ (the export that pipeline/sample.py loads).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python pipeline/train.py` from a clone

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import ProjectConfiguration, gather_object, set_seed  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import DataError, Loader  # noqa: E402
from data.latents import check_manifest  # noqa: E402
from data.loader import hash_seed  # noqa: E402
from diffusion import GaussianDiffusion  # noqa: E402
from models.autoencoder import load_autoencoder  # noqa: E402
from models.diffusers_unet import DiffusersUNetConfig  # noqa: E402
from models.registry import build, downsample_factor, family_of, model_config  # noqa: E402
from models.stable_diffusion import SDError, open_sd  # noqa: E402
from models.text_encoders import CachedTextEncoder, build_text_encoder  # noqa: E402
from pipeline import checkpoint as ckpt  # noqa: E402
from pipeline import distributed as dist  # noqa: E402
from pipeline.config import ConfigError, TrainConfig, bucket_step, load_config, save_config  # noqa: E402
from pipeline.generate import cond_to, generate, image_seed  # noqa: E402
from pipeline.validation import Validation  # noqa: E402

log = logging.getLogger("train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (launch/configs/*.yaml); without it, built-in defaults")
    p.add_argument("--output-dir", help="run folder (overrides train.output_dir)")
    p.add_argument("--max-steps", type=int, help="total optimiser steps to reach (overrides train.max_steps); "
                                                 "a resumed run continues up to it")
    p.add_argument("--resume", help="'latest' (newest checkpoint in the run folder) or a checkpoint folder")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. optim.lr=2e-4 data.shards=/data/{000..099}.tar")
    return p.parse_intermixed_args(argv)


def use_deterministic_kernels() -> None:
    """train.deterministic: only kernels that give the same bits on every run (GPU atomics and cuDNN's autotuned
    algorithms are not). cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts, so this runs before any CUDA work."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def writable_run_dir(path: str) -> Path:
    run_dir = Path(path)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test.{os.getpid()}"  # one per process: ranks probe at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: cannot write to the output folder {run_dir} ({e.strerror}); pass --output-dir "
                         f"with a folder you can write to") from None
    return run_dir


def lr_factor(step: int, warmup: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up to 1, then constant or cosine down to ``min_ratio`` at ``max_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def drop_captions(captions: list[str], index: list[int], p: float, seed: int) -> tuple[list[str], int]:
    """Replace each caption by "" (the unconditional input) with probability ``p``, decided by the run's seed and the
    sample's global index (the same on any number of processes); returns (captions, dropped)."""
    drop = [np.random.default_rng([seed, g, 0]).random() < p for g in index]
    return ["" if d else c for c, d in zip(captions, drop)], sum(drop)


def sample_draws(diffusion, x0: torch.Tensor, index: list[int], seed: int,
                 stratify: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t (B,), ε (B, ...)) of each sample from its own generator, seeded by the run's seed and the sample's global
    index: a sample gets the same timestep and noise whatever the batch, rank or number of processes it lands in
    (elastic resume continues the loss curve). Drawn on x0's device, in its dtype. With ``stratify`` = G (the global
    batch, the same on any number of processes) the timesteps of each global batch k·G … k·G + G − 1 are stratified
    instead, from an offset seeded by (seed, k)."""
    gens = [torch.Generator(x0.device).manual_seed(hash_seed(seed, g, 1)) for g in index]
    t = torch.cat([torch.randint(0, diffusion.num_steps, (1,), generator=g, device=x0.device) for g in gens])
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g, device=x0.device, dtype=x0.dtype) for g in gens])
    if stratify:
        u = {k: np.random.default_rng(hash_seed(seed, k, 3)).random() for k in {g // stratify for g in index}}
        offset = torch.tensor([u[g // stratify] for g in index], dtype=torch.float64, device=x0.device)
        position = torch.tensor([g % stratify for g in index], device=x0.device)
        t = diffusion.stratified_timesteps(offset, position, stratify)
    return t, noise


def build_ema(model: torch.nn.Module, cfg):
    """ema-pytorch's EMA, kept in fp32 whatever the training weights are (DeepSpeed's bf16/fp16 casts the U-Net in
    place: the online weights are cast up before the lerp). k-th update: θ_ema ← d_k θ_ema + (1 − d_k) θ with
    d_k = min(decay, 1 − (1 + (k − start_step − 1)/inv_gamma)^(−power)); the first ``start_step`` updates copy."""
    if not cfg.enabled:
        return None
    from ema_pytorch import EMA

    return EMA(model, beta=cfg.decay, update_after_step=cfg.start_step, update_every=cfg.update_every,
               inv_gamma=cfg.inv_gamma, power=cfg.power, include_online_model=False, coerce_dtype=True)


def update_ema(ema, model, accelerator):
    """Under ZeRO-3 each rank holds a shard of every parameter: gather the full weights for the update."""
    if ema is not None:
        with dist.full_weights(accelerator, model):
            ema.update()


def network_config(cfg: TrainConfig, text_encoder, vae):
    """The U-Net's config: the named size with the run's overrides, its input channels from the VAE (3 in pixel space)
    and its token width from the text encoder; with model.pretrained, the checkpoint's own U-Net (diffusers family)."""
    channels = vae.channels if vae is not None else 3
    if not cfg.model.pretrained:
        return model_config(cfg.model.size, **{"context_dim": text_encoder.dim, "pooled_dim": text_encoder.pooled_dim,
                                               "in_channels": channels, **cfg.model.overrides})
    try:
        unet = open_sd(cfg.model.pretrained, cfg.model.pretrained_config).unet_config()
    except SDError as e:
        raise ValueError(f"model.pretrained: {e}") from None
    net = DiffusersUNetConfig.from_diffusers(unet, **cfg.model.overrides)
    if net.context_dim != text_encoder.dim:
        raise ValueError(f"model.pretrained: its U-Net attends to {net.context_dim}-wide tokens but its text encoder "
                         f"gives {text_encoder.dim}: the checkpoint's parts do not belong together")
    return net


def load_pretrained_weights(cfg: TrainConfig, model) -> None:
    """model.pretrained's U-Net weights into the freshly built network (not on resume: the checkpoint has them)."""
    if cfg.model.pretrained:
        try:
            model.load_diffusers_state_dict(open_sd(cfg.model.pretrained, cfg.model.pretrained_config).unet_state())
        except SDError as e:
            raise ValueError(f"model.pretrained: {e}") from None
        log.info("U-Net weights from %s", cfg.model.pretrained)


def latent_geometry(unet_cfg, vae, resolution: int):
    """Check that the U-Net's input channels and the sizes fit the VAE and the resolution (ValueError otherwise)."""
    channels = vae.channels if vae is not None else 3
    if unet_cfg.in_channels != channels:
        what = f"the VAE's latents have {channels} channels" if vae is not None else "images have 3 channels"
        raise ValueError(f"the U-Net takes {unet_cfg.in_channels} input channels but {what}: remove "
                         f"model.overrides.in_channels (it follows the VAE)")
    if unet_cfg.out_channels not in (None, channels):
        raise ValueError(f"the U-Net predicts {unet_cfg.out_channels} channels but its input has {channels}: remove "
                         f"model.overrides.out_channels")
    factor = vae.factor if vae is not None else 1
    if resolution % factor:
        raise ValueError(f"data.resolution={resolution} does not divide by the VAE's downsampling factor {factor}: "
                         f"use a multiple of {factor}")
    levels = downsample_factor(unet_cfg)
    size = resolution // factor
    if size % levels:
        halvings = levels.bit_length() - 1
        raise ValueError(f"the U-Net's input is {size}×{size} ({'latents of ' if vae else ''}data.resolution="
                         f"{resolution}), which its {halvings + 1} levels cannot halve {halvings} times evenly: use a "
                         f"resolution that is a multiple of {levels * factor}")


def batch_input(batch, vae, device) -> torch.Tensor:
    """x₀ of a batch: the stored latents (latent shards), the VAE's encoding of the pixels (live), or the pixels."""
    if batch.latents is not None:
        return batch.latents.to(device, torch.float32, non_blocking=True)
    pixels = batch.pixels(device)
    return vae.encode(pixels) if vae is not None else pixels


def batch_cond(batch, captions: list[str], encoder, empty: dict | None, device) -> dict:
    """The conditioning: the shards' stored caption embeddings (``empty`` — the "" embedding — where caption dropout
    emptied a caption), or the text encoder's (or its cache's) output."""
    if batch.text is None or empty is None:
        return cond_to(encoder.encode(captions), device)
    cond = {k: v.to(device) for k, v in batch.text.items()}
    cond = {k: v.float() if v.is_floating_point() else v.bool() for k, v in cond.items()}
    dropped = torch.tensor([c == "" for c in captions]).to(device, non_blocking=True)  # no host sync
    return {k: torch.where(dropped.view(-1, *[1] * (v.dim() - 1)), empty[k].to(v.dtype), v) for k, v in cond.items()}


def batch_micro(batch, captions: list[str], vae, device) -> torch.Tensor:
    """SDXL's size and crop conditioning of a batch (B, 6), zero (the null conditioning) where caption dropout emptied
    the caption: the unconditional branch of guidance knows neither the caption nor the size."""
    micro = batch.micro(vae.factor if batch.latents is not None else 1)
    dropped = torch.tensor([c == "" for c in captions])
    return micro.masked_fill(dropped[:, None], 0.0).to(device, non_blocking=True)


def sample_shapes(cfg: TrainConfig, buckets) -> list[tuple[int, int]]:
    """(width, height) of the sample grid's columns: logging.sample_shapes, else the square, or with buckets the
    tallest, the squarest and the widest of them."""
    if cfg.logging.sample_shapes:
        return [tuple(s) for s in cfg.logging.sample_shapes]
    if not buckets:
        return [(cfg.data.resolution, cfg.data.resolution)]
    ordered = sorted(buckets, key=lambda b: b[0] / b[1])
    square = min(ordered, key=lambda b: abs(math.log(b[0] / b[1])))
    return list(dict.fromkeys([ordered[0], square, ordered[-1]]))


def save_sample_grid(sampler_model, encoder, diffusion, cfg: TrainConfig, path: Path | None, device,
                     vae=None, shapes: list[tuple[int, int]] | None = None) -> Path | None:
    """Fixed prompts at a fixed seed and guidance: the same picture at every step, so progress is visible. Rows:
    prompts; columns: ``shapes`` (width, height) × images, each shape on a white tile of the largest. Written to
    ``path`` (None: sample, write nothing: the other ranks under ZeRO-3, whose forward passes gather the shards)."""
    from torchvision.utils import save_image

    lc = cfg.logging
    shapes = shapes or [(cfg.data.resolution, cfg.data.resolution)]
    prompts = [p for p in lc.sample_prompts for _ in range(lc.sample_per_prompt)]
    seeds = [image_seed(lc.sample_seed, i, j) for i in range(len(lc.sample_prompts)) for j in range(lc.sample_per_prompt)]
    per_shape = [generate(sampler_model, encoder, diffusion, prompts, seeds, shape,
                          guidance=lc.sample_guidance, sampler=lc.sample_sampler, steps=lc.sample_steps,
                          channels=sampler_model.cfg.in_channels, device=device,
                          dtype=next(sampler_model.parameters()).dtype,  # bf16 weights under DeepSpeed without EMA
                          vae=vae) for shape in shapes]
    if path is None:
        return None
    H, W = max(h for _, h in shapes), max(w for w, _ in shapes)
    tiles = []
    for i in range(len(prompts) // lc.sample_per_prompt):  # one row per prompt
        for images in per_shape:
            for img in images[i * lc.sample_per_prompt:(i + 1) * lc.sample_per_prompt]:
                tile = torch.ones(3, H, W, device=img.device)
                h, w = img.shape[-2:]
                tile[:, (H - h) // 2:(H - h) // 2 + h, (W - w) // 2:(W - w) // 2 + w] = img
                tiles.append(tile)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((torch.stack(tiles) + 1) / 2, path, nrow=lc.sample_per_prompt * len(shapes), padding=1)
    return path


def network(model, dtype: torch.dtype | None = None, channels_last: bool = False):
    """What the loss calls: the U-Net fed x_t in the dtype of its weights and, with train.channels_last, in NHWC layout.

    ``dtype``: DeepSpeed's bf16/fp16 casts the U-Net's weights in place and leaves autocast off, so x_t follows them
    (the loss is computed in fp32 all the same). channels_last: the values are unchanged, and every activation after
    the first convolution follows the input's layout (PyTorch picks a convolution's output layout from its input or
    weight), while the weights stay NCHW for checkpoints, EMA and DeepSpeed."""
    if dtype is None and not channels_last:
        return model
    fmt = torch.channels_last if channels_last else torch.preserve_format
    return lambda x, t, cond: model(x.to(dtype=dtype or x.dtype, memory_format=fmt), t, cond)


def backward(accelerator, loss: torch.Tensor, window_ok: bool, under_deepspeed: bool):
    """One micro-step's backward, given whether every loss of this accumulation window was finite on every rank.

    DDP / one process: a window with a non-finite loss stops calling backward, on every rank alike (so DDP's
    all-reduce is never half-entered); its gradients are dropped at the window's end. DeepSpeed reduces gradients
    inside every backward (ZeRO-2/3) and steps inside the last one, so every rank runs every backward; such a window
    gets NaN gradients on every rank, which DeepSpeed's own check (a non-finite gradient norm) turns into a skipped
    step, its gradients dropped (the LR scheduler is ours, stepped only on steps taken)."""
    if under_deepspeed:
        accelerator.backward(loss if window_ok else loss * float("nan"))
    elif window_ok:
        accelerator.backward(loss)


def optimizer_step(accelerator, model, optimizer, window_ok: bool, grad_clip: float, under_deepspeed: bool):
    """The end of an accumulation window: clip and step, or skip on every rank. Returns (stepped, grad norm or None)."""
    if under_deepspeed:  # the engine stepped (or skipped) inside the window's last backward
        stepped = model.was_step_applied()
        if stepped and not window_ok:
            raise RuntimeError("DeepSpeed applied a step with non-finite gradients (is its bf16 check_grad_overflow "
                               "off?): the weights are lost; resume from the last checkpoint")
        return stepped, model.get_global_grad_norm() if stepped else None
    stepped, norm = False, None
    if window_ok:
        # The norm of the all-reduced gradient (the same on every rank); clip_grad_norm_ at max_norm = ∞ measures only.
        norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        if accelerator.scaler is not None or torch.isfinite(norm):
            optimizer.step()
            stepped = not accelerator.optimizer_step_was_skipped  # fp16's loss scaler skips inf/NaN gradients
        # else: inf/NaN gradients from finite losses (fp32/bf16 have no scaler to catch them): skipped on every rank
    optimizer.zero_grad(set_to_none=True)
    return stepped, norm


@dataclasses.dataclass
class Counts:
    """What the loop counts, saved in every checkpoint. ``step`` counts loop steps (each consumed its batches), of
    which ``optimizer_steps`` updated the weights; the LR schedule and EMA follow ``optimizer_steps``."""

    step: int = 0
    optimizer_steps: int = 0
    nan_skips: int = 0  # steps skipped on every rank for a non-finite loss (any rank, any micro-step)
    overflow_skips: int = 0  # steps skipped for inf/NaN gradients from finite losses (fp16's scaler, or the check)
    nan_in_row: int = 0
    dropped: int = 0  # captions replaced by "" (caption dropout)
    seen: int = 0

    @classmethod
    def from_state(cls, state: dict) -> "Counts":
        known = {f.name for f in dataclasses.fields(cls)}
        counts = cls(**{k: v for k, v in state.items() if k in known})
        if "optimizer_steps" not in state:  # a checkpoint from before this counter: every non-skipped step was taken
            counts.optimizer_steps = counts.step - counts.nan_skips
        return counts

    def taken(self, stepped: bool, losses_finite: bool):
        self.step += 1
        self.optimizer_steps += stepped
        self.nan_skips += not losses_finite
        self.overflow_skips += losses_finite and not stepped
        self.nan_in_row = 0 if losses_finite else self.nan_in_row + 1

    def state(self) -> dict:
        return dataclasses.asdict(self)

    def metrics(self) -> dict:
        return {"optimizer_steps": self.optimizer_steps, "nan_skips": self.nan_skips,
                "overflow_skips": self.overflow_skips, "caption_dropout_rate": self.dropped / max(1, self.seen)}


def config_from_args(args) -> TrainConfig:
    """The run config: file, then overrides; --output-dir / --max-steps replace an override of the same key."""
    flags = {"train.output_dir": args.output_dir, "train.max_steps": args.max_steps}
    flags = {k: v for k, v in flags.items() if v is not None}
    overrides = [o for o in args.overrides if o.split("=", 1)[0].strip() not in flags]
    overrides += [f"{k}={v}" for k, v in flags.items()]
    try:
        return load_config(args.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None


def main(argv=None):
    args = parse_args(argv)
    cfg = config_from_args(args)

    if cfg.train.deterministic:
        use_deterministic_kernels()
    fresh = not Path(cfg.train.output_dir).exists()
    run_dir = writable_run_dir(cfg.train.output_dir)
    try:
        return train(args, cfg, run_dir)
    except BaseException:
        if fresh and not (run_dir / "metrics.jsonl").exists() and not list_any(run_dir / "checkpoints"):
            shutil.rmtree(run_dir, ignore_errors=True)  # failed before its first step: leave no empty run folder
        raise


def resolve_resume_once(accelerator, arg: str, ckpt_dir: Path) -> Path:
    """The checkpoint to resume from, chosen (and its checksums verified) by the main process alone and broadcast: a
    multi-GB ZeRO checkpoint is hashed once, not once per rank. An error there is every rank's error."""
    from accelerate.utils import broadcast_object_list

    answer = [None]
    if accelerator.is_main_process:
        try:
            answer = [str(ckpt.resolve_resume(arg, ckpt_dir))]
        except Exception as e:  # noqa: BLE001 — every rank must hear of it (or wait in the broadcast forever)
            answer = [e if isinstance(e, (FileNotFoundError, ValueError)) else
                      ValueError(f"cannot check the checkpoints in {ckpt_dir}: {type(e).__name__}: {e}")]
    if accelerator.num_processes > 1:
        broadcast_object_list(answer)
    if isinstance(answer[0], Exception):
        raise answer[0]
    return Path(answer[0])


def list_any(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


@dataclasses.dataclass
class Inputs:
    """What the run reads and never trains: data, frozen encoders, the U-Net's config, where it resumes from."""

    loader: Loader
    text_encoder: object
    encoder: object  # the text encoder, or its cache of precomputed embeddings
    vae: object
    empty: dict | None  # the "" embedding when the shards store caption embeddings
    unet_cfg: object
    meaning: dict  # what the weights mean (family, VAE, schedule): checked on resume
    resume_from: Path | None
    validation: Validation | None


@dataclasses.dataclass
class Engine:
    """What trains: the (wrapped) U-Net, its optimiser and LR schedule, the EMA copy, the loss's callable."""

    model: torch.nn.Module
    optimizer: object
    scheduler: object
    ema: object
    net: object
    under_deepspeed: bool


def make_accelerator(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    tracker = None if cfg.logging.tracker == "none" else cfg.logging.tracker
    accelerator = Accelerator(
        mixed_precision=cfg.optim.mixed_precision, gradient_accumulation_steps=cfg.optim.grad_accum,
        log_with=tracker, step_scheduler_with_optimizer=False,  # one scheduler step per optimiser step, any world size
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")))
    dist.fix_cpu_deepspeed_ranks(accelerator)
    dist.check_world(accelerator)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    return accelerator


def read_inputs(args, cfg: TrainConfig, accelerator, ckpt_dir: Path) -> Inputs:
    """Everything that can be wrong with the input, checked before the first step (FileNotFoundError/ValueError)."""
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    resume_from = resolve_resume_once(accelerator, args.resume, ckpt_dir) if args.resume else None
    data_state = ckpt.load_data_state(resume_from) if resume_from else None
    if data_state is not None and data_state.get("world_size") != world and dist.zero_stage(accelerator):
        raise ValueError(f"{resume_from} was saved by {data_state.get('world_size')} processes under DeepSpeed, whose "
                         f"ZeRO states are sharded per process: resume it on {data_state.get('world_size')} (a DDP "
                         f"run resumes on any number of processes with the same global batch)")
    set_seed(cfg.train.seed)  # the same initial weights on every rank
    with dist.frozen_parts(accelerator):  # frozen: outside the optimiser, DDP and ZeRO
        text_encoder = build_text_encoder(cfg.text_encoder).to(device)
        vae = load_autoencoder(cfg.autoencoder, device)
    encoder = CachedTextEncoder(text_encoder) if cfg.text_encoder.cache else text_encoder
    if cfg.text_encoder.cache:
        encoder.load(cfg.text_encoder.cache)
    unet_cfg = network_config(cfg, text_encoder, vae)
    latent_geometry(unet_cfg, vae, cfg.data.resolution)
    if cfg.data.buckets is not None:  # bucket sides: multiples of the VAE's factor × the U-Net's downsampling
        cfg.data.bucket_step = bucket_step(cfg, vae.factor if vae is not None else 1)
    multiple = (vae.factor if vae is not None else 1) * downsample_factor(unet_cfg)
    bad = [s for s in cfg.logging.sample_shapes or [] if len(s) != 2 or min(s) < 1 or s[0] % multiple or s[1] % multiple]
    if bad:
        raise ValueError(f"logging.sample_shapes {bad}: each must be [width, height], multiples of {multiple} (the "
                         f"VAE's factor × the U-Net's downsampling)")
    loader = Loader(cfg.data, cfg.optim.batch_size, rank=rank, world_size=world, state=data_state,
                    pin_memory=device.type == "cuda", grad_accum=cfg.optim.grad_accum)
    empty = None
    if loader.manifest is not None:
        check_manifest(loader.manifest, vae.identity() if vae is not None else None, cfg.data.resolution)
        stored = loader.manifest.get("text")
        if stored and stored != text_encoder.identity:
            log.warning("the latent shards' caption embeddings come from text encoder %s, not the configured %s: "
                        "encoding the captions instead", stored, text_encoder.identity)
        elif stored:
            empty = cond_to(text_encoder.encode([""]), device)
    meaning = {"model_family": family_of(unet_cfg), "autoencoder": vae.identity() if vae is not None else None,
               "diffusion": {k: getattr(cfg.diffusion, k) for k in ("num_steps", "schedule", "zero_terminal_snr",
                                                                   "prediction")}}
    if resume_from:
        ckpt.check_model_config(resume_from, dataclasses.asdict(unet_cfg), meaning)
    validation = None
    if cfg.validation.shards is not None:
        validation = Validation(cfg.validation, cfg.data, GaussianDiffusion.from_config(cfg.diffusion), encoder, vae,
                                device, cfg.train.seed, rank, world)
    return Inputs(loader, text_encoder, encoder, vae, empty, unet_cfg, meaning, resume_from, validation)


def build_engine(cfg: TrainConfig, accelerator, inputs: Inputs) -> Engine:
    """The U-Net (pretrained weights unless resuming), EMA, compile, optimiser, LR schedule, under the launcher's
    engine (DDP or DeepSpeed)."""
    model = build(inputs.unet_cfg)
    if not inputs.resume_from:
        load_pretrained_weights(cfg, model)
    o = cfg.optim
    dist.check_launch(cfg, accelerator, model)
    dist.configure_deepspeed(accelerator, o, accelerator.num_processes)
    ema = build_ema(model, cfg.ema)  # before compiling (the EMA copy samples eagerly) and before DeepSpeed casts
    if ema is not None:
        ema.to(accelerator.device)
    if cfg.train.compile:
        t = cfg.train
        log.info(f"train.compile: the U-Net runs through torch.compile (backend {t.compile_backend}, mode "
                 f"{t.compile_mode or 'default'}); the first step compiles it (minutes with inductor on a CPU)")
        # in place (nn.Module.compile): the state dict keeps its keys, no `_orig_mod.` prefix
        model.compile(backend=t.compile_backend, mode=t.compile_mode)
    # fused: one kernel for all parameters (CPU and CUDA; on this CPU a quarter of the per-tensor loop's time)
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                  eps=o.eps, fused=True)
    # One scheduler step per optimiser step taken (a skipped step does not advance it).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, o.warmup_steps, o.decay_steps or cfg.train.max_steps, o.schedule, o.min_lr_ratio))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)  # the text encoder stays out
    weights_dtype = next(model.parameters()).dtype  # bf16/fp16 under DeepSpeed's mixed precision, else fp32
    net = network(model, None if weights_dtype == torch.float32 else weights_dtype, cfg.train.channels_last)
    return Engine(model, optimizer, scheduler, ema, net, dist.zero_stage(accelerator) is not None)


@dataclasses.dataclass
class StepResult:
    window_ok: bool  # every micro-step's loss finite on every rank
    bad_at: list  # (micro-step, ranks) where not
    loss: torch.Tensor  # the window's summed micro-step losses (of the finite ones), on the device
    stepped: bool
    grad_norm: object
    dropped: int  # captions this rank emptied
    wait: float  # seconds spent waiting for data


def train_step(cfg: TrainConfig, accelerator, inputs: Inputs, engine: Engine, diffusion, batches) -> StepResult:
    """One optimiser step: grad_accum micro-batches (caption dropout, ε-loss, backward; a non-finite loss anywhere
    drops the whole window on every rank), then clip and step (or skip)."""
    device, o = accelerator.device, cfg.optim
    res = StepResult(True, [], torch.zeros((), device=device), False, None, 0, 0.0)
    for micro in range(o.grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        res.wait += time.perf_counter() - t0
        captions, dropped = drop_captions(batch.captions, batch.index, cfg.train.caption_dropout, cfg.train.seed)
        res.dropped += dropped
        cond = batch_cond(batch, captions, inputs.encoder, inputs.empty, device)
        if getattr(inputs.unet_cfg, "micro_conditioning", False):
            cond["micro"] = batch_micro(batch, captions, inputs.vae, device)
        x0 = batch_input(batch, inputs.vae, device)
        t, noise = sample_draws(diffusion, x0, batch.index, cfg.train.seed,
                                inputs.loader.layout.global_batch if cfg.diffusion.timestep_sampling == "stratified"
                                else None)
        with accelerator.accumulate(engine.model):
            with accelerator.autocast():  # the forward and the loss only (PyTorch's advice for autocast)
                loss = diffusion.training_losses(engine.net, x0, cond, t=t, noise=noise)["loss"].mean()
            finite, bad_ranks = dist.finite_everywhere(accelerator, loss)  # the one host sync per micro-step
            if finite:
                res.loss += loss.detach()
            else:
                res.window_ok = False
                res.bad_at.append((micro, bad_ranks))
            backward(accelerator, loss, res.window_ok, engine.under_deepspeed)
    res.stepped, res.grad_norm = optimizer_step(accelerator, engine.model, engine.optimizer, res.window_ok,
                                                o.grad_clip, engine.under_deepspeed)
    res.keys = batch.keys
    return res


class Meter:
    """Sums between log lines, kept on the device (no host sync until the log step)."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.reset()

    def reset(self):
        self.loss.zero_()
        self.grad_norm.zero_()
        self.losses = self.norms = self.images = 0
        self.wait, self.since = 0.0, time.perf_counter()

    def add(self, res: StepResult, accum: int, images: int):
        if res.stepped and res.grad_norm is not None:
            self.grad_norm += res.grad_norm.detach().float() if torch.is_tensor(res.grad_norm) else float(res.grad_norm)
            self.norms += 1
        if res.window_ok:  # the logged loss: of the windows trained on
            self.loss += res.loss
            self.losses += accum
        self.images += images
        self.wait += res.wait


def log_metrics(accelerator, run_dir: Path, step: int, meter: Meter, counts: Counts, engine: Engine, loader,
                bar) -> dict:
    """The log line, the tracker's points and metrics.jsonl (collective: the loss is the global batch's mean)."""
    elapsed = time.perf_counter() - meter.since
    everyone = gather_object([(loader.skipped, loader.epoch, loader.waiting)])
    skipped = dict(sum((Counter(c) for c, _, _ in everyone), Counter()))
    metrics = {"loss": accelerator.reduce(meter.loss, "mean").item() / max(1, meter.losses),
               "lr": engine.scheduler.get_last_lr()[0], "grad_norm": meter.grad_norm.item() / max(1, meter.norms),
               "images_per_s": meter.images * accelerator.num_processes / elapsed,
               "data_wait_fraction": meter.wait / elapsed, **counts.metrics(), "epoch": min(e for _, e, _ in everyone),
               **{f"skipped/{k}": v for k, v in skipped.items()}}
    if loader.buckets:  # samples carried over in partly filled buckets (data/buckets.py's policy: never dropped)
        metrics["bucket_waiting"] = sum(w for _, _, w in everyone)
    write_metrics(accelerator, run_dir, step, metrics)
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
    log.info("step %d: loss %.4f, lr %.2e, grad norm %.3f, %.1f img/s, data wait %.0f%%, skipped steps %d "
             "(non-finite loss) + %d (non-finite gradients), skipped samples %s", step, metrics["loss"],
             metrics["lr"], metrics["grad_norm"], metrics["images_per_s"], 100 * metrics["data_wait_fraction"],
             counts.nan_skips, counts.overflow_skips, skipped or "none")
    meter.reset()
    return metrics


def write_metrics(accelerator, run_dir: Path, step: int, metrics: dict):
    accelerator.log(metrics, step=step)
    if accelerator.is_main_process:  # a plain copy for scripts and reports (the loss curve)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def validate(accelerator, run_dir: Path, step: int, inputs: Inputs, engine: Engine):
    """The validation loss at this step, of the EMA weights when there are (what sampling uses), else the raw ones."""
    weights = engine.ema.ema_model if engine.ema is not None else accelerator.unwrap_model(engine.model)
    net = weights if engine.ema is not None else engine.net
    was_training = weights.training
    weights.eval()
    metrics = inputs.validation(net, accelerator.autocast)
    weights.train(was_training)
    write_metrics(accelerator, run_dir, step, metrics)
    log.info("step %d: validation loss %.4f (%s weights, %.1f s)", step, metrics["val_loss"],
             "EMA" if engine.ema is not None else "raw", metrics["val_seconds"])


def save_samples(cfg: TrainConfig, accelerator, run_dir: Path, step: int, inputs: Inputs, engine: Engine, diffusion):
    """The fixed-prompt sample grid (every rank takes part under ZeRO-3 without EMA: its weights are sharded)."""
    zero3_weights = engine.ema is None and dist.zero_stage(accelerator) == 3
    if accelerator.is_main_process or zero3_weights:
        model = engine.ema.ema_model if engine.ema is not None else accelerator.unwrap_model(engine.model)
        path = run_dir / "samples" / f"step_{step:08d}.png" if accelerator.is_main_process else None
        save_sample_grid(model, inputs.encoder, diffusion, cfg, path, accelerator.device, inputs.vae,
                         sample_shapes(cfg, inputs.loader.buckets))
        if path is not None:
            _log_image(accelerator, path, step)
    accelerator.wait_for_everyone()


def save(cfg: TrainConfig, accelerator, ckpt_dir: Path, step: int, inputs: Inputs, engine: Engine, counts: Counts,
         keys: list[str]):
    """A checkpoint (collective), after checking that the replicas agree."""
    info = {"weights_checksum": dist.weights_checksum(accelerator, engine.model), "last_keys": keys}
    fingerprints = {i["weights_checksum"] for i in gather_object([info])}
    if len(fingerprints) > 1:
        log.warning("the ranks' weights differ at step %d (%s): replicas diverged", step, fingerprints)
    train_state = {"model_config": dataclasses.asdict(inputs.unet_cfg), **inputs.meaning, **counts.state()}
    ckpt.save_checkpoint(accelerator, ckpt_dir, step, engine.ema, inputs.loader, train_state,
                         cfg.checkpoint.keep_last, info)


def train(args, cfg: TrainConfig, run_dir: Path) -> Path:
    """The job, once its config is read and its run folder exists: set-up, then the loop (step → log → samples →
    validation → checkpoint), then the export."""
    try:
        accelerator = make_accelerator(cfg, run_dir)
        ckpt_dir = run_dir / "checkpoints"
        inputs = read_inputs(args, cfg, accelerator, ckpt_dir)
        engine = build_engine(cfg, accelerator, inputs)
    except (FileNotFoundError, ValueError, DataError) as e:  # LaunchError is a ValueError
        raise SystemExit(f"error: {e}") from None
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    counts = resume(accelerator, inputs, engine)
    describe(cfg, accelerator, run_dir, inputs, engine)

    loader, world = inputs.loader, accelerator.num_processes
    batches = iter(loader)
    bar = tqdm(total=cfg.train.max_steps, initial=counts.step, desc="train", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    meter = Meter(accelerator.device)
    dropped = 0  # captions this rank emptied since the counts were last summed
    val_every = cfg.validation.every
    if inputs.validation is not None and counts.step == 0:
        validate(accelerator, run_dir, 0, inputs, engine)
    engine.model.train()
    while counts.step < cfg.train.max_steps:
        res = train_step(cfg, accelerator, inputs, engine, diffusion, batches)
        dropped += res.dropped  # this rank's; summed over the ranks where counts are read (log, checkpoint)
        counts.seen += loader.layout.global_batch
        if res.stepped:
            engine.scheduler.step()  # ours alone (DeepSpeed's engine is given no scheduler): follows the steps taken
            update_ema(engine.ema, accelerator.unwrap_model(engine.model), accelerator)
        meter.add(res, cfg.optim.grad_accum, loader.layout.global_batch // world)
        counts.taken(res.stepped, res.window_ok)
        report_skip(accelerator, cfg, counts, res, world)
        bar.update(1)
        step, last = counts.step, counts.step == cfg.train.max_steps
        if step % cfg.logging.every == 0 or step % cfg.checkpoint.every == 0 or last:  # no host sync otherwise
            counts.dropped += int(accelerator.reduce(torch.tensor(dropped, device=accelerator.device), "sum"))
            dropped = 0
        if step % cfg.logging.every == 0 or last:
            log_metrics(accelerator, run_dir, step, meter, counts, engine, loader, bar)
        if cfg.logging.sample_every and step % cfg.logging.sample_every == 0 or last:
            save_samples(cfg, accelerator, run_dir, step, inputs, engine, diffusion)
        if inputs.validation is not None and (step % val_every == 0 or last):
            validate(accelerator, run_dir, step, inputs, engine)
        if step % cfg.checkpoint.every == 0 or last:
            save(cfg, accelerator, ckpt_dir, step, inputs, engine, counts, res.keys)
    bar.close()
    export(cfg, accelerator, run_dir, inputs, engine, counts)
    accelerator.end_training()
    return run_dir


def resume(accelerator, inputs: Inputs, engine: Engine) -> Counts:
    """The counters, and the engine's and EMA's states, of the checkpoint resumed from (fresh ones otherwise)."""
    if not inputs.resume_from:
        return Counts()
    try:
        state = ckpt.load_checkpoint(accelerator, inputs.resume_from, engine.ema)  # data: restored in the Loader
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    counts = Counts.from_state(state)
    log.info("resumed from %s at step %d", inputs.resume_from, counts.step)
    return counts


def describe(cfg: TrainConfig, accelerator, run_dir: Path, inputs: Inputs, engine: Engine):
    """config.yaml, the first log lines (engine, precision, accumulation, data, space) and the trackers."""
    if accelerator.is_main_process:
        ckpt.remove_partial(run_dir / "checkpoints")
        save_config(cfg, run_dir / "config.yaml")
        world, vae, loader = accelerator.num_processes, inputs.vae, inputs.loader
        name = f"DeepSpeed ZeRO-{dist.zero_stage(accelerator)}" if engine.under_deepspeed else \
            ("DDP" if world > 1 else "one process")
        log.info("model %s: %.2fM parameters; text encoder %s (%s); %d process(es) on %s, %s, precision %s, "
                 "grad accumulation %d; data: %d %s shards, %d streams, global batch %d; %s",
                 cfg.model.size, accelerator.unwrap_model(engine.model).num_parameters() / 1e6, cfg.text_encoder.name,
                 "cached" if cfg.text_encoder.cache else "live", world, accelerator.device.type, name,
                 accelerator.mixed_precision, cfg.optim.grad_accum, len(loader.urls),
                 "latent" if loader.manifest else "image", loader.layout.streams, loader.layout.global_batch,
                 f"latent space of {vae.source} ({vae.channels}×{cfg.data.resolution // vae.factor}²)" if vae else
                 "pixel space")
    accelerator.init_trackers(cfg.logging.project, config=_flat(dataclasses.asdict(cfg)))


def report_skip(accelerator, cfg: TrainConfig, counts: Counts, res: StepResult, world: int):
    """Say why a step was skipped; stop after train.max_nan_in_row non-finite losses in a row."""
    if not res.window_ok:
        if accelerator.is_main_process:  # every rank knows, one says it
            where = ", ".join(f"micro-step {m} on {r} of {world} rank(s)" for m, r in res.bad_at)
            log.warning("non-finite loss at step %d (%s): step skipped on every rank (%d in a row)", counts.step,
                        where, counts.nan_in_row)
        if counts.nan_in_row >= cfg.train.max_nan_in_row:
            raise RuntimeError(f"{counts.nan_in_row} non-finite losses in a row (train.max_nan_in_row): stopping. "
                               f"Lower optim.lr, use bf16 rather than fp16, or resume from an earlier checkpoint.")
    elif not res.stepped:
        log.info("step %d skipped: inf/NaN gradients from finite losses (in fp16 the loss scaler lowers its scale)",
                 counts.step)


def export(cfg: TrainConfig, accelerator, run_dir: Path, inputs: Inputs, engine: Engine, counts: Counts):
    """RUN/model/: what sampling, evaluation and pipeline/export.py load (collective: gathers ZeRO-3 shards)."""
    unet_state = accelerator.get_state_dict(engine.model)
    if accelerator.is_main_process:
        ema = engine.ema
        ckpt.export_model(run_dir / "model", unet_state, ema.ema_model.state_dict() if ema is not None else None,
                          inputs.unet_cfg, cfg.text_encoder, inputs.text_encoder, cfg.diffusion, cfg.data.resolution,
                          counts.step, inputs.vae, cfg.autoencoder)
        log.info("done: %d steps (%d optimiser steps; skipped: %d for non-finite loss, %d for non-finite gradients); "
                 "caption dropout %.3f; skipped samples %s", counts.step, counts.optimizer_steps, counts.nan_skips,
                 counts.overflow_skips, counts.dropped / max(1, counts.seen), inputs.loader.skipped or "none")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _log_image(accelerator, path: Path, step: int):
    import numpy as np
    from PIL import Image

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": wandb.Image(str(path))}, step=step)


if __name__ == "__main__":
    main()
