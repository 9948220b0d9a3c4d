"""Named U-Net sizes (DiT-style: each a tiny entry), of two families: the own U-Net (``models.unet``) and diffusers'
``UNet2DConditionModel`` in Stable Diffusion's exact shape (``models.diffusers_unet``). Parameter counts for
context_dim = pooled_dim = 512 (own) or the SD text encoder's width (diffusers)."""

from __future__ import annotations

from dataclasses import asdict, replace

from torch import nn

from .diffusers_unet import SD1_UNET, SD2_UNET, DiffusersUNet, DiffusersUNetConfig
from .unet import UNet, UNetConfig

ModelConfig = UNetConfig | DiffusersUNetConfig

SIZES: dict[str, ModelConfig] = {
    # CPU demo and tests (~2M): 32 px, attention at the 8×8 level
    "tiny": UNetConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(2,), head_channels=32),
    # ~100M, 64 px
    "small": UNetConfig(base_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2, attention_levels=(1, 2, 3)),
    # ~400M, GLIDE / Imagen base-64 scale
    "base": UNetConfig(base_channels=224, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_levels=(1, 2, 3)),
    # ~1B
    "large": UNetConfig(base_channels=352, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_levels=(1, 2, 3)),
    # Stable Diffusion 1.x's U-Net, exactly (860M; diffusers' UNet2DConditionModel): starts from SD 1.x weights
    "sd": DiffusersUNetConfig(in_channels=4, context_dim=768, unet=dict(SD1_UNET)),
    # Stable Diffusion 2.x's (865M; OpenCLIP ViT-H's 1024-wide tokens)
    "sd2": DiffusersUNetConfig(in_channels=4, context_dim=1024, unet=dict(SD2_UNET)),
}


def model_config(size: str, **overrides) -> ModelConfig:
    """The named size's config with fields overridden (e.g. context_dim to match the text encoder)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; allowed values: {', '.join(SIZES)}")
    base = SIZES[size]
    if isinstance(base, DiffusersUNetConfig):
        return base.with_overrides(**overrides)
    unknown = set(overrides) - set(asdict(base))
    if unknown:
        raise ValueError(f"unknown U-Net config keys {sorted(unknown)}; allowed: {', '.join(asdict(base))}")
    return replace(base, **overrides)


def config_from_dict(family: str, fields: dict) -> ModelConfig:
    """A config saved with ``dataclasses.asdict`` (checkpoints, exported models) back as its dataclass."""
    if family == "diffusers":
        return DiffusersUNetConfig(**fields)
    if family != "unet":
        raise ValueError(f"unknown model family {family!r} (unet | diffusers)")
    return UNetConfig(**fields)


def family_of(cfg: ModelConfig) -> str:
    return "diffusers" if isinstance(cfg, DiffusersUNetConfig) else "unet"


def downsample_factor(cfg: ModelConfig) -> int:
    """How many times the U-Net halves its input, as a factor (its input sides must be multiples of it)."""
    levels = len(cfg.unet.get("block_out_channels", (0,) * 4)) if isinstance(cfg, DiffusersUNetConfig) \
        else len(cfg.channel_mult)
    return 2 ** (levels - 1)


def build(cfg: ModelConfig) -> nn.Module:
    """The network of a config, of either family."""
    return DiffusersUNet(cfg) if isinstance(cfg, DiffusersUNetConfig) else UNet(cfg)


def build_model(size: str, **overrides) -> nn.Module:
    return build(model_config(size, **overrides))
