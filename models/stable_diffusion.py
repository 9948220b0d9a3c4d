"""Stable Diffusion checkpoints in and out, offline: diffusers pipeline folders and single files in the original
latent-diffusion (LDM) key layout, SD 1.x and 2.x (Rombach et al. 2022).

In: ``open_sd(PATH)`` reads

* a diffusers pipeline folder (``model_index.json``; ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``), or
* a single ``.safetensors`` / ``.ckpt`` file in the LDM layout (``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.*``: what model hubs, ComfyUI and AUTOMATIC1111 use). ``.ckpt`` files are read with
  ``torch.load(weights_only=True)``: one that needs arbitrary unpickling is refused. The architecture of each part
  comes from a local config: SD 1.x's or SD 2.x's own (shipped here, chosen from the file's keys), or a folder laid
  out like a pipeline's (``model.pretrained_config``). Converted with diffusers' own LDM converters; nothing is
  downloaded.

Out: ``to_single_file`` writes the LDM layout from diffusers-format weights (the inverse of those converters, tested
against them); ``pipeline/export.py`` writes pipeline folders with diffusers' ``save_pretrained``.

SD 2.x's text encoder is OpenCLIP ViT-H's text tower read at its penultimate layer: the diffusers-format
``CLIPTextModel`` simply has 23 of its 24 layers (the last one is never used), and single files are converted so.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

log = logging.getLogger(__name__)
INDEX = "model_index.json"
SINGLE_FILE = (".safetensors", ".ckpt")
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
SD1_TEXT_PREFIX, SD2_TEXT_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."
VERSIONS = ("sd1", "sd2")

# The text towers' configs (openai/clip-vit-large-patch14 for SD 1.x; SD 2.x's text_encoder/config.json).
TEXT_CONFIGS = {
    "sd1": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
    "sd2": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
            "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 512,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
}
TOKENIZER_PAD = {"sd1": "<|endoftext|>", "sd2": "!"}  # SD 2.x pads with "!" (token 0), as OpenCLIP does
# The noise schedule SD 1.x and 2.x were trained with (Rombach et al. 2022); 2.x's 768 px models predict v instead.
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
BETAS = {"scaled_linear": (0.00085, 0.012), "linear": (0.0001, 0.02)}  # our schedules' end points at T = 1000
SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}


class SDError(ValueError):
    """A Stable Diffusion folder or file that cannot be used (said in one line, with what to do)."""


def is_sd_source(path: str | Path | None) -> bool:
    """A pipeline folder or a single checkpoint file (what ``model.pretrained`` takes)."""
    if not path:
        return False
    p = Path(path).expanduser()
    return (p / INDEX).is_file() or (p.suffix in SINGLE_FILE and p.is_file())


# --- reading ---------------------------------------------------------------------------------------------------

def read_checkpoint(path: Path, prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a single file whose keys start with one of ``prefixes`` (all when empty). ``.safetensors`` is
    read lazily (only those keys); ``.ckpt`` with ``weights_only=True`` (memory-mapped), its ``state_dict`` entry."""
    keep = (lambda k: k.startswith(prefixes)) if prefixes else (lambda k: True)  # noqa: E731
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if keep(k)}
        except (SafetensorError, OSError) as e:
            raise SDError(f"{path} is not a readable .safetensors file ({e})") from None
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise SDError(f"{path} needs unsafe unpickling to load (it stores Python objects, not only tensors), which "
                      f"this project never does: convert it to .safetensors with a tool you trust, or use the "
                      f"diffusers folder of the same model") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise SDError(f"{path} is not a readable checkpoint ({str(e).splitlines()[0] if str(e) else e})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise SDError(f"{path} holds no state dict")
    return {k: v for k, v in state.items() if torch.is_tensor(v) and keep(k)}


def checkpoint_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise SDError(f"{path} is not a readable .safetensors file ({e})") from None
    return list(read_checkpoint(path))


def detect_version(keys) -> str:
    """sd1 | sd2 from a single file's text-encoder keys; SDXL and files without a text encoder are refused."""
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise SDError("this is an SDXL checkpoint (two text encoders): not supported yet; SD 1.x and 2.x are")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise SDError(f"no Stable Diffusion U-Net in it (no {UNET_PREFIX}* keys): not a full SD 1.x/2.x checkpoint")
    if any(k.startswith(SD2_TEXT_PREFIX) for k in keys):
        return "sd2"
    if any(k.startswith(SD1_TEXT_PREFIX) for k in keys):
        return "sd1"
    raise SDError("no text encoder in it (no cond_stage_model.* keys): not a full SD 1.x/2.x checkpoint")


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """CLIP's BPE tokenizer as transformers' ``CLIPTokenizer``, made offline from the vocabulary OpenCLIP ships (the
    same byte-pair merges as openai/clip-vit-large-patch14's)."""
    import open_clip
    from transformers import CLIPTokenizer

    tok = open_clip.get_tokenizer("ViT-L-14")
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(k, k): v for k, v in tok.encoder.items()}
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), pad_token=pad_token,
                             model_max_length=77)


