"""Latent diffusion: the frozen VAE (folder, pipeline folder, single file; 4 and 16 channels; scale and shift), latent
shards (precompute = live encoding, flipped latents, caption embeddings, two processes, interrupted and rerun), training
from them (same loss as live encoding, exact resume), sampling and evaluation through the VAE, and every bad input."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from data import DataConfig, Loader
from data import latents as latent_shards
from data.write_shards import write_toy
from helpers import make_vae
from models.autoencoder import FAMILIES, AutoencoderConfig, load_autoencoder
from pipeline import precompute, train

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "launch" / "configs" / "demo_latent.yaml")
RES = 16  # px; the test VAE divides by 4 → 4 × 4 latents, which the tiny U-Net halves twice


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Image shards (16 px toy data), a VAE, and latent shards precomputed from them with --flip and --text."""
    root = tmp_path_factory.mktemp("latent")
    write_toy(root / "images", count=128, resolution=RES, seed=0, max_samples=16)
    vae = make_vae(root / "vae")
    images = str(root / "images" / "{00000..00007}.tar")
    precompute.main(["latents", "--config", DEMO, "--out", str(root / "latents"), "--flip", "--text",
                     *base(images, vae)])
    return {"root": root, "images": images, "vae": vae, "latents": str(root / "latents")}


def base(shards, vae, *extra):
    """Overrides that make the latent demo config test-sized."""
    b = [f"data.shards={shards}", f"data.resolution={RES}", "data.num_workers=1", "data.shuffle_buffer=32",
         f"autoencoder.path={vae}", "optim.batch_size=8", "optim.warmup_steps=2", "logging.tracker=none",
         "logging.every=1", "logging.sample_every=0", "logging.sample_steps=2", "logging.sample_per_prompt=1",
         "checkpoint.every=3"]
    given = {e.split("=", 1)[0] for e in extra}
    return [o for o in b if o.split("=", 1)[0] not in given] + list(extra)


def run_args(run_dir, shards, vae, *extra, steps=1):
    return ["--config", DEMO, "--output-dir", str(run_dir), "--max-steps", str(steps), *base(shards, vae, *extra)]


# --- the VAE -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels,shift", [(4, None), (16, 0.1)])
def test_vae_loads_from_folder_pipeline_folder_and_single_file_and_applies_scale_and_shift(tmp_path, channels, shift):
    folder = make_vae(tmp_path / "vae", channels, scaling_factor=0.7, shift_factor=shift)
    (tmp_path / "pipe").mkdir()
    os.symlink(folder, tmp_path / "pipe" / "vae")  # a diffusers pipeline folder: its vae/ is found
    single = tmp_path / "vae.safetensors"
    save_file(load_file(str(folder / "diffusion_pytorch_model.safetensors")), str(single))
    loaded = [load_autoencoder(AutoencoderConfig(path=str(p), config=c))
              for p, c in [(folder, None), (tmp_path / "pipe", None), (single, str(folder)),
                           (single, str(folder / "config.json"))]]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae = loaded[0]
    assert (vae.channels, vae.factor, vae.scale, vae.shift) == (channels, 4, 0.7, shift or 0.0)
    z = vae.encode(x)
    assert z.shape == (2, channels, 8, 8)
    for other in loaded[1:]:  # the same weights, however they were stored
        assert other.fingerprint == vae.fingerprint
        torch.testing.assert_close(other.encode(x), z, rtol=0, atol=0)
    with torch.no_grad():
        mean = vae.vae.encode(x).latent_dist.mean  # diffusers' own posterior mean
        torch.testing.assert_close(z, (mean - (shift or 0.0)) * 0.7, rtol=1e-6, atol=1e-6)  # applied
        torch.testing.assert_close(vae.decode(z), vae.vae.decode(mean).sample, rtol=1e-5, atol=1e-5)  # undone
    assert vae.decode(z).shape == (2, 3, 32, 32)
    override = load_autoencoder(AutoencoderConfig(path=str(folder), scaling_factor=2.0, shift_factor=-0.3))
    torch.testing.assert_close(override.encode(x), (mean + 0.3) * 2.0, rtol=1e-6, atol=1e-6)
    assert override.identity()["fingerprint"] == vae.fingerprint and override.identity() != vae.identity()


