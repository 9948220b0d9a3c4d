"""Stable Diffusion in and out, offline, on tiny random pipelines built here (tests/helpers.make_sd): the LDM single-file
layout written by this project read back by diffusers' own converters; single file = folder; training from a
pipeline folder keeps the frozen parts and starts from the U-Net's exact loss; the export loads in
StableDiffusionPipeline and samples the same images as sample.py; bad input is one line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from data.write_shards import write_toy
from helpers import make_sd, tiny_unet_config
from models.stable_diffusion import open_sd, to_single_file
from pipeline import train
from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = str(ROOT / "launch" / "configs" / "finetune_sd.yaml")
PROMPT = "a large red circle in the center on a white background"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return make_sd(tmp_path_factory.mktemp("sd") / "sd15")


@pytest.fixture(scope="module")
def sd_v(tmp_path_factory):
    return make_sd(tmp_path_factory.mktemp("sdv") / "sd_v", prediction="v", seed=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy32") / "shards"
    write_toy(out, count=64, resolution=32, seed=0, max_samples=8)
    return str(out / "{00000..00007}.tar")


def args(run, pretrained, shards, *extra):
    """finetune_sd.yaml, test-sized: 32 px toy shards, batch 4, one process, no tracker."""
    base = [f"data.shards={shards}", "data.resolution=32", "data.min_size=16", "data.num_workers=1",
            "data.shuffle_buffer=16", "data.epoch_samples=1000", "optim.batch_size=4", "optim.warmup_steps=1",
            "optim.mixed_precision=no", "logging.tracker=none", "logging.every=1", "logging.sample_every=0",
            "logging.sample_steps=2", "logging.sample_per_prompt=1", "checkpoint.every=100",
            f"model.pretrained={pretrained}", "model.overrides={}"]
    given = {e.split("=", 1)[0] for e in extra}
    return ["--config", FINETUNE, "--output-dir", str(run), *[b for b in base if b.split("=", 1)[0] not in given],
            *extra]


def parts(folder: Path):
    """(unet, vae, text encoder) state dicts and configs of a pipeline folder, loaded by diffusers itself."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    return unet, vae, text


def same(a: dict, b: dict, tol: float = 0.0) -> float:
    a = {k: v for k, v in a.items() if not k.endswith("position_ids")}
    b = {k: v for k, v in b.items() if not k.endswith("position_ids")}
    assert a.keys() == b.keys(), (sorted(set(a) ^ set(b)))[:5]
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= tol, worst
    return worst


def single_file(folder: Path, out: Path, version: str) -> Path:
    unet, vae, text = parts(folder)
    state = to_single_file(unet.state_dict(), dict(unet.config), vae.state_dict(), dict(vae.config),
                           text.state_dict(), version)
    if out.suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 1}, out)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


