"""Evaluation: FID equal to pytorch-fid's (same random-but-spread Inception weights as a local file), Fréchet distance
vs scipy's sqrtm formula, CLIP score vs a direct transformers computation, precision/recall vs a brute-force reference,
the whole job end to end (and resumable), bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from data.folders import held_out_captions
from helpers import threads
from metrics.fid import FID_WEIGHTS_NAME, FeatureStats, frechet_distance, load_stats, save_stats
from metrics.prdc import precision_recall
from pipeline import evaluate

ROOT = Path(__file__).resolve().parents[1]


def random_inception(path: Path, seed: int = 0, batch_norms: bool = False) -> Path:
    """pytorch-fid's FID Inception architecture with random Kaiming-normal convs (random default init makes every
    feature collapse to a constant) and, with ``batch_norms``, random BatchNorm statistics; saved as a local file."""
    import torchvision
    from pytorch_fid import inception

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(torchvision.models.Inception3, "load_state_dict", lambda self, *a, **k: None):
        net = inception.fid_inception_v3()
    gen = torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, generator=gen)
        if batch_norms and isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 0.1, generator=gen)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return random_inception(tmp_path_factory.mktemp("weights") / "random_inception.pth")


def _images(folder: Path, n: int, seed: int, size=32, shift=0.0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.uniform(0, 255, (4, 4, 3))
        img = Image.fromarray(base.astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        arr = np.clip(np.asarray(img, dtype=np.float64) + shift + rng.normal(0, 20, (size, size, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    return _images(d / "a", 12, 0), _images(d / "b", 10, 1, shift=40.0)


def pytorch_fid_stats(path, weights: Path, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-fid's own (μ, Σ) of a folder or .npz, its Inception loaded from the torch-hub cache where we put the
    same file."""
    from pytorch_fid.fid_score import compute_statistics_of_path
    from pytorch_fid.inception import InceptionV3

    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True, exist_ok=True)
    target = hub / "checkpoints" / FID_WEIGHTS_NAME
    if not target.exists():
        target.symlink_to(weights)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
        return compute_statistics_of_path(str(path), model, 7, 2048, "cpu", num_workers=0)
    finally:
        torch.hub.set_dir(old)


def assert_same_stats(got: tuple, ref: tuple, rtol=1e-3):
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * np.abs(r).max())


