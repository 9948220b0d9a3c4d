"""The frozen VAE between pixels and the latent space the U-Net is trained in (latent diffusion: Rombach et al. 2022).

    vae = load_autoencoder(AutoencoderConfig(path="weights/sdxl-vae"), device)
    z = vae.encode(x)   # (B, 3, H, W) in [-1, 1] → (B, C, H/f, W/f): (μ − shift) · scale
    x = vae.decode(z)   # (B, C, H/f, W/f) → (B, 3, H, W) in [-1, 1] (not clamped)

Diffusers' ``AutoencoderKL`` is loaded from local files only: a ``save_pretrained`` folder (``config.json`` +
weights; a pipeline folder's ``vae/`` is found too) or a single ``.safetensors`` file (diffusers' or the original
LDM key names), whose architecture comes from ``autoencoder.config``: a local folder / config.json, or one of the
shipped families below (SD 1.x/2.x and SDXL: 4 latent channels; SD3 and FLUX: 16, with a shift).

Encoding returns the **posterior mean**, not a sample. The posterior's standard deviation of these VAEs is tiny next
to the latents' spread (the diffusion noise swamps it at every t ≥ 1), and the mean makes a latent a pure function of
the image: precomputed shards equal live encoding, and exact resume stays exact. ``scaling_factor`` brings the
latents to about unit variance (the noise schedule assumes it); ``shift_factor`` (SD3/FLUX) centres them first.

Precision: ``auto`` runs the VAE in bf16 on a GPU that has it and in fp32 elsewhere. fp16 only when asked: SD-XL's
VAE (and others whose config says ``force_upcast``) overflows in fp16 and decodes to NaN, which is reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_SD_BLOCKS = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
              "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
              "in_channels": 3, "out_channels": 3, "act_fn": "silu", "_class_name": "AutoencoderKL"}
# Architectures of the VAEs people use, for single-file checkpoints (values from each model's published config.json).
FAMILIES: dict[str, dict] = {
    "sd": {**_SD_BLOCKS, "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215},  # SD 1.x / 2.x
    "sdxl": {**_SD_BLOCKS, "latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    "sd3": {**_SD_BLOCKS, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
            "use_quant_conv": False, "use_post_quant_conv": False},
    "flux": {**_SD_BLOCKS, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611,
             "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False},
}


@dataclass
class AutoencoderConfig:
    """The autoencoder section of a run's config."""

    path: str | None = None  # a VAE folder (save_pretrained) or a .safetensors file; null = pixel space
    config: str | None = None  # single file only: sd | sdxl | sd3 | flux, or a local folder / config.json
    scaling_factor: float | None = None  # null = the VAE config's
    shift_factor: float | None = None  # null = the VAE config's (0 when it has none)
    dtype: str = "auto"  # auto (bf16 on a GPU that supports it, else fp32) | fp32 | bf16 | fp16
    max_batch: int = 8  # images per VAE call (slicing: bounds its memory whatever the batch size)
    tiling: bool = False  # decode/encode big images tile by tile (diffusers' tiled VAE; 1024 px on small GPUs)

    def validate(self):
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"autoencoder.dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        if self.max_batch < 1:
            raise ValueError("autoencoder.max_batch must be ≥ 1")
        if self.scaling_factor is not None and self.scaling_factor <= 0:
            raise ValueError(f"autoencoder.scaling_factor must be > 0, got {self.scaling_factor}")


