"""Diffusers' ``UNet2DConditionModel`` as a second U-Net family: Stable Diffusion's exact architecture (Rombach et al.
2022), so that training can start from SD weights and hand its weights back to diffusers, ComfyUI or AUTOMATIC1111.

    unet = DiffusersUNet(model_config("sd"))         # SD 1.x: 320/640/1280/1280 channels, cross-attention 768
    out = unet(x_t, t, cond)                          # the same call as the own U-Net: (B, C, h, w), (B,), cond dict

It behaves like ``models.unet.UNet`` towards the rest of the project (``cfg.in_channels``, ``downsample_factor``,
``num_parameters``, gradient checkpointing, the attention backend), while its weights are diffusers' own, under the
prefix ``unet.`` (``diffusers_state_dict`` strips it). As in Stable Diffusion, cross-attention sees all the caption's
tokens, padding included (SD was trained that way and its pipelines pass no mask), and no pooled caption embedding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import autocast_dtype, select_backend
from .unet import MICRO

# Stable Diffusion 1.x (runwayml/stable-diffusion-v1-5's unet/config.json): 860M parameters.
SD1_UNET = {
    "sample_size": 64, "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# Stable Diffusion 2.x (stabilityai/stable-diffusion-2-1-base): heads of 64 channels, linear projections, OpenCLIP
# ViT-H's 1024-wide tokens. 865M parameters.
SD2_UNET = {**SD1_UNET, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}
OWN_FIELDS = ("in_channels", "out_channels", "context_dim", "pooled_dim", "gradient_checkpointing",
              "attention_backend", "micro_conditioning")
MICRO_DIM = 256  # each size/crop number's sinusoidal width (SDXL's addition_time_embed_dim)


def unet_arguments() -> set[str]:
    """The keyword arguments UNet2DConditionModel accepts (its config keys)."""
    from diffusers import UNet2DConditionModel

    return set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}


@dataclass
class DiffusersUNetConfig:
    """The model section for the diffusers family (``models.registry``: sizes ``sd``, ``sd2``). The fields shared
    with the own U-Net's config are set by training (channels from the VAE, ``context_dim`` from the text encoder);
    every other ``UNet2DConditionModel`` argument sits in ``unet`` (``model.overrides.block_out_channels=[...]``
    lands there)."""

    in_channels: int = 4
    out_channels: int | None = None  # default: in_channels
    context_dim: int = 768  # the text encoder's token width (UNet2DConditionModel's cross_attention_dim)
    pooled_dim: int | None = None  # accepted for a uniform interface; SD 1.x/2.x's U-Net takes no pooled embedding
    gradient_checkpointing: bool = False
    attention_backend: str = "auto"  # auto | sdpa | xformers | math
    # SDXL's size and crop conditioning through SDXL's own layers (addition_embed_type="text_time": add_time_proj,
    # add_embedding), without the pooled text SDXL concatenates: SD 1.x/2.x have none
    micro_conditioning: bool = False
    unet: dict = field(default_factory=dict)  # the rest of UNet2DConditionModel's config

    def __post_init__(self):  # unknown keys are found by with_overrides (diffusers is imported only when used)
        clash = set(self.unet) & {"in_channels", "out_channels", "cross_attention_dim"}
        if clash:
            raise ValueError(f"{sorted(clash)}: set in_channels / out_channels / context_dim instead")
        if self.micro_conditioning and self.unet.get("addition_embed_type") not in (None, "text_time"):
            raise ValueError(f"micro_conditioning uses addition_embed_type='text_time', but the U-Net config sets "
                             f"{self.unet['addition_embed_type']!r}")

    @property
    def family(self) -> str:
        return "diffusers"

    def with_overrides(self, **overrides) -> "DiffusersUNetConfig":
        """Own fields set directly; any other key is a UNet2DConditionModel argument (ValueError if it is not one)."""
        own = {k: v for k, v in overrides.items() if k in OWN_FIELDS}
        rest = {k: v for k, v in overrides.items() if k not in OWN_FIELDS}
        if "cross_attention_dim" in rest:
            own["context_dim"] = rest.pop("cross_attention_dim")
        unknown = set(rest) - unet_arguments()
        if unknown:
            raise ValueError(f"unknown U-Net config keys {sorted(unknown)}; allowed: {', '.join(OWN_FIELDS)} and "
                             f"UNet2DConditionModel's arguments (block_out_channels, attention_head_dim, ...)")
        fields = {k: getattr(self, k) for k in OWN_FIELDS}
        return DiffusersUNetConfig(**{**fields, **own}, unet={**self.unet, **rest})

    def unet_kwargs(self) -> dict:
        out = {**self.unet, "in_channels": self.in_channels, "out_channels": self.out_channels or self.in_channels,
               "cross_attention_dim": self.context_dim}
        if self.micro_conditioning:
            out.update(addition_embed_type="text_time", addition_time_embed_dim=MICRO_DIM,
                       projection_class_embeddings_input_dim=MICRO * MICRO_DIM)
        return out

    @classmethod
    def from_diffusers(cls, config: dict, **own) -> "DiffusersUNetConfig":
        """From a UNet2DConditionModel's config.json (private ``_keys`` dropped)."""
        known = unet_arguments()
        unet = {k: v for k, v in config.items() if not k.startswith("_") and k in known}
        ins, outs, ctx = unet.pop("in_channels", 4), unet.pop("out_channels", None), unet.pop("cross_attention_dim", 768)
        if isinstance(ctx, (list, tuple)):
            raise ValueError("per-block cross_attention_dim is not supported (Stable Diffusion uses one width)")
        return cls(in_channels=ins, out_channels=outs, context_dim=ctx, unet=unet, **own)


