"""Hand a trained model to other tools: a diffusers Stable Diffusion pipeline folder, or one ``.safetensors`` file in
the original latent-diffusion layout (the layout ComfyUI and AUTOMATIC1111 read; checked against diffusers' own
single-file reader).

    python pipeline/export.py --model runs/sd/model --format diffusers --out sd-finetuned/
    python pipeline/export.py --model runs/sd/model --format single-file --out sd-finetuned.safetensors [--dtype fp16]

The U-Net must be of the diffusers family (model.size=sd|sd2, or a run started from model.pretrained), with a VAE and
a Hugging Face CLIP text encoder: Stable Diffusion's parts. The EMA weights are exported (``--no-ema``: the raw ones),
with the frozen VAE and text encoder as they were trained with.

``diffusers``: ``StableDiffusionPipeline.from_pretrained(OUT)`` loads it offline. Its scheduler is a DDIMScheduler
with the training schedule and prediction type, set to sample exactly as this project's
``sample.py --sampler ddim --spacing sd`` does (SD's leading timesteps 1, k+1, …; the last step to ᾱ = 1); any
other diffusers scheduler can be swapped in with ``from_config``. ``single-file``: the U-Net under ``model.diffusion_model.``, the
VAE under ``first_stage_model.``, the text encoder under ``cond_stage_model.`` (SD 1.x: transformers' CLIP;
SD 2.x: OpenCLIP's layout); a v-prediction model also carries a ``v_pred`` marker tensor (``ztsnr`` for a
zero-terminal-SNR schedule), the file's metadata says the prediction type and schedule. The own U-Net has no Stable
Diffusion layout and is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

log = logging.getLogger("export")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported model folder (RUN/model)")
    p.add_argument("--format", required=True, choices=["diffusers", "single-file"],
                   help="diffusers: a StableDiffusionPipeline folder; single-file: one LDM-layout .safetensors")
    p.add_argument("--out", required=True, help="the folder (diffusers) or .safetensors file (single-file) to write")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="single-file: the tensors' precision")
    p.add_argument("--text-layout", choices=["auto", "sd1", "sd2"], default="auto",
                   help="single-file: the text encoder's layout (auto: SD 2.x's OpenCLIP layout for a gelu text "
                        "tower, as OpenCLIP ViT-H's; SD 1.x's for quick_gelu, as OpenAI CLIP's)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def sd_parts(model_dir: str, ema: bool):
    """(unet: DiffusersUNet, text encoder: HFCLIPTextEncoder, frozen VAE, diffusion config, meta) of an exported
    model, or a ValueError saying why it has no Stable Diffusion form."""
    from diffusion import DiffusionConfig
    from models.text_encoders import HFCLIPTextEncoder
    from pipeline.checkpoint import load_exported

    unet, encoder, _, vae, meta = load_exported(model_dir, "cpu", ema=ema)
    if meta.get("model_family", "unet") != "diffusers":
        raise ValueError(f"{model_dir} holds the project's own U-Net, which has no Stable Diffusion layout: train with "
                         f"model.size=sd or sd2 (diffusers' UNet2DConditionModel), or from model.pretrained")
    if vae is None:
        raise ValueError(f"{model_dir} is a pixel-space model: a Stable Diffusion pipeline needs a VAE")
    if not isinstance(encoder, HFCLIPTextEncoder):
        raise ValueError(f"{model_dir} uses an OpenCLIP text encoder: a Stable Diffusion pipeline needs transformers' "
                         f"CLIPTextModel (text_encoder.kind=hf_clip)")
    if unet.cfg.micro_conditioning:
        raise ValueError(f"{model_dir} was trained with size and crop conditioning (micro_conditioning), which "
                         f"StableDiffusionPipeline does not pass to its U-Net: sample it with pipeline/sample.py")
    if vae.shift or vae.latents_mean is not None:
        raise ValueError(f"{model_dir}'s VAE shifts its latents (shift_factor or per-channel latents_mean), which "
                         f"StableDiffusionPipeline does not apply")
    return unet, encoder, vae, DiffusionConfig(**meta["diffusion"]), meta


def export_diffusers(model_dir: str, out: Path, ema: bool = True) -> Path:
    """A StableDiffusionPipeline folder, written under OUT.tmp and renamed when complete."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from models.stable_diffusion import scheduler_config

    unet, encoder, vae, diffusion_cfg, meta = sd_parts(model_dir, ema)
    net = unet.unet
    net.register_to_config(sample_size=meta["resolution"] // vae.factor)  # the pipeline's default size: training's
    if vae.vae.config.scaling_factor != vae.scale:  # an autoencoder.scaling_factor override: the one trained with
        vae.vae.register_to_config(scaling_factor=vae.scale)
    scheduler = DDIMScheduler.from_config({k: v for k, v in scheduler_config(diffusion_cfg).items()
                                           if not k.startswith("_")})
    pipe = StableDiffusionPipeline(vae=vae.vae, text_encoder=encoder.model, tokenizer=encoder.tokenizer, unet=net,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    _replace(tmp, out)
    return out


def export_single_file(model_dir: str, out: Path, ema: bool = True, dtype: str = "fp32", layout: str = "auto") -> Path:
    """One LDM-layout .safetensors (U-Net, VAE, text encoder), written under OUT.tmp and renamed when complete."""
    from safetensors.torch import save_file

    from models.stable_diffusion import to_single_file

    unet, encoder, vae, diffusion_cfg, _ = sd_parts(model_dir, ema)
    if layout == "auto":
        layout = "sd2" if encoder.model.config.hidden_act == "gelu" else "sd1"
    state = to_single_file(unet.diffusers_state_dict(), dict(unet.unet.config), vae.vae.state_dict(),
                           dict(vae.vae.config), encoder.model.state_dict(), layout)
    state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}
    if diffusion_cfg.prediction == "v":
        state["v_pred"] = torch.tensor([])  # the marker some tools (ComfyUI) read for v-prediction
        if diffusion_cfg.zero_terminal_snr:
            state["ztsnr"] = torch.tensor([])
    meta = {"format": "pt", "prediction_type": {"v": "v_prediction", "epsilon": "epsilon", "x0": "sample"}[
        diffusion_cfg.prediction], "schedule": diffusion_cfg.schedule,
        "zero_terminal_snr": str(diffusion_cfg.zero_terminal_snr).lower(), "text_layout": layout,
        "vae_scaling_factor": str(vae.scale), "source": "t2i-pipeline"}
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, out)
    return out


def _replace(tmp: Path, out: Path):
    """Put the finished folder in place: the previous one is moved aside first and removed last, so an interrupted
    export leaves one complete folder (the old or the new)."""
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    out = Path(args.out)
    try:
        if args.format == "single-file" and out.suffix != ".safetensors":
            raise ValueError(f"--out {out}: a single file is written as .safetensors")
        if out.exists() and not args.overwrite:
            raise ValueError(f"--out {out} exists: choose another path, or pass --overwrite")
        if out.exists() and out.is_dir() != (args.format == "diffusers"):
            raise ValueError(f"--out {out} is a {'folder' if out.is_dir() else 'file'}: a {args.format} export "
                             f"writes a {'folder' if args.format == 'diffusers' else 'file'}; choose another path")
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.format == "diffusers":
            export_diffusers(args.model, out, ema=not args.no_ema)
        else:
            export_single_file(args.model, out, ema=not args.no_ema, dtype=args.dtype, layout=args.text_layout)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {e}") from None
    log.info("wrote %s (%s)", out, args.format)
    return out


if __name__ == "__main__":
    main()