def test_per_channel_latent_statistics_standardise_each_channel(tmp_path):
    """A VAE config with latents_mean / latents_std (diffusers' per-channel convention): encode gives
    (μ − mean_c)·scale/std_c, decode undoes it, the identity (what latent shards are checked against) includes them."""
    folder = make_vae(tmp_path / "vae", scaling_factor=0.5)
    plain = load_autoencoder(AutoencoderConfig(path=str(folder)))
    cfg = json.loads((folder / "config.json").read_text())
    mean, std = [0.5, -1.0, 2.0, 0.0], [2.0, 0.5, 1.0, 3.0]
    (folder / "config.json").write_text(json.dumps({**cfg, "latents_mean": mean, "latents_std": std}))
    vae = load_autoencoder(AutoencoderConfig(path=str(folder), dtype="fp32"))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mu = vae.vae.encode(x).latent_dist.mean
    want = (mu - torch.tensor(mean).view(1, 4, 1, 1)) * 0.5 / torch.tensor(std).view(1, 4, 1, 1)
    torch.testing.assert_close(vae.encode(x), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vae.decode(vae.encode(x)), plain.decode(plain.encode(x)), rtol=1e-5, atol=1e-5)
    assert vae.identity()["latents_mean"] == mean and "latents_mean" not in plain.identity()
    with pytest.raises(ValueError, match="made by another VAE"):
        latent_shards.check_manifest({"vae": plain.identity(), "resolution": 16, "complete": True}, vae.identity(), 16)