class DiffusersUNet(nn.Module):
    """ε_θ(x_t, t, y) through diffusers' ``UNet2DConditionModel``: ``forward(x (B, C, h, w), t (B,), cond)``."""

    def __init__(self, cfg: DiffusersUNetConfig):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.cfg = cfg
        self.unet = UNet2DConditionModel(**cfg.unet_kwargs())
        if cfg.micro_conditioning:  # zero last layer: Stable Diffusion's weights given it start as they were
            nn.init.zeros_(self.unet.add_embedding.linear_2.weight)
            nn.init.zeros_(self.unet.add_embedding.linear_2.bias)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self._backend: tuple[str, str] | None = None  # (device type, backend) the processors were set for

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        return {k.removeprefix("unet."): v for k, v in self.state_dict().items()}

    def load_diffusers_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights in diffusers' key names (a pipeline's unet/); every tensor must fit."""
        missing, unexpected = self.unet.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"the U-Net weights do not fit this architecture: {len(missing)} missing (e.g. "
                             f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")

    def _use_backend(self, device: torch.device):
        """Diffusers' attention processors for ``attention_backend`` (the own U-Net's choice rules: xformers on CUDA
        when installed and working under ``auto``, else PyTorch SDPA), set once per device type."""
        if torch.compiler.is_compiling() or (self._backend and self._backend[0] == device.type):
            return
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        backend = select_backend(self.cfg.attention_backend, device)
        if backend == "xformers":
            self.unet.enable_xformers_memory_efficient_attention()
        else:
            self.unet.set_attn_processor(AttnProcessor() if backend == "math" else AttnProcessor2_0())
        self._backend = (device.type, backend)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        if cond is None:
            raise ValueError("the diffusers U-Net needs caption tokens (the empty caption's for unconditional use)")
        if x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected {self.cfg.in_channels} input channels, got {x.shape[1]}")
        self._use_backend(x.device)
        # autocast runs the projections in its own dtype; outside it (DeepSpeed's bf16 weights) the tokens follow x
        ctx_dtype = autocast_dtype(x)
        added = None
        if self.cfg.micro_conditioning:  # text_time: the six numbers' embeddings (SDXL's time_ids), no pooled text
            micro = cond.get("micro")
            if micro is None:
                micro = torch.zeros(len(x), MICRO, device=x.device)
            if micro.shape != (len(x), MICRO):
                raise ValueError(f"cond['micro'] must be (batch, {MICRO}); got {tuple(micro.shape)}")
            added = {"time_ids": micro.float(), "text_embeds": micro.new_zeros(len(x), 0, dtype=ctx_dtype)}
        return self.unet(x, t, encoder_hidden_states=cond["tokens"].to(ctx_dtype), added_cond_kwargs=added,
                         return_dict=False)[0]
