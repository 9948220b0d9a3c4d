"""The typed run config: one section per subsystem, read from YAML, overridden by dotted ``key=value`` arguments.

    cfg = load_config("launch/configs/demo.yaml", ["optim.lr=1e-4", "data.shards=/data/{000..099}.tar"])

Unknown keys and values of the wrong type are :class:`ConfigError`s that name the key and what is allowed.
Values in overrides are parsed as YAML (``true``, ``[1, 2]``, ``null``) and then checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data import DataConfig
from diffusion import DiffusionConfig
from models.autoencoder import AutoencoderConfig
from models.text_encoders import TextEncoderConfig
from pipeline.validation import ValidationConfig


COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type, bad value."""


@dataclass
class ModelSection:
    size: str = "tiny"  # a name from models.registry.SIZES (own U-Net: tiny ... large; diffusers' SD shape: sd, sd2)
    # any field of the size's config, e.g. {dropout: 0.1, channel_mult: [1, 2]}; for sd/sd2 also any
    # UNet2DConditionModel argument. With `pretrained`, only gradient_checkpointing and attention_backend.
    overrides: dict = field(default_factory=dict)
    # Start from Stable Diffusion 1.x/2.x: a diffusers pipeline folder or a single .safetensors/.ckpt file. Its U-Net
    # (architecture and weights), VAE, text encoder and noise schedule are used: the autoencoder, text_encoder and
    # diffusion sections follow it (an explicit setting that contradicts it is an error); model.size is not used.
    pretrained: str | None = None
    # single files of another shape than SD 1.x/2.x's: a local folder laid out like a pipeline's, with the configs
    # (unet/config.json, vae/config.json, text_encoder/config.json, tokenizer/, scheduler/scheduler_config.json)
    pretrained_config: str | None = None


@dataclass
class TextSection(TextEncoderConfig):
    cache: str | None = None  # precomputed caption embeddings (pipeline/precompute.py); missing captions are encoded


@dataclass
class OptimSection:
    batch_size: int = 32  # per process, per micro-step
    grad_accum: int = 1  # micro-steps per optimiser step
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 500  # linear LR warm-up (optimiser steps)
    schedule: str = "constant"  # constant | cosine (after warm-up, down to min_lr_ratio · lr at decay_steps)
    decay_steps: int = 0  # the cosine's horizon; 0 = train.max_steps. Set it when --max-steps is used to stop early
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    mixed_precision: str = "no"  # no | bf16 | fp16 (through Accelerate)


@dataclass
class EMASection:
    enabled: bool = True
    decay: float = 0.9999  # the maximum decay; warm-up: decay_k = min(decay, 1 − (1 + k/inv_gamma)^−power)
    power: float = 0.75
    inv_gamma: float = 1.0
    start_step: int = 0  # copy the weights until this step, then average
    update_every: int = 1


@dataclass
class TrainSection:
    max_steps: int = 10_000  # total optimiser steps (a resumed run continues up to it)
    seed: int = 0
    caption_dropout: float = 0.1  # probability of the empty caption (classifier-free guidance's unconditional branch)
    max_nan_in_row: int = 10  # non-finite losses in a row that stop the run (each one skips its step)
    output_dir: str = "runs/run"
    # torch.compile the U-Net's training forward/backward (inductor). Compiled in place, so checkpoints keep their
    # keys. The first step compiles (a minute or more on a CPU); not with DeepSpeed (refused at start).
    compile: bool = False
    # torch.compile's backend and mode: inductor (Triton kernels on a GPU) with its default mode, or e.g. mode
    # "max-autotune" (longer compile, tuned kernels). backend "aot_eager" traces forward and backward exactly as inductor
    # receives them but runs them eagerly: seconds to compile, for finding a compile problem (and for the CPU tests).
    compile_backend: str = "inductor"
    compile_mode: str | None = None  # default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs (inductor)
    # Feed the U-Net channels_last (NHWC) batches; its activations follow (the weights stay NCHW, so checkpoints and
    # DeepSpeed are unaffected). Faster convolutions on CPUs (oneDNN, most of all in bf16); not yet timed on a GPU,
    # where the GroupNorm node copies to NCHW and back (CUDA's GroupNorm takes NCHW only).
    channels_last: bool = False
    # Deterministic kernels (torch.use_deterministic_algorithms; cuBLAS workspace pinned): on a GPU, two runs with one
    # seed and a resumed run then give the same weights bit for bit. Some kernels are slower; a CPU is always so.
    deterministic: bool = False