def test_fid_equals_pytorch_fid_and_npz_interchange(folders, inception_weights, tmp_path):
    """Our FID = pytorch-fid's (its features and its scipy-sqrtm Fréchet distance: 13 s of a 2048² sqrtm, so once);
    our .npz reads in pytorch-fid as the statistics it computes itself; batch size does not matter."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    a, b = folders
    ours = evaluate.main(["fid", str(a), str(b), "--inception-weights", str(inception_weights), "--json"])["fid"]
    ref_a, ref_b = (pytorch_fid_stats(p, inception_weights, tmp_path) for p in (a, b))
    ref = calculate_frechet_distance(*ref_a, *ref_b)
    assert ref > 1e-3 and abs(ours - ref) / ref < 1e-3, (ours, ref)
    stats = tmp_path / "a_stats.npz"
    evaluate.main(["ref-stats", str(a), "--out", str(stats), "--inception-weights", str(inception_weights), "--json"])
    assert_same_stats(pytorch_fid_stats(stats, inception_weights, tmp_path), ref_a)
    again = evaluate.main(["fid", str(stats), str(b), "--inception-weights", str(inception_weights), "--batch-size", "3",
                           "--json"])["fid"]
    assert abs(again - ours) / ours < 1e-6


def test_rgba_folders_read_as_pytorch_fid_reads_them(folders, inception_weights, tmp_path):
    """PNGs with an alpha channel: read as pytorch-fid reads them (PIL's convert("RGB") drops the alpha), not
    composited on white, so the statistics (hence the FID) of the same folder are pytorch-fid's."""
    a, _ = folders
    dst = tmp_path / "a_rgba"
    dst.mkdir()
    for i, path in enumerate(sorted(a.glob("*.png"))):
        img = Image.open(path).convert("RGBA")
        img.putalpha(Image.fromarray(np.full(img.size[::-1], 40 + 15 * i, np.uint8)))
        img.save(dst / path.name)
    ours = tmp_path / "ours.npz"
    evaluate.main(["ref-stats", str(dst), "--out", str(ours), "--inception-weights", str(inception_weights), "--json"])
    got = load_stats(ours)
    assert_same_stats((got.mu, got.sigma), pytorch_fid_stats(dst, inception_weights, tmp_path))


def test_features_equal_pytorch_fids_network_with_batch_norms_folded(tmp_path):
    """Our extractor folds the BatchNorms into the convolutions and runs channels_last: the features must still equal
    pytorch-fid's own InceptionV3 on the same file — here with non-trivial BatchNorm statistics, which the random
    weights of the other tests leave at their defaults."""
    from pytorch_fid import inception

    from metrics.fid import InceptionFeatures

    path = random_inception(tmp_path / "inception.pth", seed=1, batch_norms=True)
    ours = InceptionFeatures(str(path))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules())
    with mock.patch.object(inception, "load_state_dict_from_url",
                           lambda *a, **k: torch.load(path, map_location="cpu", weights_only=True)):
        ref_net = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ref_net(images)[0].flatten(1)
    got = ours(images)
    assert ref.std() > 1e-3  # the features are spread, so the comparison means something
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_fid_same_with_two_processes(folders, inception_weights):
    a, b = folders
    with threads(1):  # the kernels each of the two processes runs (OMP_NUM_THREADS=1)
        one = evaluate.main(["fid", str(a), str(b), "--inception-weights", str(inception_weights), "--json"])["fid"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "pipeline/evaluate.py", "fid", str(a), str(b), "--inception-weights", str(inception_weights),
                          "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads(res.stdout.strip().splitlines()[-1])
    assert two["n_a"] == 12 and abs(two["fid"] - one) / one < 1e-6


@pytest.mark.parametrize("n,d", [(400, 32), (20, 64), (300, 256)])
def test_frechet_distance_matches_sqrtm_formula(n, d):
    rng = np.random.default_rng(n + d)
    a = FeatureStats.of(rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3)
    b = FeatureStats.of(rng.normal(size=(n, d)) * 1.5 + 0.3)
    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma).real
    ref = ((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean)
    assert abs(frechet_distance(a, b) - ref) / abs(ref) < 1e-6
    assert abs(frechet_distance(a, a)) < 1e-6 * abs(ref)


@pytest.mark.parametrize("n_a,n_b", [(10, 30), (30, 10), (40, 200)])
def test_frechet_distance_through_the_images_equals_the_full_covariance_route(n_a, n_b):
    """Fewer images than features: tr (Σ_a Σ_b)^{1/2} from the n × n matrix A Σ_b Aᵀ equals the D × D route (statistics
    read from an .npz, which keep no images), whichever side has the fewer images or only one side has them."""
    rng = np.random.default_rng(n_a + n_b)
    d = 64
    a = FeatureStats.of(rng.normal(size=(n_a, d)) @ rng.normal(size=(d, d)) * 0.3)
    b = FeatureStats.of(rng.normal(size=(n_b, d)) * 1.5 + 0.3)
    assert a.root is not None and (b.root is not None) == (n_b <= d)
    full = [FeatureStats(s.mu, s.sigma, s.n) for s in (a, b)]  # as load_stats returns them
    ref = frechet_distance(*full)
    assert ref > 1
    for x, y in [(a, b), (b, a), (a, full[1]), (full[0], b), (full[1], a)]:
        # (the D × D route takes √ of D − n eigenvalues that should be 0 and are ±1e-14: ~1e-8 relative)
        assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)


