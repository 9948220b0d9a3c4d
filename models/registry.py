"""Named U-Net sizes (DiT-style: each a tiny entry). Parameter counts for context_dim = pooled_dim = 512."""

from __future__ import annotations

from dataclasses import asdict, replace

from .unet import UNet, UNetConfig

SIZES: dict[str, UNetConfig] = {
    # CPU demo and tests (~2M): 32 px, attention at the 8×8 level
    "tiny": UNetConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(2,), head_channels=32),
    # ~100M, 64 px
    "small": UNetConfig(base_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2, attention_levels=(1, 2, 3)),
    # ~400M, GLIDE / Imagen base-64 scale
    "base": UNetConfig(base_channels=224, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_levels=(1, 2, 3)),
    # ~710M with a 768-wide text encoder: Stable Diffusion 1.x's U-Net shape (320 channels, ×1/2/4/4, attention at the
    # three finest levels; SD's own is 860M with its transformer blocks' feed-forwards) for 32–64² VAE latents
    "sd": UNetConfig(base_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2),
                     head_channels=64),
    # ~1B
    "large": UNetConfig(base_channels=352, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_levels=(1, 2, 3)),
}


def model_config(size: str, **overrides) -> UNetConfig:
    """The named size's config with fields overridden (e.g. context_dim to match the text encoder)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; allowed values: {', '.join(SIZES)}")
    unknown = set(overrides) - set(asdict(SIZES[size]))
    if unknown:
        raise ValueError(f"unknown U-Net config keys {sorted(unknown)}; allowed: {', '.join(asdict(SIZES[size]))}")
    return replace(SIZES[size], **overrides)


def build_model(size: str, **overrides) -> UNet:
    return UNet(model_config(size, **overrides))