@dataclass
class LoggingSection:
    every: int = 50  # steps between log lines / tracker points
    tracker: str = "tensorboard"  # tensorboard | wandb | none
    project: str = "t2i"
    sample_every: int = 1000  # steps between sample grids (0 = only at the end)
    sample_prompts: list[str] = field(default_factory=lambda: [
        "a large red circle in the center on a white background", "a small blue square at the top left on a beige background",
        "a large yellow triangle in the center on a light blue background", "a small green diamond at the bottom right on a light gray background"])
    sample_guidance: float = 3.0
    sample_steps: int = 25
    sample_sampler: str = "ddim"
    sample_seed: int = 0
    sample_per_prompt: int = 2
    # [width, height] shapes of the sample grid's columns (null: the square of data.resolution, or with
    # data.buckets the tallest, the squarest and the widest bucket)
    sample_shapes: list[list[int]] | None = None


@dataclass
class CheckpointSection:
    every: int = 1000  # optimiser steps between checkpoints (and one at the end)
    keep_last: int = 3


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    text_encoder: TextSection = field(default_factory=TextSection)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)  # path null: pixel space
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EMASection = field(default_factory=EMASection)
    train: TrainSection = field(default_factory=TrainSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # shards null: no validation loss

    def validate(self):
        from models.registry import SIZES, model_config

        try:
            self.data.validate()
            self.autoencoder.validate()
            self.validation.validate(self.diffusion.num_steps)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.model.pretrained:
            apply_pretrained(self)
        elif self.model.size not in SIZES:
            raise ConfigError(f"model.size={self.model.size!r}; allowed: {', '.join(SIZES)}")
        else:
            try:
                model_config(self.model.size, **self.model.overrides)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"model.overrides: {e}") from None
        checks = [
            (self.optim.mixed_precision in ("no", "bf16", "fp16"), "optim.mixed_precision must be no, bf16 or fp16"),
            (self.optim.schedule in ("constant", "cosine"), "optim.schedule must be constant or cosine"),
            (self.optim.batch_size >= 1 and self.optim.grad_accum >= 1, "optim.batch_size and grad_accum must be ≥ 1"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (0 <= self.train.caption_dropout < 1, "train.caption_dropout must be in [0, 1)"),
            (self.train.max_steps >= 1, "train.max_steps must be ≥ 1"),
            (self.logging.tracker in ("tensorboard", "wandb", "none"), "logging.tracker must be tensorboard, wandb or none"),
            (self.checkpoint.every >= 1 and self.checkpoint.keep_last >= 1, "checkpoint.every and keep_last must be ≥ 1"),
            (0 < self.ema.decay < 1, "ema.decay must be in (0, 1)"),
            (self.train.compile_mode in COMPILE_MODES, f"train.compile_mode must be one of {COMPILE_MODES[1:]} or null"),
            (self.train.compile_mode is None or self.train.compile_backend == "inductor",
             "train.compile_mode is inductor's: set train.compile_backend=inductor or compile_mode=null"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.train.compile:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.train.compile_backend not in backends:
                raise ConfigError(f"train.compile_backend={self.train.compile_backend!r} is not a torch.compile backend "
                                  f"here; available: {', '.join(backends)}")
        return self


# What model.pretrained decides, per section (the rest of those sections stays the user's).
PRETRAINED_KEYS = {"diffusion": ("num_steps", "schedule", "prediction", "zero_terminal_snr"),
                   "text_encoder": ("kind", "name", "config_file"), "autoencoder": ("path", "config")}
PRETRAINED_OVERRIDES = ("gradient_checkpointing", "attention_backend")


def apply_pretrained(cfg: TrainConfig) -> None:
    """Make the config follow ``model.pretrained`` (a Stable Diffusion folder or file): its text encoder, VAE and
    noise schedule. A key the user set explicitly (``cfg.explicit``) to another value is a ConfigError."""
    from models.stable_diffusion import SDError, diffusion_settings, open_sd

    m = cfg.model
    try:
        src = open_sd(m.pretrained, m.pretrained_config)
        scheduler = src.scheduler()
    except SDError as e:
        raise ConfigError(f"model.pretrained: {e}") from None
    bad = set(m.overrides) - set(PRETRAINED_OVERRIDES)
    if bad:
        raise ConfigError(f"model.overrides {sorted(bad)} with model.pretrained: the architecture is the checkpoint's "
                          f"(only {', '.join(PRETRAINED_OVERRIDES)} can be set)")
    explicit = getattr(cfg, "explicit", set())
    config_dir = m.pretrained_config
    wanted = {"text_encoder": {"kind": "hf_clip", "name": m.pretrained, "config_file": config_dir},
              "autoencoder": {"path": m.pretrained,
                              "config": None if src.is_folder else (str(Path(config_dir) / "vae") if config_dir
                                                                     else "sd")}}
    if scheduler is not None:
        try:
            wanted["diffusion"] = diffusion_settings(scheduler)
        except SDError as e:
            raise ConfigError(f"model.pretrained: {e}") from None
    elif "diffusion.prediction" not in explicit:
        raise ConfigError(f"model.pretrained={m.pretrained!r} is a Stable Diffusion 2.x file, whose weights do not say "
                          f"what they predict: set diffusion.prediction=v (the 768 px models) or epsilon (512 px base)")
    else:
        wanted["diffusion"] = {"num_steps": 1000, "schedule": "scaled_linear", "zero_terminal_snr": False}
    for section, values in wanted.items():
        for key, value in values.items():
            current = getattr(getattr(cfg, section), key)
            if f"{section}.{key}" in explicit and current != value:
                raise ConfigError(f"{section}.{key}={current!r} contradicts model.pretrained ({m.pretrained}), which "
                                  f"gives {value!r}: remove the setting (the checkpoint decides it)")
            setattr(getattr(cfg, section), key, value)


def explicit_keys(raw: dict, prefix: str = "") -> set[str]:
    """The dotted keys a config file and its overrides set (``{"a": {"b": 1}}`` → {"a", "a.b"})."""
    out = set()
    for k, v in raw.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= explicit_keys(v, f"{prefix}{k}.")
    return out


def _check(value, tp, key: str):
    """Check (and gently coerce: int → float, "1e-4" → float) ``value`` against the annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _check(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            if origin is list and args and args[0] is str and isinstance(value, str):
                return [value]
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else typing.Any
        return [_check(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is typing.Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads unquoted yes/no/on/off as booleans
            raise ConfigError(f"{key}: expected a string, got {value!r}; quote the value, e.g. {key.split('.')[-1]}: \"no\"")
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls, raw: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + u for u in unknown)} in {where}; "
                          f"allowed: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, raw[name] or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check(raw[name], tp, prefix + name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_override(raw: dict, item: str):
    """``a.b.c=value`` → raw["a"]["b"]["c"] = yaml(value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p} is not a section")
    parsed = yaml.safe_load(value) if value.strip() else ""
    if isinstance(parsed, bool) and value.strip().lower() not in ("true", "false"):
        parsed = value.strip()  # `optim.mixed_precision=no` means the string, not YAML 1.1's false
    node[parts[-1]] = parsed


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (shipped configs: launch/configs/*.yaml)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
            started = f"; {context} at line {cmark.line + 1}" if context and cmark is not None else ""
            raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}{started})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected sections (data:, model:, ...) at the top, got {type(raw).__name__}")
    seen: dict[str, str] = {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in seen:
            raise ConfigError(f"override {key} is given more than once ({seen[key]!r}, then {item!r}): give each key "
                              f"once. A brace pattern or glob left unquoted is expanded by the shell into many "
                              f"arguments: quote it, e.g. 'data.shards=/data/{{00000..09999}}.tar'")
        seen[key] = item
        apply_override(raw, item)
    cfg = from_dict(TrainConfig, raw)
    cfg.explicit = explicit_keys(raw)  # what the user set (model.pretrained refuses contradicting settings)
    return cfg.validate()


def save_config(cfg: TrainConfig, path: Path):
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def bucket_step(cfg: TrainConfig, vae_factor: int) -> int:
    """The multiple of aspect-ratio bucket sides (data.bucket_step when set): the VAE's factor × how many times the
    configured U-Net halves its input (model.pretrained's U-Net, or the named size with model.overrides). The
    training job and the latent precompute both ask here, so that ``data.buckets=auto`` gives them the same set."""
    from models.registry import downsample_factor, model_config

    if cfg.model.pretrained:
        from models.stable_diffusion import open_sd

        blocks = cfg.model.overrides.get("block_out_channels") or \
            open_sd(cfg.model.pretrained, cfg.model.pretrained_config).unet_config()["block_out_channels"]
        step = vae_factor * 2 ** (len(blocks) - 1)
    else:
        step = vae_factor * downsample_factor(model_config(cfg.model.size, **cfg.model.overrides))
    if cfg.data.bucket_step % step:
        raise ValueError(f"data.bucket_step={cfg.data.bucket_step} is not a multiple of {step} (the VAE's factor × "
                         f"the U-Net's downsampling): leave it out, the job sets it")
    return cfg.data.bucket_step or step
