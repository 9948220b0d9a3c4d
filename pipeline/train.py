"""Train a caption-conditioned diffusion U-Net (the seeds' ε-loss with caption dropout for classifier-free guidance).

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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python pipeline/train.py` from a clone

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import ProjectConfiguration, gather_object, set_seed  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import Loader  # noqa: E402
from data.loader import hash_seed  # noqa: E402
from diffusion import GaussianDiffusion  # noqa: E402
from models.registry import model_config  # noqa: E402
from models.text_encoders import CachedTextEncoder, build_text_encoder  # noqa: E402
from models.unet import UNet  # noqa: E402
from pipeline import checkpoint as ckpt  # noqa: E402
from pipeline.config import ConfigError, TrainConfig, load_config, save_config  # noqa: E402
from pipeline.generate import cond_to, generate, image_seed  # noqa: E402

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


def fix_cpu_deepspeed_ranks(accelerator):
    """DeepSpeed without a GPU (the CPU test path): Accelerate 1.x initialises torch.distributed for all N ranks but
    reports num_processes = 1 and process_index = 0 on every rank. Copy the real rank and world size into its shared
    state so that the data are sharded, only rank 0 writes files and barriers wait for everyone. A no-op on GPUs,
    where Accelerate gets them right."""
    from accelerate.state import AcceleratorState, PartialState

    dist = torch.distributed
    if accelerator.state.deepspeed_plugin is None or not dist.is_initialized():
        return
    if accelerator.num_processes == dist.get_world_size():
        return
    real = {"num_processes": dist.get_world_size(), "process_index": dist.get_rank(),
            "local_process_index": int(os.environ.get("LOCAL_RANK", dist.get_rank())), "backend": dist.get_backend()}
    PartialState._shared_state.update(real)
    AcceleratorState._shared_state.update(real)


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


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> tuple[list[str], int]:
    """Replace each caption by "" (the unconditional input) with probability ``p``; returns (captions, dropped)."""
    drop = torch.rand(len(captions), generator=generator) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist())], int(drop.sum())


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A checksum of this rank's copy of the weights (replicas under DDP / ZeRO-1/2 must agree)."""
    total = sum(p.detach().double().sum().item() + p.detach().double().pow(2).sum().item() for p in model.parameters())
    return f"{total:.15e}"


def build_ema(model: torch.nn.Module, cfg):
    if not cfg.enabled:
        return None
    from ema_pytorch import EMA

    return EMA(model, beta=cfg.decay, update_after_step=cfg.start_step, update_every=cfg.update_every,
               inv_gamma=cfg.inv_gamma, power=cfg.power, include_online_model=False)


def update_ema(ema, model, accelerator):
    """Under ZeRO-3 each rank holds a shard of every parameter: gather the full weights for the update."""
    if ema is None:
        return
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            ema.update()
    else:
        ema.update()


def save_sample_grid(ema_model, encoder, diffusion, cfg: TrainConfig, path: Path, device) -> Path:
    """Fixed prompts at a fixed seed and guidance: the same picture at every step, so progress is visible."""
    from torchvision.utils import save_image

    lc = cfg.logging
    prompts = [p for p in lc.sample_prompts for _ in range(lc.sample_per_prompt)]
    seeds = [image_seed(lc.sample_seed, i, j) for i in range(len(lc.sample_prompts)) for j in range(lc.sample_per_prompt)]
    images = generate(ema_model, encoder, diffusion, prompts, seeds, cfg.data.resolution, guidance=lc.sample_guidance,
                      sampler=lc.sample_sampler, steps=lc.sample_steps, channels=ema_model.cfg.in_channels,
                      device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, path, nrow=lc.sample_per_prompt * 2, padding=1)
    return path


def channels_last_input(model):
    """The U-Net fed x_t in channels_last (NHWC) layout (train.channels_last): the values are unchanged, and every
    activation after the first convolution follows the input's layout (PyTorch picks a convolution's output layout
    from its input or weight), while the weights stay NCHW for checkpoints, EMA and DeepSpeed."""
    return lambda x, t, cond: model(x.contiguous(memory_format=torch.channels_last), t, cond)