class FrozenVAE(nn.Module):
    """An ``AutoencoderKL`` with its scale and shift, frozen (no gradients, always in eval mode)."""

    def __init__(self, vae, cfg: AutoencoderConfig, source: str):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        c = vae.config
        self.channels = int(c.latent_channels)
        self.factor = 2 ** (len(c.block_out_channels) - 1)  # pixels per latent, per side
        self.scale = float(cfg.scaling_factor if cfg.scaling_factor is not None else c.scaling_factor)
        shift = cfg.shift_factor if cfg.shift_factor is not None else getattr(c, "shift_factor", None)
        self.shift = float(shift or 0.0)
        # Per-channel statistics (diffusers' latents_mean / latents_std, as SDXL-era configs carry them): the latents
        # are standardised channel by channel, (μ − mean_c)·scale/std_c; None: one scale (and shift) for all channels
        mean, std = getattr(c, "latents_mean", None), getattr(c, "latents_std", None)
        if (mean is None) != (std is None) or mean is not None and not len(mean) == len(std) == self.channels:
            raise ValueError(f"the VAE config's latents_mean / latents_std must both hold {self.channels} values")
        self.register_buffer("latents_mean", None if mean is None else
                             torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("latents_std", None if std is None else
                             torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.max_batch, self.source = cfg.max_batch, source
        self.force_upcast = bool(getattr(c, "force_upcast", False))
        self.fingerprint = weights_fingerprint(self.vae)
        if cfg.tiling:
            self.vae.enable_tiling()

    def train(self, mode: bool = True):  # frozen: stays in eval mode
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _apply(self, fn, recurse=True):  # .to(dtype) must not make the statistics bf16: they stay float32
        super()._apply(fn, recurse)
        for name in ("latents_mean", "latents_std"):
            buf = getattr(self, name)
            if buf is not None and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    def identity(self) -> dict:
        """What latents made by this VAE depend on (compared with a latent shard's manifest)."""
        out = {"fingerprint": self.fingerprint, "scaling_factor": self.scale, "shift_factor": self.shift,
               "latent_channels": self.channels, "factor": self.factor}
        if self.latents_mean is not None:  # (older manifests lack these keys: only checked when present)
            out["latents_mean"] = [round(float(v), 6) for v in self.latents_mean.flatten()]
            out["latents_std"] = [round(float(v), 6) for v in self.latents_std.flatten()]
        return out

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → scaled posterior means (B, C, H/f, W/f), float32."""
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"images of {tuple(x.shape[-2:])} px do not divide by the VAE's factor {self.factor}")
        with torch.autocast(x.device.type, enabled=False):  # its own dtype, whatever autocast the caller runs under
            out = [self.vae.encode(c.to(self.dtype)).latent_dist.mean.float() for c in x.split(self.max_batch)]
        if self.latents_mean is not None:
            return (torch.cat(out) - self.latents_mean) * self.scale / self.latents_std
        return (torch.cat(out) - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) → images (B, 3, h·f, w·f), float32, about [-1, 1]."""
        z = z.float() * self.latents_std / self.scale + self.latents_mean if self.latents_mean is not None else \
            z.float() / self.scale + self.shift
        with torch.autocast(z.device.type, enabled=False):  # sample.py --precision fp16 must not make SDXL's VAE fp16
            out = torch.cat([self.vae.decode(c.to(self.dtype)).sample.float() for c in z.split(self.max_batch)])
        if not torch.isfinite(out).all():
            hint = " (this VAE overflows in fp16: set autoencoder.dtype=bf16 or fp32)" if self.dtype == torch.float16 \
                else ""
            raise FloatingPointError(f"the VAE decoded non-finite pixels{hint}")
        return out


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 (16 hex digits) of a module's weights, by name, in float32: the same VAE gives the same print
    whatever file format or device it came from (~1 s per GB)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_dtype(name: str, device) -> torch.dtype:
    device = torch.device(device)
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return DTYPES[name]


def _family_config(name: str | None, path: Path) -> dict:
    if name is None:
        raise ValueError(f"autoencoder.path={str(path)!r} is a single file: say which VAE it is with autoencoder.config "
                         f"= one of {', '.join(FAMILIES)}, or a local folder / config.json describing it")
    if name in FAMILIES:
        return FAMILIES[name]
    given = Path(name).expanduser()
    file = given / "config.json" if given.is_dir() else given
    if not file.is_file():
        raise FileNotFoundError(f"autoencoder.config={name!r} is neither a shipped family ({', '.join(FAMILIES)}) nor "
                                f"a local folder / config.json")
    return json.loads(file.read_text())


def load_autoencoder(cfg: AutoencoderConfig, device="cpu") -> FrozenVAE | None:
    """The frozen VAE of ``cfg`` on ``device`` (None in pixel space). Nothing is downloaded; a path that is not a VAE
    is a ValueError that says what was expected."""
    if cfg.path is None:
        return None
    from diffusers import AutoencoderKL

    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"autoencoder.path={cfg.path!r} does not exist (give a VAE folder saved by diffusers' "
                                f"save_pretrained, or a .safetensors file with autoencoder.config)")
    try:
        if path.is_dir():
            if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
                path = path / "vae"  # a whole diffusers pipeline folder
            if not (path / "config.json").is_file():
                raise ValueError("the folder has no config.json")
            kind = json.loads((path / "config.json").read_text()).get("_class_name")
            if kind != "AutoencoderKL":
                raise ValueError(f"its config.json describes a {kind or 'non-diffusers model'}, not an AutoencoderKL")
            vae, info = AutoencoderKL.from_pretrained(path, local_files_only=True, output_loading_info=True)
            if info["missing_keys"] or info["mismatched_keys"]:
                raise ValueError(f"its weights miss {len(info['missing_keys'])} and mismatch "
                                 f"{len(info['mismatched_keys'])} of the VAE's tensors, e.g. "
                                 f"{(info['missing_keys'] + info['mismatched_keys'])[:2]}")
        else:
            from .stable_diffusion import SDError, VAE_PREFIX, checkpoint_keys, read_checkpoint

            if path.suffix not in (".safetensors", ".ckpt"):
                raise ValueError("a single-file VAE must be .safetensors, or .ckpt (read with weights_only=True)")
            config = _family_config(cfg.config, path)
            try:  # a whole Stable Diffusion checkpoint: only its first_stage_model.* tensors are read
                whole = any(k.startswith(VAE_PREFIX) for k in checkpoint_keys(path))
                state = read_checkpoint(path, (VAE_PREFIX,) if whole else ())
            except SDError as e:
                raise ValueError(str(e)) from None
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "config.json").write_text(json.dumps(config))
                vae = AutoencoderKL.from_single_file(state, config=tmp, local_files_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 — diffusers raises many kinds for a file that is not a VAE
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(f"autoencoder.path={cfg.path!r} is not a usable VAE: {first}") from None
    dtype = resolve_dtype(cfg.dtype, device)
    frozen = FrozenVAE(vae, cfg, str(path)).to(device=device, dtype=dtype)
    if dtype == torch.float16 and frozen.force_upcast:
        log.warning("autoencoder.dtype=fp16 for a VAE whose config says force_upcast (SD-XL's overflows in fp16 and "
                    "decodes to NaN): bf16 or fp32 is safer")
    log.info("VAE %s: %d latent channels, %d× per side, scale %g, shift %g, %s", path, frozen.channels, frozen.factor,
             frozen.scale, frozen.shift, str(dtype).replace("torch.", ""))
    return frozen