def diffusion_settings(scheduler: dict) -> dict:
    """A diffusers scheduler config → this project's diffusion settings (num_steps, schedule, prediction,
    zero_terminal_snr). Schedules this project cannot reproduce exactly are refused."""
    name = scheduler.get("beta_schedule", "linear")
    if scheduler.get("trained_betas") is not None:
        raise SDError("the scheduler has explicit trained_betas: not supported (scaled_linear, linear, "
                      "squaredcos_cap_v2 are)")
    if name not in SCHEDULES:
        raise SDError(f"the scheduler's beta_schedule {name!r} is not supported ({', '.join(SCHEDULES)} are)")
    steps = int(scheduler.get("num_train_timesteps", 1000))
    if name in BETAS:
        want = BETAS[name] if name == "scaled_linear" else tuple(b * 1000 / steps for b in BETAS[name])
        have = (scheduler.get("beta_start", 0.0001), scheduler.get("beta_end", 0.02))
        if any(abs(a - b) > 1e-9 for a, b in zip(have, want)):
            raise SDError(f"the scheduler's {name} betas run from {have[0]} to {have[1]}; this project's {name} "
                          f"schedule runs from {want[0]:g} to {want[1]:g}: not supported")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise SDError(f"the scheduler's prediction_type {prediction!r} is not supported ({', '.join(PREDICTIONS)})")
    return {"num_steps": steps, "schedule": SCHEDULES[name], "prediction": PREDICTIONS[prediction],
            "zero_terminal_snr": bool(scheduler.get("rescale_betas_zero_snr", False))}


def scheduler_config(diffusion_cfg) -> dict:
    """The DDIMScheduler config that samples like this project's DDIM (``sample.py --sampler ddim --spacing sd``):
    the schedule and prediction trained with, leading timesteps with SD's offset of 1 (which StableDiffusionPipeline
    imposes), the last step to ᾱ = 1 (``set_alpha_to_one``)."""
    name = {v: k for k, v in SCHEDULES.items()}[diffusion_cfg.schedule]
    out = {"_class_name": "DDIMScheduler", "num_train_timesteps": diffusion_cfg.num_steps, "beta_schedule": name,
           "prediction_type": {v: k for k, v in PREDICTIONS.items()}[diffusion_cfg.prediction],
           "rescale_betas_zero_snr": diffusion_cfg.zero_terminal_snr, "clip_sample": False, "set_alpha_to_one": True,
           "steps_offset": 1, "timestep_spacing": "leading"}
    if name in BETAS:
        scale = 1.0 if name == "scaled_linear" else 1000 / diffusion_cfg.num_steps
        out["beta_start"], out["beta_end"] = (b * scale for b in BETAS[name])
    return out


