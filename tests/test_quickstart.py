"""The one-command quickstart, shortened (a few steps), end to end on CPU: every artefact exists and is well formed."""

import json
import os
import subprocess
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_shortened_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "OUT": str(out), "SKIP_SETUP": "1", "STEPS": "4", "CLIP_STEPS": "3", "COUNT": "128",
           "EVAL_IMAGES": "8", "NLL_IMAGES": "3", "VAE_STEPS": "3", "LATENT_STEPS": "4", "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    res = subprocess.run(["bash", "launch/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    assert json.loads((out / "toy_shards" / "manifest.json").read_text())["samples"] == 128
    assert (out / "toy_clip.safetensors").stat().st_size > 0
    meta = json.loads((out / "run" / "model" / "config.json").read_text())
    assert meta["step"] == 4 and meta["text_encoder"]["pretrained"].endswith("toy_clip.safetensors")
    grid = Image.open(out / "samples" / "grid.png")
    assert grid.size == (6 * 32 + 7 * 2, 4 * 32 + 5 * 2)  # 4 prompts × (3 guidance scales × 2 seeds)
    assert len(list((out / "samples" / "images").glob("*.png"))) == 24
    results = json.loads((out / "eval" / "results.json").read_text())
    assert [r["guidance"] for r in results["results"]] == [1, 2, 3, 5]
    assert all(r["n"] == 8 and "fd_clip" in r and "clip_score" in r for r in results["results"])
    assert (out / "eval" / "results.csv").read_text().count("\n") == 5
    for png in ("loss.png", "eval/fid_vs_clip.png"):
        assert Image.open(out / png).size[0] > 100
    report = (out / "report.md").read_text()
    for needle in ("loss.png", "samples/grid.png", "eval/fid_vs_clip.png", "| guidance |", "not FID",
                   "| real held-out images |", "Does each image follow its caption?"):
        assert needle in report, needle
    labelled = Image.open(out / "samples_labelled.png")  # enlarged 4× (nearest), labelled rows and columns
    assert labelled.size == (28 + 6 * (4 * 32 + 4), 18 + 4 * (4 * 32 + 4))
    assert Image.open(out / "training_grids.png").size[0] > 3 * 32
    for needle in ("samples_labelled.png", "training_grids.png", "## During training", "text tower conditions"):
        assert needle in report, needle
    first = json.loads((out / "eval" / "guidance_1" / "metadata.jsonl").read_text().splitlines()[0])
    assert {"file", "prompt", "seed", "guidance"} <= first.keys()
    real = results["real"]  # the held-out images themselves: every attribute read right
    assert real["n"] == 8 and real["attr_all"] == 1.0
    row = next(line for line in report.splitlines() if line.startswith("| real held-out images | 100%"))
    assert row.count("100%") == 6
    # the latent run beside it: VAE, latent shards, training, 64 px samples and evaluation through the VAE
    assert json.loads((out / "toy_vae" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    assert json.loads((out / "toy_vae" / "training.json").read_text())["kl_weight"] == 1e-2  # a smooth latent space
    latents = json.loads((out / "toy64_latents" / "manifest.json").read_text())
    assert latents["complete"] and latents["samples"] == 128 and latents["latent_shape"] == [4, 16, 16]
    lmeta = json.loads((out / "latent_run" / "model" / "config.json").read_text())
    assert lmeta["step"] == 4 and lmeta["resolution"] == 64 and lmeta["model"]["in_channels"] == 4
    assert (out / "latent_run" / "model" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert all(Image.open(f).size == (64, 64) for f in (out / "latent_samples" / "images").glob("*.png"))
    lres = json.loads((out / "latent_eval" / "results.json").read_text())
    assert all(r["n"] == 8 and "attr_all" in r for r in lres["results"])
    # latent guidance in Kynkäänniemi et al.'s interval, rescaled; the pixel run's plain
    assert (lres["guidance_interval"], lres["guidance_rescale"]) == ([0.28, 2.9], 0.7)
    assert (results["guidance_interval"], results["guidance_rescale"]) == (None, 0.0)
    assert json.loads((out / "latent_samples" / "metadata.jsonl").read_text().splitlines()[0])["guidance_interval"] \
        == [0.28, 2.9]
    assert "## Latent diffusion beside pixel space" in report and "latent_samples_labelled.png" in report
    rows = [line for line in report.splitlines() if line.startswith(("| pixel space |", "| latent space |"))]
    assert len(rows) == 2 and "| 32 px | 3×32² | 4 |" in rows[0] and "| 64 px | 4×16² | 4 |" in rows[1], rows
    assert "Latent run: does each image follow its caption?" in report
    # bits/dim of held-out images in both runs: pixels (dequantised) and latents, each said so
    assert results["likelihood"]["num_images"] == 3 and lres["likelihood"]["num_images"] == 3
    # DPM-Solver++(2M) in 15 steps and the ODE at rtol 1e-3: what pays for the latent run's longer training
    assert (results["sampler"], results["steps"]) == (lres["sampler"], lres["steps"]) == ("dpmpp_2m", 15)
    assert results["likelihood"]["ode"]["rtol"] == lres["likelihood"]["ode"]["rtol"] == 1e-3
    assert "## Likelihood" in report and "### Latent run: likelihood" in report
    assert "bits/dim through the probability-flow ODE" in report and "Space: latents of the VAE" in report
    # idempotent: a second run reuses everything and only rewrites the report
    again = subprocess.run(["bash", "launch/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "writing 128 toy samples" in res.stdout + res.stderr and "writing 128 toy samples" not in again.stdout + again.stderr
    assert "training the toy CLIP" not in again.stdout
    assert "training the toy VAE" not in again.stdout and "encoding the 64 px shards" not in again.stdout
    for step in ("training the tiny U-Net", "sampling a grid", "evaluating"):  # nothing new to train, sample, score
        assert step not in again.stdout, step
    assert again.stdout.count("is trained to step 4 already") == 2
