"""Aspect-ratio buckets on streaming shards: mixed-shape images written here (landscape, portrait, square, extreme
ratios, tiny ones); every batch of one shape, each sample in its nearest bucket, exact resume with partly filled
buckets, the same bucket on every process (real processes), latents at their bucket's shape, bad input in one line."""

import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import DataConfig, Loader
from data.buckets import choose_bucket, generate_buckets, nearest_bucket, parse_buckets

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(96, 48), (48, 96), (64, 64), (128, 32), (32, 128), (80, 60), (60, 80), (12, 10), (72, 40)]
BUCKETS = [[32, 64], [48, 48], [64, 32], [40, 56], [56, 40]]


def write_mixed(folder: Path, shards: int = 8, per_shard: int = 18, seed: int = 0) -> str:
    """Shards of images of many shapes; each image a red disc on white centred in the frame, its caption naming the
    shape it was made at (so a test can find a sample's original size in its caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = 0
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for _ in range(per_shard):
                w, h = SHAPES[int(rng.integers(len(SHAPES)))]
                img = Image.new("RGB", (w, h), "white")
                r = min(w, h) // 3
                img.paste((220, 20, 20), (w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r))
                buf = io.BytesIO()
                img.save(buf, "PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", f"a red square, {w}x{h}".encode())):
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return write_mixed(tmp_path_factory.mktemp("mixed") / "shards")


def cfg(shards, workers=0, **kw):
    return DataConfig(shards=shards, resolution=48, num_workers=workers, shuffle_buffer=8, buckets=BUCKETS, streams=2,
                      **kw)


def steps(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_generated_buckets_have_the_area_and_the_step():
    buckets = generate_buckets(256, 64, max_aspect=2.0)
    assert (256, 256) in buckets and all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(0.5 <= w / h <= 2.0 and 0.7 < w * h / 256**2 < 1.35 for w, h in buckets)
    assert buckets == sorted(buckets, key=lambda b: b[0] / b[1]) and len(buckets) >= 3
    assert nearest_bucket((1000, 500), buckets) == buckets.index(max(buckets, key=lambda b: -abs(math.log(b[0] / b[1])
                                                                                                  - math.log(2))))
    assert choose_bucket([[3, 5, 0], [4, 5, 11]]) == 2 and choose_bucket([[3, 5, 0], [4, 5, 9]]) == 1 and choose_bucket([[2, 2], [2, 2]]) == 0  # ties: the first


@pytest.mark.parametrize("spec,message", [([[50, 64]], "not a multiple of 8"), ([], "non-empty list"),
                                          ("square", "'auto' or a non-empty list"), ([[64, 64], [64, 64]], "twice"),
                                          ([[64, 0]], "positive integers"), ("auto", None)])
def test_bad_bucket_lists_are_one_clear_line(spec, message):
    if message is None:  # auto without a step
        with pytest.raises(ValueError, match="needs data.bucket_step"):
            parse_buckets(spec, 64, 0, 2.0)
        return
    with pytest.raises(ValueError, match=message):
        parse_buckets(spec, 64, 8, 2.0)


def test_every_batch_is_one_shape_and_each_sample_its_nearest_bucket(mixed):
    loader = Loader(cfg(mixed), 4)
    seen = set()
    for batch in steps(loader, 30):
        shape = tuple(batch.images.shape[-2:])  # (h, w)
        bucket = [shape[1], shape[0]]
        assert batch.images.shape[0] == 4 and bucket in BUCKETS
        for (w, h), caption in zip(batch.sizes.tolist(), batch.captions):
            assert caption.endswith(f"{w}x{h}")  # the original size travels with the sample
            assert BUCKETS[nearest_bucket((w, h), [tuple(b) for b in BUCKETS])] == bucket
        seen.add(tuple(bucket))
    assert len(seen) >= 4  # landscape, portrait and square batches
    assert loader.waiting >= 0 and "bucket_waiting" not in loader.skipped
    micro = batch.micro()
    assert micro.shape == (4, 6) and micro[:, 4:].tolist() == [[shape[0], shape[1]]] * 4


@pytest.mark.parametrize("workers,stop", [(0, 7), (2, 5)])
def test_exact_resume_with_partly_filled_buckets_equals_a_straight_run(mixed, workers, stop):
    straight = steps(Loader(cfg(mixed, workers), 4), 24)
    first = Loader(cfg(mixed, workers), 4)
    head = steps(first, stop)
    state = json.loads(json.dumps(first.state_dict()))
    assert sum(map(len, state["queued"].values())) == first.waiting > 0  # samples waiting in their buckets
    tail = steps(Loader(cfg(mixed, workers), 4, state=state), 24 - stop)
    for a, b in zip(straight, head + tail):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and a.index == b.index


def test_the_original_size_is_the_files_own_under_jpeg_draft():
    """A big JPEG decodes drafted (smaller, faster); SDXL's original-size conditioning must see its real size."""
    from data.loader import SampleTransform

    img = Image.new("RGB", (1024, 512), "white")
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    raw = {"__key__": "big", "jpg": buf.getvalue(), "txt": b"a photo"}
    c = DataConfig(shards="unused", resolution=48, buckets=BUCKETS)
    assert c.jpeg_draft
    smp = SampleTransform(c, buckets=[tuple(b) for b in BUCKETS]).sample(raw, 0)
    assert smp.size == (1024, 512) and tuple(smp.x.shape) == (32, 64, 3)


