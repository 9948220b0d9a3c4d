"""Checkpoints (everything needed to continue exactly) and the exported ``model/`` folder (what sampling loads).

A checkpoint is ``RUN/checkpoints/step_XXXXXXXX/``:
    Accelerate's state (model, optimiser, LR scheduler, grad scaler, RNG states of every process; DeepSpeed's
    sharded states under ZeRO), ``ema.safetensors``, ``data/rank{r}.json`` (each rank's loader position) and
    ``train_state.json`` (step, counters, the model config), and ``checksums.json`` (SHA-256 of every file). It is
    written under ``step_XXXXXXXX.tmp`` and renamed only when every rank has finished, so a crash during a save
    leaves the previous checkpoint as the latest; a checkpoint damaged later (a disk error, a truncated copy) is
    recognised by its checksums and ``--resume latest`` falls back to the newest intact one.

The export is ``RUN/model/``: ``unet_ema.safetensors`` (EMA weights), ``unet.safetensors`` (raw weights),
``config.json`` (model, text-encoder, autoencoder and diffusion config, resolution, step), when the text encoder was
not loaded from pretrained weights ``text_encoder.safetensors`` so that the sampling job gets the same one, and for
a latent model ``vae/`` (the frozen VAE in diffusers' folder layout, float32): the folder is all sampling needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from data.files import read_json, write_json_atomic

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{8})$")
CHECKSUMS = "checksums.json"


def read_safetensors(path: Path, device: str = "cpu") -> dict:
    """A .safetensors file; a damaged (e.g. truncated) one is a ValueError naming it."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is damaged ({e})") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: Path):
    """SHA-256 of every file below ``folder`` (relative paths), for recognising damage later."""
    sums = {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS}
    write_json_atomic(folder / CHECKSUMS, sums)


def damaged_files(folder: Path) -> list[str]:
    """The files of a checkpoint that are missing or differ from its checksums ([] when it has none to check)."""
    if not (folder / CHECKSUMS).is_file():
        return []
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return [CHECKSUMS]
    return [name for name, digest in sums.items()
            if not (folder / name).is_file() or _sha256(folder / name) != digest]


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts once its train_state.json exists and it is renamed)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if STEP_DIR.match(p.name) and (p / "train_state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(arg: str, ckpt_dir: Path) -> Path:
    """``latest`` → the newest complete checkpoint in ``ckpt_dir``; otherwise a checkpoint folder path."""
    if arg == "latest":
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {ckpt_dir} (start without --resume, or "
                                    f"pass --output-dir of the run to continue)")
        for path in reversed(found):
            damaged = damaged_files(path)
            if not damaged:
                return path
            log.warning("checkpoint %s is damaged (%s differ from its checksums): trying the one before",
                        path, ", ".join(damaged[:3]))
        raise ValueError(f"--resume latest: every checkpoint in {ckpt_dir} is damaged (checksums differ)")
    path = Path(arg)
    if not (path / "train_state.json").is_file():
        raise FileNotFoundError(f"--resume {arg}: not a complete checkpoint folder (no train_state.json)")
    damaged = damaged_files(path)
    if damaged:
        raise ValueError(f"checkpoint {path} is damaged: {', '.join(damaged[:3])} differ from its checksums; resume "
                         f"from another (--resume latest takes the newest intact one)")
    return path


def remove_partial(ckpt_dir: Path):
    """Delete ``*.tmp`` folders left by a save that was interrupted (main process only)."""
    for p in ckpt_dir.glob("step_*.tmp"):
        log.warning("removing %s, left by an interrupted save", p)
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, ema, loader, train_state: dict, keep_last: int,
                    rank_info: dict | None = None) -> Path:
    """Collective: every rank calls it. ``rank_info`` (JSON) is stored beside this rank's data position.
    Returns the final folder."""
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f"step_{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    (tmp / "data").mkdir(exist_ok=True)
    write_json_atomic(tmp / "data" / f"rank{accelerator.process_index}.json", {**loader.state_dict(), **(rank_info or {})})
    if accelerator.is_main_process:
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
        write_json_atomic(tmp / "train_state.json", {**train_state, "step": step})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_checksums(tmp)  # every rank's files are written (the barrier above)
        if final.exists():  # the same step saved again (e.g. a resumed run that made no progress)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_data_state(path: Path) -> dict:
    """The loader position in checkpoint ``path``: every rank's streams merged (any number of processes resumes)."""
    from data.loader import Loader

    files = sorted((path / "data").glob("rank*.json"))
    if not files:
        raise FileNotFoundError(f"{path} has no data position (data/rank*.json): it is incomplete")
    return Loader.merge_states([read_json(f) for f in files])


def load_checkpoint(accelerator, path: Path, ema) -> dict:
    """Collective. Restores Accelerate's state and the EMA; returns the train_state. A file that cannot be read is a
    ValueError in one line (never PyTorch's advice to unpickle it anyway)."""
    import pickle

    train_state = read_json(path / "train_state.json")
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        detail = "" if "weights_only" in str(e) else f": {first}"
        raise ValueError(f"checkpoint {path} cannot be loaded ({type(e).__name__}{detail}): a file in it is damaged; "
                         f"resume from another (--resume PATH)") from None
    if ema is not None:
        ema_file = path / "ema.safetensors"
        if not ema_file.is_file():
            raise FileNotFoundError(f"{path} has no ema.safetensors; it was saved with ema.enabled=false")
        ema.load_state_dict(read_safetensors(ema_file, device=str(next(ema.ema_model.parameters()).device)))
    return train_state


