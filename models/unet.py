"""A text-conditioned U-Net ε_θ(x_t, t, y) (GLIDE / Imagen / Stable Diffusion recipe; improved-diffusion's blocks).

Residual blocks with adaptive scale-shift GroupNorm driven by the timestep embedding (+ the pooled caption
embedding), self-attention and cross-attention to the caption tokens at chosen levels, skip connections between
the down and up paths, zero-initialised output layers. The network maps (x_t, t, text conditioning) to a
prediction and nothing else: no diffusion math, no distributed code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention, autocast_dtype
from .layers import UpsampleConv, is_channels_last
from .norm_act import group_norm_silu


@dataclass
class UNetConfig:
    """The model section of a run's config (see ``models.registry`` for the named sizes)."""

    in_channels: int = 3  # 3 for pixels, 4 for SD-style latents
    out_channels: int | None = None  # default: in_channels
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)  # one entry per resolution level
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1, 2, 3)  # levels (0 = full resolution) with self- and cross-attention
    head_channels: int = 64  # channels per attention head
    dropout: float = 0.0
    context_dim: int = 512  # width of the text encoder's token embeddings
    pooled_dim: int | None = 512  # width of the pooled caption embedding (None: not used)
    gradient_checkpointing: bool = False
    attention_backend: str = "auto"  # auto | sdpa | xformers | math
    # SDXL's size and crop conditioning (Podell et al. 2023): cond["micro"] (B, 6) = original (h, w), crop (top,
    # left), target (h, w) in pixels, each number's sinusoidal embedding through an MLP added to the timestep's
    micro_conditioning: bool = False

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        bad = [lv for lv in self.attention_levels if not 0 <= lv < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range: levels are 0..{len(self.channel_mult) - 1}")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps t (B,) → (B, dim) (Vaswani et al. 2017; DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=1)
    return F.pad(emb, (0, dim % 2))


MICRO = 6  # numbers of the size and crop conditioning


def micro_embedding(cond: dict | None, x: torch.Tensor, dim: int) -> torch.Tensor:
    """cond["micro"] (B, 6) pixels → (B, 6·dim): each number's sinusoidal embedding, as SDXL embeds its size and
    crop conditioning. Absent (unconditional, or dropped): zeros, the null conditioning caption dropout trains."""
    micro = cond.get("micro") if cond is not None else None
    if micro is None:
        micro = torch.zeros(len(x), MICRO, device=x.device)
    if micro.shape != (len(x), MICRO):
        raise ValueError(f"cond['micro'] must be (batch, {MICRO}) = original (h, w), crop (top, left), target (h, w); "
                         f"got {tuple(micro.shape)}")
    return timestep_embedding(micro.flatten(), dim).view(len(x), MICRO * dim)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch)  # 32 groups, or the most that divide ch (any base_channels works)


def _zero(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class ResBlock(nn.Module):
    """GN → SiLU → conv, then GN(h)·(1 + scale) + shift from the embedding → SiLU → dropout → conv (zero init).

    Each GN → (scale-shift) → SiLU is one memory-lean autograd node (``models.norm_act``)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.norm2 = _norm(cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # p = 0 would still store a mask
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb, ctx=None, mask=None):
        h = self.conv1(group_norm_silu(x, self.norm1))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        h = self.conv2(self.dropout(group_norm_silu(h, self.norm2, scale, shift)))
        return self.skip(x) + h


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H·W, C), a view (contiguous when x is channels_last)."""
    return x.flatten(2).transpose(1, 2)


class AttentionBlock(nn.Module):
    """Self-attention over the H·W positions, then cross-attention to the caption tokens (padding masked).

    GroupNorm on the image, then Linear projections on the (B, H·W, C) token view: one matrix multiply each,
    and no copy at all when the activations are channels_last."""

    def __init__(self, ch: int, context_dim: int, head_channels: int, backend: str):
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.backend = backend
        self.norm1, self.qkv, self.proj1 = _norm(ch), nn.Linear(ch, 3 * ch), _zero(nn.Linear(ch, ch))
        self.norm2, self.q, self.proj2 = _norm(ch), nn.Linear(ch, ch), _zero(nn.Linear(ch, ch))
        self.kv = nn.Linear(context_dim, 2 * ch)

    def _split(self, x):  # (B, L, C) → (B, heads, L, C/heads)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def _attend(self, q, k, v, mask, proj, like):  # → proj(attention) as an image shaped like `like`
        out = attention(self._split(q), self._split(k), self._split(v), mask=mask, backend=self.backend)
        out = proj(out.transpose(1, 2).flatten(2)).transpose(1, 2).reshape(like.shape)  # (B, C, H, W), channels_last
        fmt = torch.channels_last if is_channels_last(like) else torch.contiguous_format
        return out.contiguous(memory_format=fmt)  # keep the network in one layout (no copies later)

    def forward(self, x, emb=None, ctx=None, mask=None):
        q, k, v = self.qkv(_tokens(self.norm1(x))).chunk(3, dim=-1)  # (B, H·W, C) each
        h = x + self._attend(q, k, v, None, self.proj1, x)
        if ctx is not None:
            k, v = self.kv(ctx).chunk(2, dim=-1)  # (B, L_text, C) each
            h = h + self._attend(self.q(_tokens(self.norm2(h))), k, v, mask, self.proj2, x)
        return h


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None, ctx=None, mask=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = UpsampleConv(ch, ch)  # nearest 2× upsampling, then a 3×3 convolution (as one transposed conv)

    def forward(self, x, emb=None, ctx=None, mask=None):
        return self.conv(x)


class Stage(nn.ModuleList):
    """A sequence of blocks that all take (x, emb, ctx, mask)."""

    def forward(self, x, emb, ctx, mask, use_checkpoint=False):
        for block in self:
            if use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, emb, ctx, mask, use_reentrant=False)
            else:
                x = block(x, emb, ctx, mask)
        return x