@dataclass
class SDSource:
    """A Stable Diffusion pipeline folder or single file, and where the configs of its parts come from."""

    path: Path
    config_dir: Path | None = None  # single files: a local folder laid out like a pipeline's (configs only)

    @cached_property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    @cached_property
    def version(self) -> str | None:
        """sd1 | sd2 for single files (from the keys); None for folders (their configs say everything)."""
        return None if self.is_folder else detect_version(checkpoint_keys(self.path))

    def _config(self, part: str, name: str = "config.json") -> dict | None:
        """A part's config from the folder (or config_dir for a single file); None when there is none."""
        base = self.path if self.is_folder else self.config_dir
        if base is None:
            return None
        file = base / part / name
        if not file.is_file():
            if self.is_folder:
                raise SDError(f"{self.path} has no {part}/{name}: not a complete Stable Diffusion pipeline folder")
            return None
        return json.loads(file.read_text())

    def unet_config(self) -> dict:
        from .diffusers_unet import SD1_UNET, SD2_UNET

        given = self._config("unet")
        if given is not None:
            return given
        base = SD2_UNET if self.version == "sd2" else SD1_UNET
        return {**base, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 1024 if self.version == "sd2"
                else 768}

    def scheduler(self) -> dict | None:
        """The scheduler config; None for a single file without one (its prediction type is not in the weights)."""
        given = self._config("scheduler", "scheduler_config.json")
        if given is not None:
            return given
        return {**SD_SCHEDULE, "prediction_type": "epsilon"} if self.version == "sd1" else None

    def unet_state(self) -> dict[str, torch.Tensor]:
        """The U-Net's weights in diffusers' key names."""
        if self.is_folder:
            from diffusers import UNet2DConditionModel

            return _from_pretrained(UNet2DConditionModel, self.path, "unet").state_dict()
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        return convert_ldm_unet_checkpoint(read_checkpoint(self.path, (UNET_PREFIX,)), self.unet_config())

    def vae_config(self) -> dict:
        from .autoencoder import FAMILIES

        given = self._config("vae")
        return given if given is not None else dict(FAMILIES["sd"])

    def text_encoder(self):
        """(transformers CLIPTextModel, CLIPTokenizer), frozen parts of the pipeline."""
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        if self.is_folder:
            for part in ("text_encoder", "tokenizer"):
                if not (self.path / part).is_dir():
                    raise SDError(f"{self.path} has no {part}/: not a complete Stable Diffusion pipeline folder")
            model = _from_pretrained(CLIPTextModel, self.path, "text_encoder")
            return model, CLIPTokenizer.from_pretrained(self.path / "tokenizer", local_files_only=True)
        fields = self._config("text_encoder") or TEXT_CONFIGS[self.version]
        config = CLIPTextConfig(**{k: v for k, v in fields.items() if not k.startswith("_")})
        tokenizer_dir = self.config_dir / "tokenizer" if self.config_dir is not None else None
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True) if tokenizer_dir and \
            tokenizer_dir.is_dir() else clip_tokenizer(TOKENIZER_PAD[self.version])
        model = CLIPTextModel(config)
        prefix = SD2_TEXT_PREFIX if self.version == "sd2" else SD1_TEXT_PREFIX
        state = text_from_ldm(read_checkpoint(self.path, (prefix,)), model, self.version)
        missing, _ = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing:
            raise SDError(f"{self.path}: its text encoder does not fit the config ({len(missing)} tensors missing, "
                          f"e.g. {missing[:2]}); give model.pretrained_config with the right text_encoder/config.json")
        return model.eval(), tokenizer


def _from_pretrained(cls, folder: Path, part: str):
    """A part of a pipeline folder; its fp16 variant when that is all the folder has."""
    if not (folder / part).is_dir():
        raise SDError(f"{folder} has no {part}/: not a complete Stable Diffusion pipeline folder")
    try:
        return cls.from_pretrained(folder, subfolder=part, local_files_only=True)
    except (OSError, EnvironmentError) as first:
        try:
            return cls.from_pretrained(folder, subfolder=part, local_files_only=True, variant="fp16")
        except (OSError, EnvironmentError):
            raise SDError(f"{folder / part} cannot be loaded: {str(first).splitlines()[0]}") from None