def test_precision_recall_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(60, 5)), rng.normal(size=(50, 5)) * 1.4 + 0.5
    k = 3

    def radii(x):
        return np.array([np.sort(np.linalg.norm(x - p, axis=1))[k] for p in x])

    def coverage_of(points, centres, r):
        return np.mean([any(np.linalg.norm(p - c) <= rc for c, rc in zip(centres, r)) for p in points])

    r_real, r_fake = radii(real), radii(fake)
    ref_p, ref_r = coverage_of(fake, real, r_real), coverage_of(real, fake, r_fake)
    inside = np.array([[np.linalg.norm(f - c) <= rc for c, rc in zip(real, r_real)] for f in fake])
    got = precision_recall(real, fake, k=k, density_coverage=True, chunk=7)
    assert got["precision"] == pytest.approx(ref_p) and got["recall"] == pytest.approx(ref_r)
    assert got["density"] == pytest.approx(inside.sum() / (k * len(fake)))
    assert got["coverage"] == pytest.approx(inside.any(0).mean())
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1
    same = precision_recall(real, real, k=k)
    assert same == {"precision": 1.0, "recall": 1.0}


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A tiny randomly initialised Hugging Face CLIP saved with its processor (tokenizer from OpenCLIP's BPE)."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPVisionConfig)

    from tests.helpers import write_hf_tokenizer

    d = tmp_path_factory.mktemp("hfclip")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                num_hidden_layers=2, vocab_size=49408).to_dict(),
                     vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                    num_hidden_layers=2, image_size=32, patch_size=8).to_dict(),
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(d)
    tokenizer = write_hf_tokenizer(d)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(d)
    return d


def test_clip_score_matches_a_direct_computation(folders, hf_clip, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    a, _ = folders
    files = sorted(a.glob("*.png"))[:10]
    captions = [f"a picture number {i} with colours" for i in range(len(files))]
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps({"file": f.name, "caption": c}) + "\n"
                                                 for f, c in zip(files, captions)))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for f in files:
        (imgs / f.name).write_bytes(f.read_bytes())
    got = evaluate.main(["clip-score", "--images", str(imgs), "--captions", str(tmp_path / "caps.jsonl"),
                         "--clip-model", str(hf_clip), "--json"])
    model, proc = CLIPModel.from_pretrained(hf_clip), CLIPProcessor.from_pretrained(hf_clip)
    with torch.no_grad():
        out = model(**proc(text=captions, images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt",
                           padding=True))
    direct = (out.image_embeds * out.text_embeds).sum(-1) / (out.image_embeds.norm(dim=-1) * out.text_embeds.norm(dim=-1))
    assert got["clip_cosine_mean"] == pytest.approx(direct.mean().item(), abs=1e-4)
    assert got["clip_score"] == pytest.approx(max(100 * direct.mean().item(), 0), abs=1e-2)
    assert str(hf_clip) in got["clip_model"]
    # same-named .txt captions work too
    for f, c in zip(files, captions):
        (imgs / f.name).with_suffix(".txt").write_text(c)
    txt = evaluate.main(["clip-score", "--images", str(imgs), "--clip-model", str(hf_clip), "--json"])
    assert txt["clip_cosine_mean"] == pytest.approx(got["clip_cosine_mean"], abs=1e-6)


def test_clip_score_with_openclip(folders, tmp_path):
    a, _ = folders
    for f in sorted(a.glob("*.png"))[:4]:
        (tmp_path / f.name).write_bytes(f.read_bytes())
        (tmp_path / f.name).with_suffix(".txt").write_text("a red circle")
    got = evaluate.main(["clip-score", "--images", str(tmp_path), "--clip-model", "openclip:toy-clip",
                         "--clip-config", str(ROOT / "launch/configs/clip/toy-clip.json"), "--json"])
    assert -1 <= got["clip_cosine_mean"] <= 1 and got["clip_score"] == max(100 * got["clip_cosine_mean"], 0)
    assert got["clip_model"].startswith("openclip:toy-clip")