# --- the LDM layout ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_single_file_layout_is_what_diffusers_converters_read(version, tmp_path):
    """The file this project writes, read by diffusers' LDM converters and by StableDiffusionPipeline.from_single_file
    (an independent reader), gives back every tensor of the folder: U-Net, VAE, text encoder."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    folder = make_sd(tmp_path / "sd", version=version)
    unet, vae, text = parts(folder)
    ldm = to_single_file(unet.state_dict(), dict(unet.config), vae.state_dict(), dict(vae.config), text.state_dict(),
                         version)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in ldm)
    assert ldm["model.diffusion_model.input_blocks.3.0.op.weight"].shape[0] == 8  # down block 0's downsampler
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ldm  # up block 1's upsampler, after its attention
    same(convert_ldm_unet_checkpoint(ldm, dict(unet.config)), unet.state_dict())
    same(convert_ldm_vae_checkpoint(ldm, dict(vae.config)), vae.state_dict())
    if version == "sd1":
        back = convert_ldm_clip_checkpoint(ldm)
    else:
        assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in ldm  # OpenCLIP's fused q, k, v
        back = convert_open_clip_checkpoint(text, ldm, prefix="cond_stage_model.model.")
    same({k.removeprefix("text_model."): v for k, v in back.items()}, text.state_dict())
    file = tmp_path / "sd.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(file))
    pipe = StableDiffusionPipeline.from_single_file(str(file), config=str(folder), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    same(pipe.unet.state_dict(), unet.state_dict())
    same(pipe.vae.state_dict(), vae.state_dict())
    same(pipe.text_encoder.state_dict(), text.state_dict())


@pytest.mark.parametrize("version,suffix", [("sd1", ".safetensors"), ("sd2", ".ckpt")])
def test_single_file_load_equals_folder_load(version, suffix, tmp_path):
    from models.autoencoder import AutoencoderConfig, load_autoencoder

    folder = make_sd(tmp_path / "sd", version=version)
    file = single_file(folder, tmp_path / f"sd{suffix}", version)
    unet, vae, text = parts(folder)
    src = open_sd(file, folder)
    assert src.version == version and not src.is_folder
    same(src.unet_state(), unet.state_dict())
    model, tokenizer = src.text_encoder()
    same(model.state_dict(), text.state_dict())
    assert tokenizer.pad_token == ("!" if version == "sd2" else "<|endoftext|>")
    loaded = load_autoencoder(AutoencoderConfig(path=str(file), config=str(folder / "vae")))
    same(loaded.vae.state_dict(), vae.state_dict())
    folder_vae = load_autoencoder(AutoencoderConfig(path=str(folder)))
    assert loaded.fingerprint == folder_vae.fingerprint and loaded.scale == folder_vae.scale == 0.6


# --- training from a pipeline folder -----------------------------------------------------------------------------

def test_first_training_loss_equals_diffusers_components(sd, shards, tmp_path, monkeypatch):
    """The loss of the first step, logged by the job, is the loss diffusers' own components give for the same
    images, captions, timesteps and noise (VAE posterior mean × scaling_factor, SD's schedule, the CLIP tokens
    padded to 77 without an attention mask, the U-Net's ε)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffusion import GaussianDiffusion

    seen = {}
    real_input, real_losses = train.batch_input, GaussianDiffusion.training_losses

    def batch_input(batch, vae, device):
        seen.setdefault("pixels", batch.pixels(device))
        seen.setdefault("captions", list(batch.captions))
        return real_input(batch, vae, device)

    def training_losses(self, model, x0, cond=None, t=None, noise=None, generator=None):
        t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, generator=generator)
        seen.setdefault("t", t)
        seen.setdefault("noise", noise)
        return real_losses(self, model, x0, cond, t=t, noise=noise)

    monkeypatch.setattr(train, "batch_input", batch_input)
    monkeypatch.setattr(GaussianDiffusion, "training_losses", training_losses)
    run = tmp_path / "run"
    train.main(args(run, sd, shards, "--max-steps", "1", "train.caption_dropout=0"))
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae", local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet", local_files_only=True)
    text = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer", local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(sd, subfolder="scheduler", local_files_only=True)
    with torch.no_grad():
        latents = vae.encode(seen["pixels"]).latent_dist.mean * vae.config.scaling_factor
        ids = tokenizer(seen["captions"], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        noisy = scheduler.add_noise(latents, seen["noise"], seen["t"])
        pred = unet(noisy, seen["t"], encoder_hidden_states=text(ids)[0]).sample
    expected = torch.nn.functional.mse_loss(pred, seen["noise"]).item()
    assert logged == pytest.approx(expected, rel=1e-5)
    assert 0.5 < logged < 2  # a real ε-loss of a random network, not a degenerate 0


def run_and_export(pretrained, shards, run, *extra):
    train.main(args(run, pretrained, shards, "--max-steps", "2", *extra))
    from pipeline import export

    out = run / "diffusers"
    export.main(["--model", str(run / "model"), "--format", "diffusers", "--out", str(out)])
    return out


def pipeline_images(folder: Path, latents, guidance: float, steps: int):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                output_type="np", height=32, width=32).images[0]