def open_sd(path: str | Path, config_dir: str | Path | None = None) -> SDSource:
    """A Stable Diffusion source, checked: a pipeline folder with a U-Net (SDXL refused) or a single SD 1.x/2.x file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SDError(f"model.pretrained={str(path)!r} does not exist (give a diffusers Stable Diffusion folder, or "
                      f"a .safetensors / .ckpt file)")
    cdir = Path(config_dir).expanduser() if config_dir else None
    if cdir is not None and not cdir.is_dir():
        raise SDError(f"model.pretrained_config={str(config_dir)!r} is not a folder (a pipeline-like folder of "
                      f"configs: unet/config.json, vae/config.json, text_encoder/config.json, scheduler/)")
    if p.is_dir():
        if not (p / INDEX).is_file():
            raise SDError(f"{p} has no {INDEX}: not a diffusers pipeline folder (a single file must be .safetensors "
                          f"or .ckpt)")
        index = json.loads((p / INDEX).read_text())
        cls = str(index.get("_class_name", ""))
        if "XL" in cls or "text_encoder_2" in index:
            raise SDError(f"{p} is an SDXL pipeline ({cls or 'two text encoders'}): not supported yet; "
                          f"SD 1.x and 2.x are")
        if "unet" not in index or not (p / "unet").is_dir():
            raise SDError(f"{p} has no unet/ (a {cls or 'pipeline'} without a U-Net): fine-tuning needs a Stable "
                          f"Diffusion 1.x/2.x pipeline folder")
        for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
            if not (p / part).is_dir():
                raise SDError(f"{p} has no {part}/: not a complete Stable Diffusion pipeline folder")
        return SDSource(p)
    if p.suffix not in SINGLE_FILE:
        raise SDError(f"{p}: a single-file checkpoint must be .safetensors or .ckpt")
    src = SDSource(p, cdir)
    src.version  # noqa: B018 — reads the keys now: a file that is not SD 1.x/2.x fails here
    return src


# --- the LDM layout, written -----------------------------------------------------------------------------------

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers U-Net weights → the LDM ``UNetModel`` names (without ``model.diffusion_model.``): the inverse of
    diffusers' ``convert_ldm_unet_checkpoint``. Down block b, layer l is input block 1 + b(L+1) + l (its
    downsampler the block's last, L); up block b, layer l is output block b(L+1) + l, whose upsampler follows the
    attention when there is one."""
    per = config["layers_per_block"] + 1
    with_attention = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        top = ".".join(parts[:-1])
        if top in _UNET_TOP:
            out[f"{_UNET_TOP[top]}.{parts[-1]}"] = value
            continue
        head, rest = parts[0], parts[1:]
        if head == "down_blocks":
            b, kind, j, tail = int(rest[0]), rest[1], int(rest[2]), ".".join(rest[3:])
            if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.w → input_blocks.i.0.op.w
                name = f"input_blocks.{1 + b * per + per - 1}.0.op.{tail.removeprefix('conv.')}"
            else:
                sub = 0 if kind == "resnets" else 1
                name = f"input_blocks.{1 + b * per + j}.{sub}.{_resnet(tail) if sub == 0 else tail}"
        elif head == "mid_block":
            kind, j, tail = rest[0], int(rest[1]), ".".join(rest[2:])
            name = f"middle_block.{2 * j}.{_resnet(tail)}" if kind == "resnets" else f"middle_block.1.{tail}"
        elif head == "up_blocks":
            b, kind, j, tail = int(rest[0]), rest[1], int(rest[2]), ".".join(rest[3:])
            if kind == "upsamplers":
                name = f"output_blocks.{b * per + per - 1}.{2 if b in with_attention else 1}.{tail}"
            else:
                sub = 0 if kind == "resnets" else 1
                name = f"output_blocks.{b * per + j}.{sub}.{_resnet(tail) if sub == 0 else tail}"
        else:
            raise SDError(f"U-Net weight {key!r} has no place in the Stable Diffusion layout (an architecture "
                          f"other than SD 1.x/2.x's)")
        out[name] = value
    return out