def test_whole_job_end_to_end_and_resumable(inception_weights, tmp_path):
    from data.write_shards import write_toy
    from pipeline import train

    write_toy(tmp_path / "shards", count=48, resolution=16, max_samples=12)
    write_toy(tmp_path / "held_out", count=8, resolution=16, seed=99, max_samples=8)
    run = tmp_path / "run"
    train.main(["--config", str(ROOT / "launch/configs/demo.yaml"), "--output-dir", str(run), "--max-steps", "3",
                f"data.shards={tmp_path / 'shards'}", "data.resolution=16", "data.num_workers=0", "optim.batch_size=8",
                "logging.tracker=none", "logging.sample_every=0", "logging.sample_steps=2"])
    argv = ["run", "--model", str(run / "model"), "--captions", str(tmp_path / "held_out" / "00000.tar"),
            "--num-images", "6", "--guidance", "1", "4", "--ref", str(tmp_path / "held_out" / "00000.tar"),
            "--inception-weights", str(inception_weights), "--clip-model", "openclip:toy-clip",
            "--clip-config", str(ROOT / "launch/configs/clip/toy-clip.json"), "--steps", "3", "--out",
            str(tmp_path / "eval"), "--batch-size", "4", "--likelihood", "3", "--elbo-timesteps", "4", "--json"]
    first = evaluate.main(argv)
    out = tmp_path / "eval"
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["guidance"] for r in rows] == [1.0, 4.0]
    for r in rows:
        assert r["n"] == 6 and r["fid"] > 0 and {"clip_score", "clip_cosine_mean", "precision", "recall"} <= r.keys()
    assert (out / "results.csv").read_text().splitlines()[0].startswith("guidance,n,fid")
    assert Image.open(out / "fid_vs_clip.png").size[0] > 100
    # toy captions: per-attribute accuracy of each guidance scale's images, and the real held-out images' row
    from metrics.toy_attributes import ATTRIBUTES, attribute_accuracy

    captions = held_out_captions(str(tmp_path / "held_out" / "00000.tar"), 6)
    for r in rows:
        records = [json.loads(line) for line in (out / f"guidance_{r['guidance']:g}" / "metadata.jsonl")
                   .read_text().splitlines()]  # every image with its caption and seed
        assert [m["prompt"] for m in records] == captions and len({m["seed"] for m in records}) == 6
        assert all((out / f"guidance_{r['guidance']:g}" / m["file"]).is_file() and m["guidance"] == r["guidance"]
                   for m in records)
        files = sorted((out / f"guidance_{r['guidance']:g}" / "images").glob("*.png"))
        want = attribute_accuracy([Image.open(f) for f in files], captions)
        assert {f"attr_{k}": v for k, v in want.items()} == {k: r[k] for k in r if k.startswith("attr_")}
    real = first["real"]
    assert real["n"] == 6 and real["clip_score"] >= 0
    nll = first["likelihood"]  # bits/dim of the reference images, asked for with --likelihood
    assert nll["num_images"] == 3 and "8-bit pixels" in nll["space"]
    assert np.isfinite(nll["bits_per_dim"]) and np.isfinite(nll["elbo_bits_per_dim"])
    assert (out / "likelihood.csv").read_text().splitlines()[0].startswith("num_images,bits_per_dim")
    assert all(real[f"attr_{a}"] == 1.0 for a in ATTRIBUTES) and real["attr_all"] == 1.0
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if "images" in p.parts}
    assert len(stamps) == 12
    second = evaluate.main([*argv[:argv.index("--likelihood")], "--json"])  # (the likelihood: 6 s, tested above)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if "images" in p.parts} == stamps  # nothing new
    assert second["results"] == first["results"]
    # other sampling settings into the same folder: refused (its images would be reused as if made with them)
    with pytest.raises(SystemExit, match=r"other settings \(guidance_interval: None → \[0.3, 3.0\]\)"):
        evaluate.main([*argv, "--guidance-interval", "0.3", "3"])
    with pytest.raises(SystemExit, match="other settings \\(captions: "):  # another caption set
        evaluate.main([*argv[:argv.index("--num-images") + 1], "5", *argv[argv.index("--num-images") + 2:]])
    (out / "guidance_1" / "settings.json").rename(out / "settings.kept")  # images, but nothing says how they were made
    with pytest.raises(SystemExit, match="holds images but no settings.json"):
        evaluate.main(argv)
    (out / "settings.kept").rename(out / "guidance_1" / "settings.json")
    from safetensors.torch import load_file, save_file  # the model retrained in place to the same step

    ema = run / "model" / "unet_ema.safetensors"
    kept = ema.read_bytes()
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in load_file(ema).items()}, str(ema))
    with pytest.raises(SystemExit, match="other settings \\(weights: "):
        evaluate.main(argv)
    ema.write_bytes(kept)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if "images" in p.parts} == stamps
    # guidance in a limited interval and guidance rescale reach the images, and results.json records them
    cut = argv[:argv.index("--likelihood")] + ["--guidance-interval", "0.3", "3", "--guidance-rescale", "0.5"]
    cut[cut.index("--out") + 1] = str(tmp_path / "eval_interval")
    third = evaluate.main(cut)
    assert (third["guidance_interval"], third["guidance_rescale"]) == ([0.3, 3.0], 0.5)
    for g, same in (("1", True), ("4", False)):  # w = 1 has nothing to restrict
        a, b = (sorted((o / f"guidance_{g}" / "images").glob("*.png")) for o in (out, tmp_path / "eval_interval"))
        assert len(a) == len(b) == 6
        assert same == all(np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y))) for x, y in zip(a, b))