def ldm_names(state: dict, levels: int) -> dict:
    """A diffusers AutoencoderKL state dict under the original latent-diffusion key names (what the published
    single-file VAEs, e.g. sdxl_vae.safetensors, use): the inverse of diffusers' own conversion."""
    import re

    rules = [(r"^encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
             (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
             (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block."),
             (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample."),
             (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
             (r"\.conv_norm_out\.", lambda m: ".norm_out."), (r"\.conv_shortcut\.", lambda m: ".nin_shortcut.")]
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def test_single_file_with_original_ldm_key_names_loads(tmp_path):
    """The published single files use latent diffusion's own key names; diffusers converts them on load."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        mid_block_add_attention=False, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    ldm = ldm_names(vae.state_dict(), 3)
    assert "encoder.down.0.block.0.conv1.weight" in ldm and "encoder.down.1.block.0.nin_shortcut.weight" in ldm
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in ldm)
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(tmp_path / "ldm.safetensors"))
    a = load_autoencoder(AutoencoderConfig(path=str(tmp_path / "vae")))
    b = load_autoencoder(AutoencoderConfig(path=str(tmp_path / "ldm.safetensors"), config=str(tmp_path / "vae")))
    assert b.fingerprint == a.fingerprint  # the same weights, under diffusers' names again


def test_shipped_vae_families_build_the_published_architectures():
    """The single-file configs: SD/SDXL have 4 latent channels and SD's 83.65M parameters; SD3/FLUX 16, no quant
    convs, and a shift."""
    from diffusers import AutoencoderKL

    for name, cfg in FAMILIES.items():
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(cfg)
        n = sum(p.numel() for p in vae.parameters())
        if name in ("sd", "sdxl"):
            assert vae.config.latent_channels == 4 and n == 83_653_863 and not cfg.get("shift_factor")
        else:
            assert vae.config.latent_channels == 16 and vae.quant_conv is None and cfg["shift_factor"] > 0


class Unpicklable:
    pass


@pytest.mark.parametrize("case", ["missing", "no_config", "not_a_vae_folder", "partial_weights", "not_a_vae_file",
                                  "single_file_without_config", "pickle", "unknown_family"])
def test_bad_vae_paths_are_clear_errors(tmp_path, case):
    folder = make_vae(tmp_path / "vae")
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    path, config, error, match = str(folder), None, ValueError, None
    if case == "missing":
        path, error, match = str(tmp_path / "nope"), FileNotFoundError, "does not exist"
    elif case == "no_config":
        (folder / "config.json").unlink()
        match = "no config.json"
    elif case == "not_a_vae_folder":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DConditionModel"}))
        match = "describes a UNet2DConditionModel, not an AutoencoderKL"
    elif case == "partial_weights":
        weights.pop("decoder.conv_out.bias")
        save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
        match = "miss 1"
    elif case == "not_a_vae_file":
        save_file({"w": torch.zeros(3)}, str(tmp_path / "x.safetensors"))
        path, config, match = str(tmp_path / "x.safetensors"), str(folder), "is not a usable VAE"
    elif case == "single_file_without_config":
        save_file(weights, str(tmp_path / "v.safetensors"))
        path, match = str(tmp_path / "v.safetensors"), "autoencoder.config = one of sd, sdxl, sd3, flux"
    elif case == "pickle":  # a .ckpt that needs arbitrary unpickling (a plain tensor dict would load, weights_only)
        torch.save({"state_dict": weights, "callback": Unpicklable()}, tmp_path / "v.ckpt")
        path, config, match = str(tmp_path / "v.ckpt"), str(folder), "needs unsafe unpickling"
    elif case == "unknown_family":
        save_file(weights, str(tmp_path / "v.safetensors"))
        path, config, error, match = str(tmp_path / "v.safetensors"), "sd9", FileNotFoundError, "neither a shipped"
    with pytest.raises(error, match=match):
        load_autoencoder(AutoencoderConfig(path=path, config=config))


def test_tiling_and_slicing_decode_big_images_in_pieces(tmp_path):
    """autoencoder.tiling: diffusers' tiled VAE above its tile size (here 16 px), seams blended; max_batch: one VAE
    call per max_batch images. The images have the shapes of one big call (their values differ: each tile sees only
    its own latents, which a random decoder with 4 × 4 latent tiles makes plain)."""
    folder = make_vae(tmp_path / "vae")
    whole = load_autoencoder(AutoencoderConfig(path=str(folder), max_batch=64))
    tiled = load_autoencoder(AutoencoderConfig(path=str(folder), tiling=True, max_batch=1))
    assert tiled.vae.use_tiling and not whole.vae.use_tiling
    calls, tiles = [], []
    real, real_tiled = tiled.vae.decode, tiled.vae.tiled_decode
    tiled.vae.decode = lambda z, **kw: calls.append(z.shape[0]) or real(z, **kw)
    tiled.vae.tiled_decode = lambda z, **kw: tiles.append(z.shape) or real_tiled(z, **kw)
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # 64 px images: 4 × 4 tiles of 16
    a, b = whole.decode(z), tiled.decode(z)
    assert calls == [1, 1, 1] and len(tiles) == 3  # one image per call, each decoded tile by tile
    assert a.shape == b.shape == (3, 3, 64, 64) and torch.isfinite(b).all() and not torch.equal(a, b)


def test_vae_precision_is_fp32_on_a_cpu_and_fp16_for_an_overflowing_vae_is_warned_about(tmp_path, caplog):
    import logging

    folder = make_vae(tmp_path / "vae")
    assert load_autoencoder(AutoencoderConfig(path=str(folder))).dtype == torch.float32  # auto: fp32 off a GPU
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "force_upcast": True}))  # as SDXL's VAE says
    with caplog.at_level(logging.WARNING, logger="models.autoencoder"):
        vae = load_autoencoder(AutoencoderConfig(path=str(folder), dtype="fp16"))
    assert vae.dtype == torch.float16 and "force_upcast" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models.autoencoder"):
        load_autoencoder(AutoencoderConfig(path=str(folder), dtype="bf16"))
    assert "force_upcast" not in caplog.text


def test_decoding_non_finite_pixels_is_reported(tmp_path):
    vae = load_autoencoder(AutoencoderConfig(path=str(make_vae(tmp_path / "vae"))))
    with torch.no_grad():
        vae.vae.decoder.conv_out.bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        vae.decode(torch.zeros(1, 4, 4, 4))


# --- latent shards -------------------------------------------------------------------------------------------------

def read_samples(folder: str) -> dict[str, dict]:
    out = {}
    for tar in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def test_precomputed_latents_equal_live_encoding(env):
    manifest = json.loads((Path(env["latents"]) / "manifest.json").read_text())
    vae = load_autoencoder(AutoencoderConfig(path=str(env["vae"])))
    assert manifest["complete"] and manifest["samples"] == 128 and manifest["latent_shape"] == [4, 4, 4]
    assert manifest["vae"]["fingerprint"] == vae.fingerprint and manifest["flip"] and manifest["text"]
    stored = read_samples(env["latents"])
    loader = Loader(DataConfig(shards=env["images"], resolution=RES, num_workers=0, shuffle_buffer=0), 128, 0, 1)
    batch = next(iter(loader))  # every image once, decoded and cropped as the training loader does
    live = vae.encode(batch.pixels())
    live_flip = vae.encode(batch.pixels().flip(-1))
    assert sorted(stored) == sorted(batch.keys)
    for i, key in enumerate(batch.keys):
        z = np.load(__import__("io").BytesIO(stored[key]["latent.npy"]))
        assert z.dtype == np.float16 and z.shape == (4, 4, 4)
        torch.testing.assert_close(torch.from_numpy(z).float(), live[i], rtol=1e-3, atol=2e-3)  # fp16 rounding
        z_flip = np.load(__import__("io").BytesIO(stored[key]["latent_flip.npy"]))
        torch.testing.assert_close(torch.from_numpy(z_flip).float(), live_flip[i], rtol=1e-3, atol=2e-3)
        assert stored[key]["txt"].decode() == batch.captions[i]
        assert json.loads(stored[key]["json"])["original_size"] == list(batch.sizes[i].tolist())


def test_latent_shards_with_bad_samples_skip_and_count_them(env, tmp_path):
    """Wrong shape, NaN, inf, missing, not an .npy: skipped and counted, never trained on."""
    good = read_samples(env["latents"])
    keys = sorted(good)[:4]
    z = np.zeros((4, 4, 4), np.float16)
    bad = {"shape": np.zeros((4, 8, 8), np.float16), "nan": np.full_like(z, np.nan), "inf": np.full_like(z, np.inf)}
    out = tmp_path / "lat"
    out.mkdir()
    import webdataset as wds

    with wds.TarWriter(str(out / "00000.tar")) as sink:
        for name, arr in bad.items():
            sink.write({"__key__": f"bad_{name}", "latent.npy": latent_shards.npy_bytes(arr), "txt": "x",
                        "text.npz": good[keys[0]]["text.npz"]})
        sink.write({"__key__": "bad_missing", "txt": "x", "text.npz": good[keys[0]]["text.npz"]})
        sink.write({"__key__": "bad_npy", "latent.npy": b"not an array", "txt": "x",
                    "text.npz": good[keys[0]]["text.npz"]})
        text = dict(np.load(__import__("io").BytesIO(good[keys[0]]["text.npz"])))
        for name, bad_text in [("short", {**text, "tokens": text["tokens"][:5]}),
                               ("nan", {**text, "pooled": np.full_like(text["pooled"], np.nan)})]:
            sink.write({"__key__": f"bad_text_{name}", "latent.npy": good[keys[0]]["latent.npy"], "txt": "x",
                        "text.npz": latent_shards.npz_bytes(**bad_text)})
        for k in keys:
            sink.write({"__key__": k, **{e: v for e, v in good[k].items() if e != "latent_flip.npy"}})
    manifest = json.loads((Path(env["latents"]) / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "flip": False}))
    loader = Loader(DataConfig(shards=str(out), resolution=RES, num_workers=0, shuffle_buffer=0), 1, 0, 1)
    batches = iter(loader)
    got = [next(batches) for _ in keys]
    assert [b.keys[0] for b in got] == keys and all(b.images is None for b in got)
    assert all(torch.isfinite(b.latents).all() and b.latents.shape == (1, 4, 4, 4) for b in got)
    assert all(b.text["tokens"].shape[0] == 1 for b in got)
    assert loader.skipped == {"bad_latent_shape": 1, "nonfinite_latent": 2, "missing_latent": 1, "bad_latent": 1,
                              "bad_text_embedding": 2}


def test_two_processes_precompute_disjoint_shards_holding_every_good_sample_once(env, tmp_path):
    out = tmp_path / "lat2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "pipeline" / "precompute.py"), "latents", "--config", DEMO, "--out", str(out),
           *base(env["images"], env["vae"])]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    log = res.stdout + res.stderr
    import re

    written = {r: set(re.findall(rf"rank {r}: \S+ → (\d{{5}}\.tar)", log)) for r in (0, 1)}
    assert written[0] and written[1] and not written[0] & written[1]  # each shard encoded by one process
    assert written[0] | written[1] == {f"{i:05d}.tar" for i in range(8)}
    per_shard = [set(read_samples_of(t)) for t in sorted(out.glob("*.tar"))]
    assert len(per_shard) == 8 and sum(map(len, per_shard)) == 128
    assert set().union(*per_shard) == set(read_samples(env["latents"]))  # every good sample once
    assert json.loads((out / "manifest.json").read_text())["samples"] == 128


def read_samples_of(tar: Path) -> list[str]:
    with tarfile.open(tar) as t:
        return sorted({m.name.split(".", 1)[0] for m in t.getmembers()})


def test_interrupted_precompute_reruns_without_redoing_finished_shards(env, tmp_path, monkeypatch):
    out = tmp_path / "lat"
    args = ["latents", "--config", DEMO, "--out", str(out), *base(env["images"], env["vae"])]
    real, calls = precompute.LatentWriter.write_shard, []

    def interrupted(self, url, path):
        if len(calls) == 3:
            path.with_name(path.name + ".tmp").write_bytes(b"half a shard")  # killed while writing the 4th
            raise KeyboardInterrupt
        calls.append(path.name)
        return real(self, url, path)

    monkeypatch.setattr(precompute.LatentWriter, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        precompute.main(args)
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert sorted(done) == calls == ["00000.tar", "00001.tar", "00002.tar"]
    # training refuses the unfinished folder, before anything is written
    with pytest.raises(SystemExit, match="has not finished"):
        train.main(run_args(tmp_path / "run", out, env["vae"]))
    assert not (tmp_path / "run").exists()
    calls.clear()
    monkeypatch.setattr(precompute.LatentWriter, "write_shard", lambda self, url, path: calls.append(path.name) or
                        real(self, url, path))
    precompute.main(args)
    assert calls == [f"{i:05d}.tar" for i in range(3, 8)]  # only the unfinished shards
    assert {n: (out / n).stat().st_mtime_ns for n in done} == done
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["samples"] == 128 and not list(out.glob("*.tmp"))
    # a rerun with another VAE into the same folder is refused and changes nothing
    other = make_vae(tmp_path / "other_vae", seed=1)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(SystemExit, match="another vae"):
        precompute.main(["latents", "--config", DEMO, "--out", str(out), *base(env["images"], other)])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_precompute_refuses_folders_it_would_damage_and_redoes_shards_it_could_not_read(env, tmp_path):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(Path(env["images"]).parent, images)
    spec = str(images / "{00000..00007}.tar")
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for out, match in [(images, "is the folder of the image shards"), (tmp_path / "other", "holds other files")]:
        with pytest.raises(SystemExit, match=match):
            precompute.main(["latents", "--config", DEMO, "--out", str(out), *base(spec, env["vae"])])
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before  # the image shards untouched
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    # a source shard that cannot be read (here: truncated) is written with what could be read, and redone by a rerun
    good = (images / "00007.tar").read_bytes()
    with tarfile.open(images / "00007.tar") as t:
        cut = next(m for m in t.getmembers()[8:] if m.name.endswith(".png"))  # halfway through an image's bytes
    (images / "00007.tar").write_bytes(good[:cut.offset_data + cut.size // 2])
    out = tmp_path / "lat"
    precompute.main(["latents", "--config", DEMO, "--out", str(out), *base(spec, env["vae"])])
    assert json.loads((out / "00007.json").read_text())["skipped"]["truncated_tar"] == 1
    (images / "00007.tar").write_bytes(good)  # the storage recovered
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    precompute.main(["latents", "--config", DEMO, "--out", str(out), *base(spec, env["vae"])])
    changed = sorted(n for n, t in stamps.items() if (out / n).stat().st_mtime_ns != t)
    assert changed == ["00007.tar"] and json.loads((out / "manifest.json").read_text())["samples"] == 128


def test_settings_that_cannot_be_checked_on_latent_shards_are_warned_about(env, tmp_path, caplog):
    import logging

    from data import DataConfig, Loader

    copy = tmp_path / "old"
    shutil.copytree(env["latents"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["transform"]  # a manifest from before the transform was recorded
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        Loader(DataConfig(shards=str(copy), resolution=RES, num_workers=0), 4)
    assert "data.resize_filter cannot be checked against the latents" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        Loader(DataConfig(shards=env["latents"], resolution=RES, num_workers=0), 4)  # the same settings: silent
    assert "cannot be checked" not in caplog.text


def test_latent_shards_need_their_manifest(env, tmp_path):
    """Shards copied without manifest.json (or behind URLs) are latents all the same: a clear error, or the manifest
    named by data.latent_manifest."""
    import shutil

    from data.loader import DataError

    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in Path(env["latents"]).glob("*.tar"):
        shutil.copy(tar, bare)
    with pytest.raises(DataError, match="no manifest.json was found"):
        next(iter(Loader(DataConfig(shards=str(bare), resolution=RES, num_workers=0), 4, 0, 1)))
    loader = Loader(DataConfig(shards=str(bare), resolution=RES, num_workers=0,
                               latent_manifest=str(Path(env["latents"]) / "manifest.json")), 4, 0, 1)
    assert next(iter(loader)).latents.shape == (4, 4, 4, 4)


def test_caption_dropout_with_stored_embeddings_uses_the_empty_caption():
    """Stored embeddings for the captions that dropout kept, the "" embedding where it emptied one."""
    from data.loader import Batch

    g = torch.Generator().manual_seed(0)
    text = {"tokens": torch.randn(3, 5, 2, generator=g).half(), "mask": torch.ones(3, 5, dtype=torch.bool),
            "pooled": torch.randn(3, 2, generator=g).half()}
    empty = {"tokens": torch.full((1, 5, 2), 7.0), "mask": torch.zeros(1, 5, dtype=torch.bool),
             "pooled": torch.full((1, 2), 7.0)}
    batch = Batch(None, ["a", "b", "c"], ["1", "2", "3"], [0] * 3, torch.zeros(3, 2), torch.zeros(3, 4, 2, 2), text)
    cond = train.batch_cond(batch, ["a", "", "c"], encoder=None, empty=empty, device="cpu")
    for k in text:
        assert torch.equal(cond[k][0], text[k][0].to(cond[k].dtype)) and torch.equal(cond[k][2], text[k][2].to(cond[k].dtype))
        assert torch.equal(cond[k][1], empty[k][0].to(cond[k].dtype))
    assert cond["tokens"].dtype == torch.float32 and cond["mask"].dtype == torch.bool


# --- training, sampling, evaluation --------------------------------------------------------------------------------

def first_loss(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_training_from_latent_shards_matches_live_encoding_and_uses_stored_embeddings(env, tmp_path, monkeypatch):
    from models.text_encoders import OpenCLIPTextEncoder

    encoded = []
    real = OpenCLIPTextEncoder.encode
    monkeypatch.setattr(OpenCLIPTextEncoder, "encode", lambda self, c: encoded.extend(c) or real(self, c))
    prompts = 'logging.sample_prompts=["zzz"]'
    train.main(run_args(tmp_path / "shards", env["latents"], env["vae"], prompts))
    assert set(encoded) == {"", "zzz"}  # the captions' embeddings came from the shards ("" for dropout, "zzz": grid)
    encoded.clear()
    train.main(run_args(tmp_path / "live", env["images"], env["vae"], prompts))
    assert len(encoded) > 8  # live: the encoders run on every batch
    a, b = first_loss(tmp_path / "shards"), first_loss(tmp_path / "live")
    assert abs(a - b) <= 2e-3 * abs(b), (a, b)  # the same batch, timesteps and noise; fp16 storage only
    log = (tmp_path / "shards" / "config.yaml").read_text()
    assert "autoencoder" in log


def test_exact_resume_on_latent_shards(env, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(run_args(straight, env["latents"], env["vae"], "data.flip=true", steps=6))
    train.main(run_args(split, env["latents"], env["vae"], "data.flip=true", steps=3))
    # resuming with another VAE (same latent shape: the U-Net would load) or another parameterisation is refused
    other = make_vae(tmp_path / "other_vae", seed=1)
    for extra, what in [([f"autoencoder.path={other}", f"data.shards={env['images']}"], "another autoencoder"),
                        (["diffusion.prediction=epsilon"], "another diffusion")]:
        with pytest.raises(SystemExit, match=what):
            train.main([*run_args(split, env["latents"], env["vae"], "data.flip=true", *extra, steps=6),
                        "--resume", "latest"])
    train.main([*run_args(split, env["latents"], env["vae"], "data.flip=true", steps=6), "--resume", "latest"])
    a, b = (load_file(str(r / "checkpoints" / "step_00000006" / "model.safetensors")) for r in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


def test_sampling_and_evaluation_decode_through_the_bundled_vae(env, tmp_path):
    from PIL import Image

    from pipeline import evaluate, sample
    from pipeline.checkpoint import load_exported

    run = tmp_path / "run"
    train.main(run_args(run, env["latents"], env["vae"], steps=2))
    vae_dir = Path(env["vae"])
    moved = vae_dir.with_name("vae_moved")
    vae_dir.rename(moved)  # the export needs nothing but itself
    try:
        unet, _, _, vae, meta = load_exported(run / "model")
        assert vae is not None and vae.fingerprint == meta["autoencoder"]["fingerprint"]
        assert unet.cfg.in_channels == 4 and meta["resolution"] == RES
        sample.main(["--model", str(run / "model"), "--prompt", "a red circle", "--num-images", "2", "--steps", "2",
                     "--guidance", "1", "3", "--out", str(tmp_path / "samples")])
        files = sorted((tmp_path / "samples" / "images").glob("*.png"))
        assert len(files) == 4 and all(Image.open(f).size == (RES, RES) for f in files)
        result = evaluate.main(["run", "--model", str(run / "model"), "--captions", env["images"], "--num-images", "4",
                                "--guidance", "1", "2", "--ref", env["images"], "--fd-features", "clip",
                                "--clip-model", "openclip:toy-clip", "--clip-config",
                                str(ROOT / "launch/configs/clip/toy-clip.json"), "--steps", "2", "--out",
                                str(tmp_path / "eval"), "--batch-size", "4", "--likelihood", "2",
                                "--elbo-timesteps", "3", "--json"])
        assert [r["n"] for r in result["results"]] == [4, 4]
        nll = result["likelihood"]  # of the latents, and said so
        assert "latents" in nll["space"] and nll["elbo"]["decoder"] == "continuous"
        assert np.isfinite(nll["bits_per_dim"]) and np.isfinite(nll["elbo_bits_per_dim"])
        assert all(np.isfinite(r["fd_clip"]) for r in result["results"])
        assert all(Image.open(f).size == (RES, RES) for f in (tmp_path / "eval" / "guidance_1" / "images").glob("*"))
    finally:
        moved.rename(vae_dir)


# --- bad input: refused before the first step, nothing written is lost ----------------------------------------------

BAD_RUNS = {
    "channels": ("latents", ["model.overrides.in_channels=3"], "takes 3 input channels but the VAE's latents have 4"),
    "vae_factor": ("images", ["data.resolution=18"], "does not divide by the VAE's downsampling factor 4"),
    "unet_levels": ("images", ["data.resolution=24"], "cannot halve"),
    "other_vae": ("latents", ["autoencoder.path=OTHER"], "made by another VAE"),
    "other_scale": ("latents", ["autoencoder.scaling_factor=0.7"], "scaling_factor"),
    "other_resolution": ("latents", ["data.resolution=32"], "'resolution': (16, 32)"),
    "pixel_space": ("latents", ["autoencoder.path=null"], "holds latents"),
    "no_vae": ("images", ["autoencoder.path=/no/such/vae"], "does not exist"),
    "flip_without_flipped": ("noflip", ["data.flip=true"], "hold no mirrored latents"),
    "bad_dtype": ("images", ["autoencoder.dtype=fp8"], "autoencoder.dtype must be"),
    "out_channels": ("latents", ["model.overrides.out_channels=3"], "predicts 3 channels but its input has 4"),
    # image settings the latents were made with cannot apply again: a contradicting one is refused, not ignored
    "resize_filter": ("latents", ["data.resize_filter=lanczos"], "'resize_filter': ('bicubic', 'lanczos')"),
    "min_size": ("latents", ["data.min_size=12"], "'min_size': (0, 12)"),
    "max_aspect": ("latents", ["data.max_aspect=1.5"], "other image settings"),
    "caption_keys": ("latents", ["data.caption_keys=[json.caption]"], "'caption_keys'"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_latent_runs_fail_before_the_first_step(env, tmp_path, case):
    shards, extra, message = BAD_RUNS[case]
    if shards == "noflip":
        noflip = tmp_path / "noflip"
        precompute.main(["latents", "--config", DEMO, "--out", str(noflip), *base(env["images"], env["vae"])])
        shards = str(noflip)
    else:
        shards = env[shards]
    if "autoencoder.path=OTHER" in extra:
        extra = [f"autoencoder.path={make_vae(tmp_path / 'other', seed=1)}"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")  # an existing run folder: nothing in it is touched
    with pytest.raises(SystemExit) as e:
        train.main(run_args(run, shards, env["vae"], *extra))
    assert message in str(e.value) and str(e.value).count("\n") == 0
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