def our_images(model_dir: Path, latents, guidance: float, steps: int):
    from pipeline.checkpoint import load_exported
    from pipeline.generate import generate

    unet, encoder, diffusion, vae, meta = load_exported(model_dir)
    images = generate(unet, encoder, diffusion, [PROMPT], [0], meta["resolution"], guidance=guidance, sampler="ddim",
                      steps=steps, channels=4, vae=vae, spacing="sd", noise=latents)
    return ((images[0] + 1) / 2).permute(1, 2, 0).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_folder_train_export_and_sample_like_the_pipeline(prediction, sd, sd_v, shards, tmp_path):
    """folder → train → export --format diffusers: at a learning rate of ~0 the exported U-Net, text encoder and VAE
    equal the originals (ε); at a real one (v) the U-Net moved and the frozen parts did not. The export's scheduler
    follows the checkpoint's prediction type, and StableDiffusionPipeline on it draws the same images as this
    project's DDIM from the same initial latents, prompt, steps and guidance (≤ 1e-4); sample.py's PNG agrees (v)."""
    source = sd if prediction == "epsilon" else sd_v
    lr = "1e-30" if prediction == "epsilon" else "1e-2"
    out = run_and_export(source, shards, tmp_path / "run", f"optim.lr={lr}", "ema.decay=0.5")
    (u0, v0, t0), (u1, v1, t1) = parts(source), parts(out)
    same(v1.state_dict(), v0.state_dict())
    same(t1.state_dict(), t0.state_dict())
    if prediction == "epsilon":
        same(u1.state_dict(), u0.state_dict())
    else:
        with pytest.raises(AssertionError):
            same(u1.state_dict(), u0.state_dict(), tol=1e-3)
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == {"epsilon": "epsilon", "v": "v_prediction"}[prediction]
    assert scheduler["beta_schedule"] == "scaled_linear" and scheduler["_class_name"] == "DDIMScheduler"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    for guidance, steps in [(1.0, 4), (3.0, 10)]:
        theirs = pipeline_images(out, latents, guidance, steps)
        ours = our_images(tmp_path / "run" / "model", latents, guidance, steps)
        assert np.abs(theirs - ours).max() <= 1e-4
    if prediction == "epsilon":
        return
    # sample.py itself (once: a process of its own): seed 0's latents are image_seed(0, 0, 0)'s draw; its PNG is the
    # pipeline's image in 8 bits
    from pipeline.generate import image_seed

    gen = torch.Generator().manual_seed(image_seed(0, 0, 0))
    latents = torch.randn(4, 8, 8, generator=gen)[None]
    subprocess.run([sys.executable, "pipeline/sample.py", "--model", str(tmp_path / "run" / "model"), "--prompt",
                    PROMPT, "--guidance", "3", "--steps", "10", "--spacing", "sd", "--out",
                    str(tmp_path / "samples")], cwd=ROOT, check=True, capture_output=True, timeout=300)
    png = np.asarray(Image.open(next((tmp_path / "samples" / "images").glob("*.png")))).astype(np.float64) / 255
    assert np.abs(png - pipeline_images(out, latents, 3.0, 10)).max() <= 0.5 / 255 + 1e-4


