"""The sampling script on a model from a short `tiny` training run: reproducible per-image seeds (any batch size, any
number of processes), guidance and negative prompts, every sampler from the command line, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.write_shards import write_toy
from diffusion import SAMPLERS
from pipeline import sample, train

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a large red circle in the center on a white background", "a small blue square at the top left on a beige background"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample")
    write_toy(tmp / "shards", count=64, resolution=16, max_samples=16)
    run = tmp / "run"
    train.main(["--config", str(ROOT / "launch/configs/demo.yaml"), "--output-dir", str(run), "--max-steps", "6",
                f"data.shards={tmp / 'shards'}", "data.resolution=16", "data.num_workers=0", "optim.batch_size=8",
                "logging.tracker=none", "logging.sample_every=0", "logging.sample_steps=2", "ema.decay=0.5",
                "optim.warmup_steps=1", "optim.lr=3e-3"])
    return run / "model"


def images(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "images").glob("*.png"))}


def run(model_dir, out, *extra):
    return sample.main(["--model", str(model_dir), "--out", str(out), "--steps", "4", *extra])


def test_same_seed_same_images_whatever_the_batch_size(model_dir, tmp_path):
    common = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num-images", "2", "--seed", "7"]
    a = images(run(model_dir, tmp_path / "a", *common, "--batch-size", "4"))
    b = images(run(model_dir, tmp_path / "b", *common, "--batch-size", "1"))
    c = images(run(model_dir, tmp_path / "c", *common[:-1], "8"))
    assert len(a) == 4 and a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)  # another seed: other images
    assert len({a[k].tobytes() for k in a}) == 4  # every image has its own noise
    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2 rows (prompts) × 2 columns (images), 2 px padding
    meta = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 4 and {m["prompt"] for m in meta} == set(PROMPTS)
    assert all({"seed", "sampler", "steps", "guidance", "negative_prompt", "model", "file"} <= m.keys() for m in meta)


def test_metadata_seed_regenerates_an_image(model_dir, tmp_path):
    first = run(model_dir, tmp_path / "first", "--prompt", PROMPTS[0], "--num-images", "3", "--seed", "3")
    line = json.loads((first / "metadata.jsonl").read_text().splitlines()[2])
    (tmp_path / "again.jsonl").write_text(json.dumps({"prompt": line["prompt"], "seed": line["seed"]}) + "\n")
    again = run(model_dir, tmp_path / "again", "--prompt-file", str(tmp_path / "again.jsonl"))
    assert np.array_equal(np.asarray(Image.open(first / line["file"])), next(iter(images(again).values())))


def test_guidance_and_negative_prompt(model_dir, tmp_path):
    p = ["--prompt", PROMPTS[0], "--seed", "1"]
    g1 = next(iter(images(run(model_dir, tmp_path / "g1", *p, "--guidance", "1")).values())).astype(int)
    g5 = next(iter(images(run(model_dir, tmp_path / "g5", *p, "--guidance", "5")).values())).astype(int)
    assert np.abs(g1 - g5).max() > 10
    # With the prompt itself as the negative prompt both branches agree: ε_u + w(ε_c − ε_u) = ε_c, i.e. guidance 1.
    neg = run(model_dir, tmp_path / "neg", *p, "--guidance", "5", "--negative-prompt", PROMPTS[0])
    assert np.abs(next(iter(images(neg).values())).astype(int) - g1).max() <= 1
    several = images(run(model_dir, tmp_path / "several", *p, "--guidance", "1", "3", "5"))
    assert len(several) == 3
    # guidance rescale (Lin et al. 2024): a no-op without guidance (the guided output is the conditional one), a
    # change with it, and recorded in the metadata
    r1 = run(model_dir, tmp_path / "r1", *p, "--guidance", "1", "--guidance-rescale", "0.7")
    assert np.abs(next(iter(images(r1).values())).astype(int) - g1).max() <= 1
    r5 = run(model_dir, tmp_path / "r5", *p, "--guidance", "5", "--guidance-rescale", "0.7")
    assert np.abs(next(iter(images(r5).values())).astype(int) - g5).max() > 10
    assert json.loads((r5 / "metadata.jsonl").read_text().splitlines()[0])["guidance_rescale"] == 0.7
    # guidance in a limited interval: one holding every noise level is plain guidance, one holding none is w = 1,
    # one in between is neither; recorded in the metadata
    every = run(model_dir, tmp_path / "i_all", *p, "--guidance", "5", "--guidance-interval", "0", "1e9")
    assert np.abs(next(iter(images(every).values())).astype(int) - g5).max() <= 1
    none = run(model_dir, tmp_path / "i_none", *p, "--guidance", "5", "--guidance-interval", "1e8", "1e9")
    assert np.abs(next(iter(images(none).values())).astype(int) - g1).max() <= 1
    part = run(model_dir, tmp_path / "i_part", *p, "--guidance", "5", "--guidance-interval", "0.3", "3")
    img = next(iter(images(part).values())).astype(int)
    assert np.abs(img - g1).max() > 10 and np.abs(img - g5).max() > 10
    assert json.loads((part / "metadata.jsonl").read_text().splitlines()[0])["guidance_interval"] == [0.3, 3.0]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_from_the_command_line(model_dir, tmp_path, sampler):
    argv = ["--model", str(model_dir), "--out", str(tmp_path), "--prompt", PROMPTS[1], "--sampler", sampler, "--steps",
            "3", "--guidance", "2"]
    if sampler == "ddim":  # one as a user runs it (a fresh interpreter); the others in this process: the same code
        res = subprocess.run([sys.executable, "pipeline/sample.py", *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    else:
        sample.main(argv)
    (img,) = images(tmp_path).values()
    assert img.shape == (16, 16, 3) and img.std() > 0


def test_two_processes_make_the_same_images(model_dir, tmp_path):
    common = ["--model", str(model_dir), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num-images", "3",
              "--steps", "3", "--seed", "5"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "pipeline/sample.py", *common, "--out", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    one = images(sample.main([*common, "--out", str(tmp_path / "one")]))
    two = images(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 6
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert len((tmp_path / "two" / "metadata.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("case,argv,message", [
    ("missing", ["--model", "/nonexistent/model"], "not an exported model folder"),
    ("sampler", ["--sampler", "euler_ancestral_magic"], "unknown sampler"),
    ("steps", ["--steps", "0"], "--steps must be"),
    ("guidance", ["--guidance", "-1"], "--guidance must be"),
    ("rescale", ["--guidance-rescale", "1.5"], "--guidance-rescale must lie"),
    ("interval", ["--guidance-interval", "3", "0.3"], "needs 0 ≤ SIGMA_LO < SIGMA_HI"),
    ("empty_file", ["--prompt-file", "EMPTY"], "holds no prompt"),
    ("no_prompt", [], "at least one --prompt"),
])
def test_bad_input(model_dir, tmp_path, case, argv, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    argv = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in argv]
    if "--model" not in argv:
        argv = ["--model", str(model_dir), *argv]
    if case not in ("no_prompt", "empty_file"):
        argv += ["--prompt", "a red circle"]
    with pytest.raises(SystemExit, match=message):
        sample.main([*argv, "--out", str(tmp_path / "out")])


def test_incomplete_model_folder(model_dir, tmp_path):
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(SystemExit, match="incomplete"):
        sample.main(["--model", str(broken), "--prompt", "x", "--out", str(tmp_path / "out")])


def test_long_captions_are_truncated_with_a_warning(model_dir, tmp_path, capsys):
    long = " ".join(["a very long caption about a red circle"] * 20)
    run(model_dir, tmp_path / "long", "--prompt", long)
    assert "were truncated" in capsys.readouterr().err