def _resnet(tail: str) -> str:
    for new, old in _RESNET:
        if tail.startswith(new + "."):
            return old + tail[len(new):]
    return tail


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL weights → LDM names (without ``first_stage_model.``): the inverse of diffusers'
    ``convert_ldm_vae_checkpoint``. The decoder's up blocks run in the opposite order; the mid-block attention's
    linear layers are 1×1 convolutions there."""
    n_up = len(config["up_block_types"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        side, _, rest = name.partition(".")
        if rest.startswith("down_blocks."):
            _, i, kind, j, tail = rest.split(".", 4)
            rest = f"down.{i}.downsample.{tail}" if kind == "downsamplers" else f"down.{i}.block.{j}.{tail}"
        elif rest.startswith("up_blocks."):
            _, i, kind, j, tail = rest.split(".", 4)
            i = n_up - 1 - int(i)
            rest = f"up.{i}.upsample.{tail}" if kind == "upsamplers" else f"up.{i}.block.{j}.{tail}"
        elif rest.startswith("mid_block.resnets."):
            _, _, j, tail = rest.split(".", 3)
            rest = f"mid.block_{int(j) + 1}.{tail}"
        elif rest.startswith("mid_block.attentions.0."):
            tail = rest.removeprefix("mid_block.attentions.0.")
            module, _, param = tail.rpartition(".")
            rest = f"mid.attn_1.{attn[module]}.{param}"
            if param == "weight" and module != "group_norm":
                value = value[:, :, None, None]  # linear → 1×1 conv
        out[f"{side}.{rest}" if rest else side] = value
    return out


def text_to_ldm(state: dict[str, torch.Tensor], version: str) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel weights → the LDM text encoder's names (with their prefix): SD 1.x keeps
    transformers' names under ``cond_stage_model.transformer.text_model.``; SD 2.x is OpenCLIP's layout (q, k, v in
    one ``in_proj``), the inverse of diffusers' ``convert_open_clip_checkpoint``."""
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    if version == "sd1":
        return {f"{SD1_TEXT_PREFIX}text_model.{k}": v for k, v in state.items()}
    out = {}
    renames = [("encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
               (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."), (".self_attn.", ".attn.")]
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.split(".")[-1]] = value
        elif key.startswith("encoder.layers."):
            for new, old in renames:
                key = key.replace(new, old)
            if any(f".attn.{p}_proj." in key for p in "qkv"):
                head, proj, param = key.rsplit(".", 2)  # ….attn, q_proj, weight
                fused.setdefault(f"{head}.in_proj_{param}", {})[proj[0]] = value
            else:
                out[key] = value
        else:
            raise SDError(f"text-encoder weight {key!r} has no place in SD 2.x's OpenCLIP layout")
    for key, qkv in fused.items():
        out[key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return {SD2_TEXT_PREFIX + k: v for k, v in out.items()}


def text_from_ldm(state: dict[str, torch.Tensor], model, version: str) -> dict[str, torch.Tensor]:
    """The LDM text encoder → the keys of ``model`` (a CLIPTextModel, flattened or not), through diffusers'
    converters; OpenCLIP layers beyond the model's (SD 2.x's unused last one) and its projection are dropped."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if version == "sd1":
        converted = convert_ldm_clip_checkpoint(state)
    else:
        converted = convert_open_clip_checkpoint(model, state, prefix=SD2_TEXT_PREFIX)
    wanted = set(model.state_dict())
    flat = not any(k.startswith("text_model.") for k in wanted)
    converted = {(k.removeprefix("text_model.") if flat else k): v for k, v in converted.items()}
    return {k: v for k, v in converted.items() if k in wanted}


def to_single_file(unet_state: dict, unet_config: dict, vae_state: dict, vae_config: dict, text_state: dict,
                   version: str) -> dict[str, torch.Tensor]:
    """One LDM-layout state dict (what ComfyUI and AUTOMATIC1111 load) from diffusers-format parts."""
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet_state, unet_config).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae_state, vae_config).items()})
    out.update(text_to_ldm(text_state, version))
    return out