def main(argv=None):
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None

    if cfg.train.deterministic:
        use_deterministic_kernels()
    run_dir = writable_run_dir(cfg.train.output_dir)
    tracker = None if cfg.logging.tracker == "none" else cfg.logging.tracker
    accelerator = Accelerator(
        mixed_precision=cfg.optim.mixed_precision, gradient_accumulation_steps=cfg.optim.grad_accum,
        log_with=tracker, step_scheduler_with_optimizer=False,  # one scheduler step per optimiser step, any world size
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")))
    fix_cpu_deepspeed_ranks(accelerator)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    ckpt_dir = run_dir / "checkpoints"

    # Everything that can be wrong with the input is checked before the first step.
    try:
        resume_from = ckpt.resolve_resume(args.resume, ckpt_dir) if args.resume else None
        data_state = ckpt.load_data_state(resume_from, rank) if resume_from else None
        loader = Loader(cfg.data, cfg.optim.batch_size, rank=rank, world_size=world, state=data_state,
                        pin_memory=device.type == "cuda")
        set_seed(cfg.train.seed)  # the same initial weights on every rank
        text_encoder = build_text_encoder(cfg.text_encoder).to(device)
        encoder = CachedTextEncoder(text_encoder) if cfg.text_encoder.cache else text_encoder
        if cfg.text_encoder.cache:
            encoder.load(cfg.text_encoder.cache)
        unet_cfg = model_config(cfg.model.size, context_dim=text_encoder.dim, pooled_dim=text_encoder.pooled_dim,
                                **cfg.model.overrides)
        if resume_from:
            ckpt.check_model_config(resume_from, dataclasses.asdict(unet_cfg))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    model = UNet(unet_cfg)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    ema = build_ema(model, cfg.ema)  # before compiling: the EMA copy samples eagerly
    if ema is not None:
        ema.to(device)
    if cfg.train.compile:
        if accelerator.state.deepspeed_plugin is not None:
            raise SystemExit("error: train.compile=true is not supported under DeepSpeed here (its engine wraps the "
                             "module's hooks); set train.compile=false, or use DDP (launch/accelerate/8gpu_ddp.yaml)")
        log.info("train.compile: the U-Net runs through torch.compile; the first step compiles it (minutes on a CPU)")
        model.compile()  # in place (nn.Module.compile): the state dict keeps its keys, no `_orig_mod.` prefix
    o = cfg.optim
    # fused: one kernel for all parameters (CPU and CUDA; on this CPU a quarter of the per-tensor loop's time)
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, o.warmup_steps, o.decay_steps or cfg.train.max_steps, o.schedule, o.min_lr_ratio))
    if accelerator.state.deepspeed_plugin is not None:  # no DataLoader is prepared: tell DeepSpeed the micro-batch
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = o.batch_size
        ds["gradient_accumulation_steps"] = o.grad_accum
        ds["train_batch_size"] = o.batch_size * o.grad_accum * world
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = o.grad_clip or 0.0
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)  # the text encoder stays out

    step, nan_skips, nan_in_row, dropped_total, seen_total = 0, 0, 0, 0, 0
    if resume_from:
        state = ckpt.load_checkpoint(accelerator, resume_from, ema)  # data position: restored in the Loader
        step, nan_skips, dropped_total, seen_total = (state[k] for k in ("step", "nan_skips", "dropped", "seen"))
        log.info("resumed from %s at step %d", resume_from, step)
    if accelerator.is_main_process:
        ckpt.remove_partial(ckpt_dir)
        save_config(cfg, run_dir / "config.yaml")
        log.info("model %s: %.2fM parameters; text encoder %s (%s); %d process(es) on %s; data: %d shards",
                 cfg.model.size, accelerator.unwrap_model(model).num_parameters() / 1e6, cfg.text_encoder.name,
                 "cached" if cfg.text_encoder.cache else "live", world, device.type, len(loader.urls))
    accelerator.init_trackers(cfg.logging.project, config=_flat(dataclasses.asdict(cfg)))
    train_state = lambda: {"model_config": dataclasses.asdict(unet_cfg), "nan_skips": nan_skips,  # noqa: E731
                           "dropped": dropped_total, "seen": seen_total}

    net = channels_last_input(model) if cfg.train.channels_last else model  # what the loss calls
    batches = iter(loader)
    bar = tqdm(total=cfg.train.max_steps, initial=step, desc="train", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    loss_sum = torch.zeros((), device=device)
    grad_norm_sum = torch.zeros((), device=device)  # summed on the device: no host sync until the log step
    logged_steps, wait_time, t_last, images_since = 0, 0.0, time.perf_counter(), 0
    model.train()
    while step < cfg.train.max_steps:
        finite_micro = 0
        for micro in range(o.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            wait_time += time.perf_counter() - t0
            gen = torch.Generator().manual_seed(hash_seed(cfg.train.seed, rank, step, micro))  # exact on resume
            captions, dropped = drop_captions(batch.captions, cfg.train.caption_dropout, gen)
            dropped_total += dropped
            seen_total += len(captions)
            images_since += len(captions)
            cond = cond_to(encoder.encode(captions), device)
            x0 = batch.pixels(device)
            noise_gen = torch.Generator(device).manual_seed(hash_seed(cfg.train.seed, rank, step, micro, 1))
            with accelerator.accumulate(model):
                with accelerator.autocast():  # the forward and the loss only (PyTorch's advice for autocast)
                    loss = diffusion.training_losses(net, x0, cond, generator=noise_gen)["loss"].mean()
                # The one host sync per micro-step: every rank must agree to skip, or DDP's all-reduce hangs.
                finite = accelerator.gather(torch.isfinite(loss.detach()).float()[None]).min() > 0
                if finite:  # every rank agrees, so DDP's all-reduce stays matched
                    accelerator.backward(loss)
                    loss_sum += loss.detach()
                    finite_micro += 1
        if finite_micro:
            if accelerator.sync_gradients and o.grad_clip > 0:
                norm = accelerator.clip_grad_norm_(model.parameters(), o.grad_clip)
                if norm is not None:  # DeepSpeed clips inside its engine and returns None
                    grad_norm_sum += norm.detach().float() if torch.is_tensor(norm) else norm
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            update_ema(ema, accelerator.unwrap_model(model), accelerator)
            nan_in_row = 0
        else:
            optimizer.zero_grad(set_to_none=True)
            nan_skips += 1
            nan_in_row += 1
            log.warning("non-finite loss at step %d: step skipped (%d in a row)", step, nan_in_row)
            if nan_in_row >= cfg.train.max_nan_in_row:
                raise RuntimeError(f"{nan_in_row} non-finite losses in a row (train.max_nan_in_row): stopping. "
                                   f"Lower optim.lr, use bf16 rather than fp16, or resume from an earlier checkpoint.")
        step += 1
        logged_steps += 1
        bar.update(1)

        if step % cfg.logging.every == 0 or step == cfg.train.max_steps:
            elapsed = time.perf_counter() - t_last
            skipped = dict(sum((Counter(c) for c in gather_object([loader.skipped])), Counter()))
            metrics = {"loss": accelerator.reduce(loss_sum, "mean").item() / max(1, logged_steps * o.grad_accum),
                       "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm_sum.item() / max(1, logged_steps),
                       "images_per_s": images_since * world / elapsed, "data_wait_fraction": wait_time / elapsed,
                       "nan_skips": nan_skips, "caption_dropout_rate": dropped_total / max(1, seen_total),
                       "epoch": loader.epoch, **{f"skipped/{k}": v for k, v in skipped.items()}}
            accelerator.log(metrics, step=step)
            if accelerator.is_main_process:  # a plain copy for scripts and reports (the loss curve)
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            log.info("step %d: loss %.4f, lr %.2e, grad norm %.3f, %.1f img/s, data wait %.0f%%, skipped %s",
                     step, metrics["loss"], metrics["lr"], metrics["grad_norm"], metrics["images_per_s"],
                     100 * metrics["data_wait_fraction"], skipped or "none")
            loss_sum.zero_()
            grad_norm_sum.zero_()
            logged_steps, wait_time, images_since, t_last = 0, 0.0, 0, time.perf_counter()

        last = step == cfg.train.max_steps
        if cfg.logging.sample_every and step % cfg.logging.sample_every == 0 or last:
            if accelerator.is_main_process:
                sampler_model = ema.ema_model if ema is not None else accelerator.unwrap_model(model)
                path = save_sample_grid(sampler_model, encoder, diffusion, cfg,
                                        run_dir / "samples" / f"step_{step:08d}.png", device)
                _log_image(accelerator, path, step)
            accelerator.wait_for_everyone()
        if step % cfg.checkpoint.every == 0 or last:
            zero3 = accelerator.state.deepspeed_plugin is not None and accelerator.state.deepspeed_plugin.zero_stage == 3
            info = {"weights_fingerprint": None if zero3 else weights_fingerprint(model), "last_keys": batch.keys}
            fingerprints = {i["weights_fingerprint"] for i in gather_object([info])}
            if len(fingerprints) > 1:
                log.warning("the ranks' weights differ at step %d (%s): replicas diverged", step, fingerprints)
            ckpt.save_checkpoint(accelerator, ckpt_dir, step, ema, loader, train_state(), cfg.checkpoint.keep_last, info)
    bar.close()

    unet_state = accelerator.get_state_dict(model)  # collective (gathers ZeRO-3 shards)
    if accelerator.is_main_process:
        ckpt.export_model(run_dir / "model", unet_state, ema.ema_model.state_dict() if ema is not None else None,
                          unet_cfg, cfg.text_encoder, text_encoder, cfg.diffusion, cfg.data.resolution, step)
        log.info("done: %d steps; %d skipped for non-finite loss; caption dropout %.3f; skipped samples %s",
                 step, nan_skips, dropped_total / max(1, seen_total), loader.skipped or "none")
    accelerator.end_training()
    return run_dir


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