class UNet(nn.Module):
    """ε_θ(x_t, t, y): ``forward(x (B, C, H, W), t (B,), cond)`` → (B, C_out, H, W).

    ``cond`` is None (unconditional) or a dict from a text encoder: ``tokens`` (B, L, context_dim),
    ``mask`` (B, L) bool (True = real token) and ``pooled`` (B, pooled_dim).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch0, emb_dim = cfg.base_channels, 4 * cfg.base_channels
        self.time_embed = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.pooled_embed = nn.Linear(cfg.pooled_dim, emb_dim) if cfg.pooled_dim else None
        self.micro_embed = None
        if cfg.micro_conditioning:  # last layer zero: a model given the conditioning starts as one without it
            self.micro_embed = nn.Sequential(nn.Linear(MICRO * ch0, emb_dim), nn.SiLU(),
                                             _zero(nn.Linear(emb_dim, emb_dim)))
        self.input_conv = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)

        def attn(ch):
            return AttentionBlock(ch, cfg.context_dim, cfg.head_channels, cfg.attention_backend)

        self.down, skips, ch = nn.ModuleList(), [ch0], ch0
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(ch, ch0 * mult, emb_dim, cfg.dropout)]
                ch = ch0 * mult
                if level in cfg.attention_levels:
                    blocks.append(attn(ch))
                self.down.append(Stage(blocks))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(Stage([Downsample(ch)]))
                skips.append(ch)
        self.middle = Stage([ResBlock(ch, ch, emb_dim, cfg.dropout), attn(ch), ResBlock(ch, ch, emb_dim, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(ch + skips.pop(), ch0 * mult, emb_dim, cfg.dropout)]
                ch = ch0 * mult
                if level in cfg.attention_levels:
                    blocks.append(attn(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    blocks.append(Upsample(ch))
                self.up.append(Stage(blocks))
        self.out_norm = _norm(ch)
        self.out_conv = _zero(nn.Conv2d(ch, cfg.out_channels or cfg.in_channels, 3, padding=1))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.cfg.channel_mult) - 1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        f = self.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} cannot be downsampled evenly by this U-Net: height and "
                             f"width must be multiples of {f} (2^(levels−1), levels = {len(self.cfg.channel_mult)})")
        if x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected {self.cfg.in_channels} input channels, got {x.shape[1]}")
        emb = self.time_embed(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))  # (B, 4·C0)
        ctx = mask = None
        if cond is not None:
            # once here, not in every attention block's key/value projection (autocast does not cache activations)
            ctx_dtype = autocast_dtype(x)
            ctx, mask = cond["tokens"].to(ctx_dtype), cond.get("mask")
            if self.pooled_embed is not None and cond.get("pooled") is not None:
                emb = emb + self.pooled_embed(cond["pooled"].to(x.dtype))
        if self.micro_embed is not None:
            emb = emb + self.micro_embed(micro_embedding(cond, x, self.cfg.base_channels).to(x.dtype))
        ckpt = self.cfg.gradient_checkpointing and self.training
        h, hs = self.input_conv(x), []
        hs.append(h)
        for stage in self.down:
            h = stage(h, emb, ctx, mask, ckpt)
            hs.append(h)
        h = self.middle(h, emb, ctx, mask, ckpt)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb, ctx, mask, ckpt)
        return self.out_conv(group_norm_silu(h, self.out_norm))
