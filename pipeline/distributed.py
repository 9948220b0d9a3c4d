"""What the training job needs to know about its launcher: DeepSpeed's settings from the run config, launch files and
configs that cannot work together (refused before the first step), and the collectives that keep ranks in step.

Everything here is job-level code (style: distributed code lives in the jobs, never in models or math).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

log = logging.getLogger("train")


class LaunchError(ValueError):
    """A launch file and run config that cannot work together."""


def zero_stage(accelerator) -> int | None:
    """DeepSpeed's ZeRO stage, or None when the run is not under DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return None if plugin is None else int(plugin.zero_stage)


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


def check_world(accelerator):
    """The launcher started WORLD_SIZE processes; Accelerate must see as many, or each would train alone and overwrite
    the others' checkpoints. (On a machine without GPUs, `accelerate launch` with a multi-GPU launch file does that.)"""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise LaunchError(f"{launched} processes were launched but Accelerate runs each alone "
                          f"({accelerator.state.distributed_type}, {accelerator.num_processes} process): on a machine "
                          f"without GPUs set ACCELERATE_USE_CPU=true (DDP over gloo) or use a DeepSpeed launch file")


def configure_deepspeed(accelerator, optim, world: int):
    """Batch size, accumulation and clipping come from the run config (``optim.*``); the shipped DeepSpeed JSONs leave
    them "auto". No DataLoader is prepared, so Accelerate cannot fill them: set them here. An explicit JSON value
    that contradicts the config is refused rather than silently overridden."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": optim.batch_size, "gradient_accumulation_steps": optim.grad_accum,
              "train_batch_size": optim.batch_size * optim.grad_accum * world,
              "gradient_clipping": float(optim.grad_clip or 0.0)}
    config_key = {"train_micro_batch_size_per_gpu": "optim.batch_size", "gradient_accumulation_steps": "optim.grad_accum",
                  "train_batch_size": "optim.batch_size × optim.grad_accum × processes",
                  "gradient_clipping": "optim.grad_clip"}
    for key, value in wanted.items():
        given = ds.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            raise LaunchError(f"the DeepSpeed config sets {key}={given} but the run config gives {value} "
                              f"({config_key[key]}): set it to \"auto\" in the JSON (the run config decides)")
        ds[key] = value


def check_launch(cfg, accelerator, model: torch.nn.Module):
    """Refuse, before anything is prepared, what would crash in (or silently spoil) the first step."""
    stage = zero_stage(accelerator)
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher_precision != "no" and launcher_precision != cfg.optim.mixed_precision:
        log.warning("the launch file asks for mixed_precision=%s, the run config for optim.mixed_precision=%s: the run "
                    "config's is used (set optim.mixed_precision=%s to follow the launch file)", launcher_precision,
                    cfg.optim.mixed_precision, launcher_precision)
    if stage is None:
        return
    if cfg.train.compile:
        raise LaunchError("train.compile=true is not supported under DeepSpeed here (its engine wraps the module's "
                          "hooks); set train.compile=false, or use DDP (launch/accelerate/8gpu_ddp.yaml)")
    if cfg.optim.mixed_precision == "fp16":
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise LaunchError(f"DeepSpeed has no fp16 on this device ({get_accelerator().device_name()}): use "
                              f"optim.mixed_precision=bf16 or no, or the DDP launch file")
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if stage == 3 and frozen:
        raise LaunchError(f"ZeRO-3 with frozen parameters inside the engine ({', '.join(frozen[:3])}"
                          f"{', …' if len(frozen) > 3 else ''}): keep frozen modules out of accelerator.prepare, or "
                          f"use ZeRO-2 (launch/accelerate/8gpu_zero2.yaml)")


@contextlib.contextmanager
def frozen_parts(accelerator):
    """Where the frozen text encoder and VAE are built: outside ZeRO-3's partitioned initialisation. Under ZeRO-3
    Accelerate registers its DeepSpeed config with transformers, whose from_pretrained then builds models inside
    deepspeed.zero.Init: a CLIP text model would be sharded across the ranks (empty weights on each) although it
    never enters the engine (diffusers #1865). Accelerate's own zero3_init_context_manager(enable=False) re-registers
    the same config, so the registration itself is lifted here and restored after."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


@contextlib.contextmanager
def full_weights(accelerator, model: torch.nn.Module):
    """Collective under ZeRO-3: every rank sees the whole (gathered) parameters inside; elsewhere a no-op."""
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield
    else:
        yield


def weights_checksum(accelerator, model: torch.nn.Module) -> str:
    """Collective under ZeRO-3. A float checksum (Σw + Σw²) of this rank's copy of the whole weights: replicas must
    agree (not a fingerprint of the weights' identity: models.autoencoder.weights_fingerprint is that)."""
    with full_weights(accelerator, model):
        total = sum(p.detach().double().sum().item() + p.detach().double().pow(2).sum().item()
                    for p in model.parameters())
    return f"{total:.15e}"


def finite_everywhere(accelerator, loss: torch.Tensor) -> tuple[bool, int]:
    """(is the loss finite on every rank, on how many ranks it is not): one host sync; every rank gets the same answer,
    so every rank takes the same branch and no collective is left half-entered."""
    flags = accelerator.gather(torch.isfinite(loss.detach()).float()[None])
    bad = int((flags == 0).sum())
    return bad == 0, bad