def test_unofficial_file_under_the_official_name_is_warned_about(inception_weights, tmp_path, caplog):
    from metrics.fid import check_sha256

    named = tmp_path / FID_WEIGHTS_NAME
    named.write_bytes(inception_weights.read_bytes())
    with caplog.at_level("WARNING"):
        check_sha256(named)
        check_sha256(inception_weights)  # another name: no claim to check
    assert [r.getMessage() for r in caplog.records if "not the official" in r.getMessage()] != []
    assert len(caplog.records) == 1


def test_bad_input(folders, inception_weights, tmp_path):
    a, b = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="holds no images"):
        evaluate.main(["fid", str(empty), str(b), "--inception-weights", str(inception_weights)])
    with pytest.raises(SystemExit, match="do not exist"):
        evaluate.main(["fid", str(a), str(b), "--inception-weights", str(tmp_path / "missing.pth")])
    with mock.patch.object(torch.hub, "get_dir", lambda: str(tmp_path / "nohub")), \
            pytest.raises(SystemExit, match="not available offline: looked for .*pt_inception"):
        evaluate.main(["fid", str(a), str(b)])
    s64 = tmp_path / "s64.npz"
    save_stats(FeatureStats(np.zeros(64), np.eye(64), 10), s64)
    with pytest.raises(SystemExit, match="different dimensions"):
        evaluate.main(["fid", str(s64), str(b), "--inception-weights", str(inception_weights)])
    assert load_stats(s64).n == 10
    broken = tmp_path / "broken"
    _images(broken, 5, 3)
    (broken / "0005.png").write_bytes(b"not a png")
    (broken / "0006.jpg").write_bytes(open(broken / "0000.png", "rb").read()[:100])
    got = evaluate.main(["fid", str(broken), str(b), "--inception-weights", str(inception_weights), "--json"])
    assert got["n_a"] == 5 and got["skipped"] == {"not_an_image": 1, "corrupt_image": 1}
    (broken / "0005.png").unlink()
    (broken / "0006.jpg").unlink()
    (tmp_path / "caps.jsonl").write_text(json.dumps({"file": "0000.png", "caption": "x"}) + "\n")
    with pytest.raises(SystemExit, match="no caption for 4 of 5"):
        evaluate.main(["clip-score", "--images", str(broken), "--captions", str(tmp_path / "caps.jsonl"),
                       "--clip-model", "openclip:toy-clip", "--clip-config",
                       str(ROOT / "launch/configs/clip/toy-clip.json")])