@pytest.mark.parametrize("kw,message", [({"max_aspect": 0.5}, "max_aspect .*≥ 1"), ({"bucket_step": -8}, "bucket_step"),
                                        ({"buckets": [[48, 48], [48, 48]]}, "twice")])
def test_bad_bucket_settings_are_refused_with_the_config(kw, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(shards="unused", resolution=48, **kw).validate()


def test_a_waiting_sample_unreadable_on_resume_is_skipped_not_a_hang(mixed, tmp_path):
    """Samples waiting in bucket queues are read again on resume; one that no longer decodes (a changed file, or a
    remote shard given up on) is counted as skipped and the run goes on."""
    import shutil
    import threading

    first = Loader(cfg(mixed), 4)
    steps(first, 7)
    state = json.loads(json.dumps(first.state_dict()))
    waiting = {t[0].key for qs in first._queues.values() for q in qs for t in q}
    assert waiting
    src = Path(mixed.split("{")[0])
    dst = tmp_path / "shards"
    shutil.copytree(src, dst)
    for path in sorted(dst.glob("*.tar")):  # every waiting sample's image made unreadable
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(path, "w") as tar:
            for m, data in members:
                if m.name.endswith(".png") and m.name.split(".")[0] in waiting:
                    data = b"not a png"
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
    shards = str(dst / mixed.split("/")[-1])
    out = []
    thread = threading.Thread(target=lambda: out.append(steps(Loader(cfg(shards), 4, state=state), 3)), daemon=True)
    thread.start()
    thread.join(120)
    assert out and len(out[0]) == 3, "the resumed loader did not give its batches"
    assert all(k not in waiting for b in out[0] for k in b.keys)


def test_a_resume_with_other_buckets_is_refused(mixed):
    loader = Loader(cfg(mixed), 4)
    steps(loader, 2)
    other = DataConfig(shards=mixed, resolution=48, num_workers=0, shuffle_buffer=8, buckets=BUCKETS[:3], streams=2)
    with pytest.raises(ValueError, match="does not fit this run.*buckets"):
        Loader(other, 4, state=loader.state_dict())


SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
from data import DataConfig, Loader
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = DataConfig(shards={shards!r}, resolution=48, num_workers=1, shuffle_buffer=8, buckets={buckets!r}, streams=2)
loader = Loader(cfg, {batch}, rank=rank, world_size=world)
it = iter(loader)
out = [(list(b.images.shape[-2:]), b.keys) for b in (next(it) for _ in range(12))]
json.dump(out, open({out!r} + str(rank), "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_see_the_same_bucket_at_each_step_and_the_one_process_sequence(mixed, tmp_path):
    reference = [(list(b.images.shape[-2:]), b.keys) for b in steps(Loader(cfg(mixed), 4), 12)]
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT.format(root=str(ROOT), shards=mixed, buckets=BUCKETS, batch=2, out=str(tmp_path / "r")))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"r{r}").read_text()) for r in (0, 1))
    assert [s for s, _ in r0] == [s for s, _ in r1]  # the same shape at every step on both ranks
    assert [(s, k0 + k1) for (s, k0), (_, k1) in zip(r0, r1)] == reference  # = the 1-process run (2 streams)