@pytest.mark.slow
def test_single_file_in_train_single_file_out(sd, shards, tmp_path):
    """single file → train → single file: the written file holds the run's EMA U-Net and the original frozen parts,
    and reads back (here and in diffusers) to them."""
    file = single_file(sd, tmp_path / "sd.safetensors", "sd1")
    run = tmp_path / "run"
    train.main(args(run, file, shards, "--max-steps", "2", f"model.pretrained_config={sd}", "optim.lr=1e-2"))
    cfg = json.loads((run / "model" / "config.json").read_text())
    assert cfg["model_family"] == "diffusers" and cfg["diffusion"]["schedule"] == "scaled_linear"
    from pipeline import export

    out = tmp_path / "out.safetensors"
    export.main(["--model", str(run / "model"), "--format", "single-file", "--out", str(out)])
    # the command itself, once in a process of its own: a wrong suffix is one line on stderr, nothing written
    res = subprocess.run([sys.executable, "pipeline/export.py", "--model", str(run / "model"), "--format",
                          "single-file", "--out", str(tmp_path / "out.bin")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0 and "error: --out" in res.stderr and "a single file is written as .safetensors" \
        in res.stderr and "Traceback" not in res.stderr and not (tmp_path / "out.bin").exists()
    back = open_sd(out, sd)
    ema = {k.removeprefix("unet."): v for k, v in load_file(str(run / "model" / "unet_ema.safetensors")).items()}
    same(back.unet_state(), ema)
    unet, vae, text = parts(sd)
    with pytest.raises(AssertionError):
        same(back.unet_state(), unet.state_dict(), tol=1e-3)  # it trained
    same(back.text_encoder()[0].state_dict(), text.state_dict())
    from models.autoencoder import AutoencoderConfig, load_autoencoder

    same(load_autoencoder(AutoencoderConfig(path=str(out), config=str(sd / "vae"))).vae.state_dict(), vae.state_dict())


# --- bad input: one line, nothing written ------------------------------------------------------------------------

class Unsafe:  # a pickled object: loading it would run arbitrary code
    pass


@pytest.mark.parametrize("case", ["no_unet", "sdxl", "unsafe_ckpt", "contradicting_prediction", "sd2_file_unsaid",
                                  "resolution", "own_unet_export"])
def test_bad_stable_diffusion_input_is_one_line_and_writes_nothing(case, sd, shards, tmp_path, capsys):
    pretrained, extra, match = sd, [], None
    if case == "no_unet":
        pretrained = tmp_path / "no_unet"
        shutil.copytree(sd, pretrained)
        shutil.rmtree(pretrained / "unet")
        match = "has no unet/"
    elif case == "sdxl":
        pretrained = tmp_path / "sdxl"
        shutil.copytree(sd, pretrained)
        index = json.loads((pretrained / "model_index.json").read_text())
        index.update(_class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "CLIPTextModel"])
        (pretrained / "model_index.json").write_text(json.dumps(index))
        match = "SDXL pipeline .* not supported yet"
    elif case == "unsafe_ckpt":
        pretrained = tmp_path / "unsafe.ckpt"
        torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callback": Unsafe()}, pretrained)
        match = "needs unsafe unpickling"
    elif case == "contradicting_prediction":
        extra, match = ["diffusion.prediction=v"], r"diffusion.prediction='v' contradicts model.pretrained"
    elif case == "sd2_file_unsaid":
        pretrained = single_file(make_sd(tmp_path / "sd2", version="sd2"), tmp_path / "sd2.safetensors", "sd2")
        extra, match = [f"model.pretrained_config={tmp_path / 'cfg_only'}"], "set diffusion.prediction=v"
        (tmp_path / "cfg_only" / "unet").mkdir(parents=True)  # configs without a scheduler: the file must say
        shutil.copy(tmp_path / "sd2" / "unet" / "config.json", tmp_path / "cfg_only" / "unet" / "config.json")
    elif case == "resolution":
        extra, match = ["data.resolution=34"], "does not divide by the VAE's downsampling factor 4"
    run = tmp_path / "run"
    if case == "own_unet_export":
        from pipeline import export

        (tmp_path / "m").mkdir()
        train.main(["--config", str(ROOT / "launch/configs/demo.yaml"), "--output-dir", str(run), "--max-steps", "1",
                    "data.shards=" + shards, "data.resolution=16", "optim.batch_size=2", "logging.tracker=none",
                    "logging.sample_every=0", "data.num_workers=1"])
        with pytest.raises(SystemExit) as e:
            export.main(["--model", str(run / "model"), "--format", "single-file", "--out", str(tmp_path / "x.safetensors")])
        assert "own U-Net, which has no Stable Diffusion layout" in str(e.value)
        assert not (tmp_path / "x.safetensors").exists()
        return
    with pytest.raises((SystemExit, ConfigError)) as e:
        train.main(args(run, pretrained, shards, "--max-steps", "1", *extra))
    import re

    message = str(e.value)
    assert re.search(match, message), message
    assert "\n" not in message.strip() and "Traceback" not in capsys.readouterr().err
    assert not run.exists()  # nothing written


def test_config_follows_the_scheduler(sd, sd_v, shards, tmp_path):
    cfg = load_config(FINETUNE, [f"model.pretrained={sd_v}", "diffusion.loss_weighting=min_snr"])
    d = cfg.diffusion
    assert (d.schedule, d.prediction, d.num_steps, d.zero_terminal_snr) == ("scaled_linear", "v", 1000, False)
    assert d.loss_weighting == "min_snr"  # what the checkpoint does not decide stays the user's
    assert cfg.text_encoder.kind == "hf_clip" and cfg.text_encoder.name == str(sd_v) and cfg.autoencoder.path == str(sd_v)
    assert load_config(FINETUNE, [f"model.pretrained={sd}", "diffusion.prediction=epsilon"]).diffusion.prediction \
        == "epsilon"  # agreeing with it is fine
    with pytest.raises(ConfigError, match=r"model.overrides \['block_out_channels'\] with model.pretrained"):
        load_config(FINETUNE, [f"model.pretrained={sd}", "model.overrides.block_out_channels=[8, 8, 8]"])


# --- the diffusers family beside the own U-Net -------------------------------------------------------------------

def test_sd_sizes_are_stable_diffusions_exact_architectures():
    from models.registry import build_model

    with torch.device("meta"):  # 860M parameters, no memory
        assert build_model("sd").num_parameters() == 859_520_964  # SD 1.5's U-Net
        assert build_model("sd2").num_parameters() == 865_910_724  # SD 2.1's


def test_diffusers_unet_backends_agree_and_xformers_off_cuda_is_refused():
    from models.registry import build_model

    torch.manual_seed(0)
    unet = build_model("sd", **tiny_unet_config(), attention_backend="math").eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    cond = {"tokens": torch.randn(2, 77, 32), "mask": torch.ones(2, 77, dtype=torch.bool)}
    ref = unet(x, t, cond)
    unet.cfg.attention_backend, unet._backend = "sdpa", None
    assert torch.allclose(unet(x, t, cond), ref, atol=1e-5) and unet._backend == ("cpu", "sdpa")
    unet.cfg.attention_backend, unet._backend = "xformers", None
    with pytest.raises(RuntimeError, match="xformers"):
        unet(x, t, cond)


def test_gradient_checkpointing_gives_the_same_gradients():
    from models.registry import build_model

    torch.manual_seed(0)
    plain = build_model("sd", **tiny_unet_config())
    ckpt = build_model("sd", **tiny_unet_config(), gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    cond = {"tokens": torch.randn(2, 77, 32)}
    grads = []
    for m in (plain, ckpt):
        m.train()
        m(x, t, cond).square().mean().backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
    same(grads[0], grads[1], tol=1e-6)


@pytest.mark.slow
def test_evaluation_and_likelihood_of_a_stable_diffusion_run(sd, shards, tmp_path):
    """The evaluation job (Fréchet distance on CLIP features, CLIP score, precision/recall, bits/dim by the ODE and the
    ELBO) runs on a model of the diffusers family in latent space."""
    from pipeline import evaluate

    run = tmp_path / "run"
    train.main(args(run, sd, shards, "--max-steps", "1"))
    result = evaluate.main([
        "run", "--model", str(run / "model"), "--captions", shards, "--num-images", "5", "--guidance", "1", "3",
        "--ref", shards, "--fd-features", "clip", "--clip-model", "openclip:toy-clip", "--clip-config",
        str(ROOT / "launch/configs/clip/toy-clip.json"), "--steps", "2", "--out", str(tmp_path / "eval"),
        "--batch-size", "5", "--likelihood", "2", "--elbo-timesteps", "2", "--rtol", "1e-2", "--atol", "1e-2", "--json"])
    assert [r["guidance"] for r in result["results"]] == [1.0, 3.0]
    assert all(np.isfinite(r["fd_clip"]) and np.isfinite(r["clip_score"]) for r in result["results"])
    nll = result["likelihood"]
    assert nll["num_images"] == 2 and "latents of the VAE" in nll["space"]
    assert np.isfinite(nll["bits_per_dim"]) and np.isfinite(nll["elbo_bits_per_dim"])