def check_model_config(path: Path, model_config: dict, meaning: dict | None = None):
    """Refuse a checkpoint of a different architecture, or whose network means something else (``meaning``: the VAE
    whose latents it models, the noise schedule and what it predicts), before anything is loaded."""
    state = read_json(path / "train_state.json")
    saved = state.get("model_config")
    if saved is not None and json.loads(json.dumps(model_config)) != saved:
        diff = {k: (saved.get(k), v) for k, v in json.loads(json.dumps(model_config)).items() if saved.get(k) != v}
        raise ValueError(f"checkpoint {path} was made by a different model config: {diff} (saved, configured). "
                         f"Use the run's own config (RUN/config.yaml) to resume it.")
    for key, value in json.loads(json.dumps(meaning or {})).items():
        if key in state and state[key] != value:  # older checkpoints lack the key: not checked
            raise ValueError(f"checkpoint {path} was trained with another {key} ({state[key]}; configured: {value}): "
                             f"its weights would mean something else. Use the run's own config (RUN/config.yaml).")


# --- export ------------------------------------------------------------------------------------------------------

def export_model(out: Path, unet_state: dict, ema_state: dict | None, unet_config, text_cfg, text_encoder,
                 diffusion_cfg, resolution: int, step: int, vae=None, autoencoder_cfg=None):
    """Write RUN/model/ atomically (main process)."""
    from models.registry import family_of

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cpu = lambda sd: {k: v.detach().cpu().contiguous() for k, v in sd.items()}  # noqa: E731
    save_file(cpu(unet_state), str(tmp / "unet.safetensors"))
    if ema_state is not None:
        save_file(cpu(ema_state), str(tmp / "unet_ema.safetensors"))
    text = {k: v for k, v in dataclasses.asdict(text_cfg).items() if k != "cache"}
    if text_cfg.kind == "hf_clip":  # bundled (model + tokenizer): the folder works wherever it is moved
        text_encoder.save(tmp / "text_encoder")
        text.update(name="text_encoder", config_file=None, weights=None, source=text_cfg.name)
    elif not text_cfg.pretrained and not text_cfg.weights:  # randomly initialised: ship the weights themselves
        save_file(cpu(text_encoder.state_dict()), str(tmp / "text_encoder.safetensors"))
        text["weights"] = "text_encoder.safetensors"
    if text_cfg.config_file and text_cfg.kind == "openclip":
        shutil.copy(text_cfg.config_file, tmp / Path(text_cfg.config_file).name)
        text["config_file"] = Path(text_cfg.config_file).name
    meta = {"format": 1, "step": step, "resolution": resolution, "model_family": family_of(unet_config),
            "model": dataclasses.asdict(unet_config), "text_encoder": text,
            "diffusion": dataclasses.asdict(diffusion_cfg)}
    if vae is not None:  # bundled: the scale and shift used in training, resolved, beside the VAE's own weights
        from models.autoencoder import load_autoencoder

        # from the original files in fp32 on the CPU: the copy in use may be bf16 (autoencoder.dtype=auto on a GPU)
        original = load_autoencoder(dataclasses.replace(autoencoder_cfg, dtype="fp32", tiling=False), "cpu")
        if original.fingerprint != vae.fingerprint:
            raise ValueError(f"the VAE at {autoencoder_cfg.path} changed during training (fingerprint "
                             f"{original.fingerprint}, trained with {vae.fingerprint}): not bundling it")
        original.vae.save_pretrained(tmp / "vae")
        meta["autoencoder"] = {**dataclasses.asdict(autoencoder_cfg), "path": "vae", "config": None,
                               "scaling_factor": vae.scale, "shift_factor": vae.shift, "fingerprint": vae.fingerprint,
                               "source": vae.source}
    (tmp / "config.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("exported %s", out)


def load_exported(model_dir: str | Path, device="cpu", ema: bool = True):
    """(unet, text_encoder, diffusion, vae, meta) from an exported ``model/`` folder; EMA weights unless ema=False;
    vae is None for a pixel-space model."""
    from diffusion import DiffusionConfig, GaussianDiffusion
    from models.autoencoder import AutoencoderConfig, load_autoencoder
    from models.registry import build, config_from_dict
    from models.text_encoders import TextEncoderConfig, build_text_encoder

    model_dir = Path(model_dir)
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{model_dir} is not an exported model folder (no config.json); pass RUN/model")
    meta = read_json(cfg_file)
    weights = model_dir / ("unet_ema.safetensors" if ema else "unet.safetensors")
    if not weights.is_file() and ema:
        weights = model_dir / "unet.safetensors"
        log.warning("%s has no EMA weights; using the raw weights", model_dir)
    if not weights.is_file():
        raise FileNotFoundError(f"{model_dir} is incomplete: {weights.name} is missing")
    text = {k: v for k, v in meta["text_encoder"].items() if k != "source"}
    for key in ("weights", "config_file", "name"):  # files shipped in the folder are relative to it
        if text.get(key) and (model_dir / text[key]).exists() and not Path(text[key]).is_absolute():
            text[key] = str(model_dir / text[key])
    encoder = build_text_encoder(TextEncoderConfig(**text)).to(device)
    unet = build(config_from_dict(meta.get("model_family", "unet"), meta["model"]))
    unet.load_state_dict(read_safetensors(weights))
    unet.to(device).eval().requires_grad_(False)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(**meta["diffusion"]))
    vae = None
    if meta.get("autoencoder"):
        fields = {f.name for f in dataclasses.fields(AutoencoderConfig)}
        vae_cfg = AutoencoderConfig(**{k: v for k, v in meta["autoencoder"].items() if k in fields})
        if not Path(vae_cfg.path).is_absolute():
            vae_cfg.path = str(model_dir / vae_cfg.path)
        vae = load_autoencoder(vae_cfg, device)
    return unet, encoder, diffusion, vae, meta