# --- size and crop conditioning (SDXL's micro-conditioning) ------------------------------------------------------

MICRO_FAMILIES = {"unet": {"size": "tiny", "overrides": {}},
                  "diffusers": {"size": "sd", "overrides": {"block_out_channels": [32, 32], "layers_per_block": 1,
                                                            "norm_num_groups": 8, "attention_head_dim": 8,
                                                            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                                                            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}}}


@pytest.mark.parametrize("family", list(MICRO_FAMILIES))
def test_size_conditioning_starts_neutral_then_steers_and_missing_means_none(family):
    from models.registry import build, model_config

    spec = MICRO_FAMILIES[family]
    torch.manual_seed(0)
    net = build(model_config(spec["size"], in_channels=3, context_dim=32, pooled_dim=None, micro_conditioning=True,
                             **spec["overrides"])).eval()
    if family == "diffusers":  # SDXL's own layers, so its size embedding's weights have SDXL's names
        assert any(k.startswith("unet.add_embedding.") for k in net.state_dict())
    last = net.micro_embed[-1] if family == "unet" else net.unet.add_embedding.linear_2
    for p in net.parameters():  # a trained network: no zero layers left but the size embedding's last
        if not p.any() and p is not last.weight and p is not last.bias:
            torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    cond = {"tokens": torch.randn(2, 5, 32), "mask": torch.ones(2, 5, dtype=torch.bool)}
    micro = torch.tensor([[96.0, 48.0, 12.0, 0.0, 16.0, 16.0], [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
    with torch.no_grad():
        plain = net(x, t, cond)
        assert torch.equal(net(x, t, {**cond, "micro": micro}), plain)  # zero last layer: a fine-tune starts as it was
        torch.nn.init.normal_(last.weight, std=0.5)
        steered = net(x, t, {**cond, "micro": micro})
        assert (steered - net(x, t, {**cond, "micro": micro.flip(0)})).abs().amax() > 1e-3  # the numbers matter
        assert torch.equal(net(x, t, cond), net(x, t, {**cond, "micro": torch.zeros(2, 6)}))  # absent = the null
        with pytest.raises(ValueError, match="micro"):
            net(x, t, {**cond, "micro": torch.zeros(2, 4)})


def test_size_conditioning_is_each_samples_and_dropped_with_its_caption():
    from data.loader import Batch
    from pipeline.train import batch_micro

    images = torch.zeros(3, 3, 32, 64, dtype=torch.uint8)  # a 64×32 (w×h) bucket
    batch = Batch(images, ["a", "b", "c"], ["k0", "k1", "k2"], [0, 0, 0], torch.tensor([[200, 90], [64, 32], [10, 8]]),
                  boxes=torch.tensor([[0, 5], [0, 0], [3, 1]]))
    micro = batch_micro(batch, ["a", "", "c"], None, "cpu")
    assert micro.tolist() == [[90, 200, 0, 5, 32, 64], [0] * 6, [8, 10, 3, 1, 32, 64]]
    latents = Batch(None, ["a"], ["k"], [0], torch.tensor([[100, 50]]), latents=torch.zeros(1, 4, 8, 16),
                    boxes=torch.tensor([[2, 4]]))
    assert latents.micro(factor=8).tolist() == [[50, 100, 2, 4, 64, 128]]  # the target in pixels, not latents


def test_sampling_asks_for_the_output_size_and_leaves_the_unconditional_branch_without(tmp_path):
    from diffusion import DiffusionConfig, GaussianDiffusion
    from models.registry import build, model_config
    from pipeline.generate import generate, micro_conditioning

    net = build(model_config("tiny", in_channels=3, context_dim=8, pooled_dim=None, micro_conditioning=True))
    seen = []

    class Recorder(torch.nn.Module):
        cfg = net.cfg

        def forward(self, x, t, cond):
            seen.append(cond["micro"].clone())
            return net(x, t, cond)

    class Encoder:
        def encode(self, captions):
            return {"tokens": torch.ones(len(captions), 3, 8), "mask": torch.ones(len(captions), 3, dtype=torch.bool)}

    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_steps=50))
    images = generate(Recorder(), Encoder(), diffusion, ["a", "b"], [0, 1], (24, 8), guidance=3.0, steps=2,
                      device=torch.device("cpu"))
    assert images.shape == (2, 3, 8, 24)
    assert seen[0].tolist() == [[8, 24, 0, 0, 8, 24]] * 2 + [[0] * 6] * 2  # conditional rows, then the null
    assert micro_conditioning(net, (24, 8), original=[48, 16], crop=[2, 3]) == [16, 48, 2, 3, 8, 24]
    plain = build(model_config("tiny", in_channels=3, context_dim=8, pooled_dim=None))
    assert micro_conditioning(plain, (24, 8)) is None
    with pytest.raises(ValueError, match="micro_conditioning=true"):
        micro_conditioning(plain, (24, 8), crop=[0, 4])


# --- the jobs: training, latents, sampling and evaluation at bucket shapes ------------------------------------------

def train_args(shards, run, *extra, steps=4, config="demo.yaml"):
    base = [f"data.shards={shards}", "data.resolution=16", "data.num_workers=1", "data.shuffle_buffer=8",
            "data.streams=2", "data.buckets=auto", "model.overrides.micro_conditioning=true", "optim.batch_size=4",
            "optim.warmup_steps=1", "logging.tracker=none", "logging.every=1", "logging.sample_every=0",
            "logging.sample_steps=2", "logging.sample_per_prompt=1", "checkpoint.every=2"]
    given = {e.split("=", 1)[0] for e in extra}
    return ["--config", str(ROOT / "launch" / "configs" / config), "--output-dir", str(run), "--max-steps",
            str(steps), *[b for b in base if b.split("=", 1)[0] not in given], *extra]


@pytest.mark.slow
def test_training_with_buckets_resumes_exactly_and_samples_and_evaluates_at_bucket_shapes(mixed, tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import load_file

    from pipeline import evaluate, sample, train

    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(train_args(mixed, straight))
    train.main(train_args(mixed, split, steps=2))
    train.main([*train_args(mixed, split), "--resume", "latest"])
    a, b = (load_file(str(r / "checkpoints" / "step_00000004" / "model.safetensors")) for r in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # partly filled buckets restored
    assert any(k.startswith("micro_embed.") for k in a)
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all("bucket_waiting" in m for m in metrics if "loss" in m)
    # auto buckets at 16 px, sides multiples of 4 (the tiny U-Net halves twice): 12×20, 16×16, 20×12; the grid's
    # columns are the tallest, the square and the widest, each on a 20×20 tile (+1 px padding), one row per prompt
    grid = Image.open(next((straight / "samples").glob("*.png")))
    assert grid.size == (3 * 21 + 1, 4 * 21 + 1)

    sample.main(["--model", str(straight / "model"), "--prompt", "a red square", "--width", "20", "--height", "12",
                 "--guidance", "1", "3", "--steps", "2", "--out", str(tmp_path / "samples")])
    files = sorted((tmp_path / "samples" / "images").glob("*.png"))
    assert len(files) == 2 and all(Image.open(f).size == (20, 12) for f in files)
    meta = json.loads((tmp_path / "samples" / "metadata.jsonl").read_text().splitlines()[0])
    assert meta["micro"] == [12, 20, 0, 0, 12, 20] and (meta["width"], meta["height"]) == (20, 12)
    with pytest.raises(SystemExit, match="multiples of 4"):
        sample.main(["--model", str(straight / "model"), "--prompt", "x", "--width", "18", "--out", str(tmp_path / "x")])

    result = evaluate.main(["run", "--model", str(straight / "model"), "--captions", mixed, "--num-images", "4",
                            "--guidance", "2", "--ref", mixed, "--max-ref-images", "8", "--fd-features", "clip",
                            "--clip-model", "openclip:toy-clip", "--clip-config",
                            str(ROOT / "launch/configs/clip/toy-clip.json"), "--steps", "2", "--width", "12",
                            "--height", "20", "--out", str(tmp_path / "eval"), "--batch-size", "4", "--json"])
    assert (result["width"], result["height"]) == (12, 20) and result["results"][0]["n"] == 4
    assert all(Image.open(f).size == (12, 20) for f in (tmp_path / "eval" / "guidance_2" / "images").glob("*.png"))
    # a folder reference is taken as it is (only shards are cropped to the generated shape): said, not silent
    capsys.readouterr()
    evaluate.main(["run", "--model", str(straight / "model"), "--captions", mixed, "--num-images", "4",
                   "--guidance", "2", "--ref", str(tmp_path / "eval" / "guidance_2" / "images"), "--fd-features",
                   "clip", "--clip-model", "openclip:toy-clip", "--clip-config",
                   str(ROOT / "launch/configs/clip/toy-clip.json"), "--steps", "2", "--width", "12", "--height",
                   "20", "--out", str(tmp_path / "eval_folder"), "--batch-size", "4", "--json"])
    assert "only shards are cropped to the generated shape" in capsys.readouterr().err


LATENT_BUCKETS = [[32, 16], [16, 16], [16, 32]]  # multiples of 16: the test VAE's factor 4 × the tiny U-Net's 4


@pytest.mark.slow
def test_bucketed_latent_shards_give_the_batches_of_live_encoding_and_train(mixed, tmp_path):
    from helpers import make_vae
    from models.autoencoder import AutoencoderConfig, load_autoencoder
    from pipeline import precompute, train

    vae_dir = make_vae(tmp_path / "vae")
    out = tmp_path / "latents"
    common = ["data.resolution=16", f"data.buckets={json.dumps(LATENT_BUCKETS)}", f"autoencoder.path={vae_dir}",
              "data.shuffle_buffer=8", "data.streams=2"]
    precompute.main(["latents", "--config", str(ROOT / "launch/configs/demo_latent.yaml"), "--out", str(out),
                     f"data.shards={mixed}", "--batch-size", "4", "--flip", *common])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["buckets"] == LATENT_BUCKETS
    latents = str(out / "{00000..00007}.tar")
    vae = load_autoencoder(AutoencoderConfig(path=str(vae_dir)))

    def config(shards, flip):
        return DataConfig(shards=shards, resolution=16, num_workers=0, shuffle_buffer=8, buckets=LATENT_BUCKETS,
                          bucket_step=16, streams=2, flip=flip)

    for flip in (False, True):  # data.flip: the mirrored latent, and the mirrored crop's corner (80×60 and 12×10
        # images have one crop offset on the left and another on the right)
        for live, stored in zip(steps(Loader(config(mixed, flip), 4), 12), steps(Loader(config(latents, flip), 4), 12)):
            assert live.keys == stored.keys and torch.equal(live.sizes, stored.sizes)
            assert torch.equal(live.boxes, stored.boxes) and torch.equal(live.micro(), stored.micro(factor=4))
            torch.testing.assert_close(stored.latents.float(), vae.encode(live.pixels()), rtol=1e-3, atol=2e-3)
    with pytest.raises(ValueError, match="made with buckets"):
        Loader(DataConfig(shards=latents, resolution=16, buckets=LATENT_BUCKETS[:2], bucket_step=16), 4)
    from pipeline.validation import Validation, ValidationConfig

    with pytest.raises(ValueError, match="latent shards of aspect-ratio buckets.*without data.buckets"):
        Validation(ValidationConfig(shards=latents), config(latents, False), None, None, vae, "cpu", 0)
    run = tmp_path / "run"
    train.main(train_args(latents, run, *common, f"data.shards={latents}", "data.num_workers=0",
                          config="demo_latent.yaml", steps=2))
    assert (run / "model").is_dir()
