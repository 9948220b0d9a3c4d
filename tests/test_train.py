"""The training job: config, loss goes down, exact resume, caption dropout, NaN guard, interrupted saves, bad input,
precomputed embeddings, and a compiled 2-process DDP run (the launch files × precision × accumulation × EMA:
test_launch.py)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.write_shards import write_toy
from helpers import TINY_SD_OVERRIDES, threads
from pipeline import train
from pipeline.checkpoint import list_checkpoints, load_exported
from pipeline.config import ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "launch" / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "shards"
    write_toy(out, count=256, resolution=16, seed=0, max_samples=32)
    return str(out / "{00000..00007}.tar")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("held_out") / "shards"
    write_toy(out, count=12, resolution=16, seed=99, max_samples=12)
    return str(out / "00000.tar")


def small(shards, run_dir, *extra):
    """Overrides that make the demo config test-sized (16 px, batch 8)."""
    base = [f"data.shards={shards}", "data.resolution=16", "data.num_workers=2", "data.shuffle_buffer=64",
            "optim.batch_size=8", "optim.warmup_steps=5", "logging.tracker=none", "logging.every=2",
            "logging.sample_every=0", "logging.sample_steps=3", "logging.sample_per_prompt=1", "checkpoint.every=4"]
    given = {e.split("=", 1)[0] for e in extra}  # a key in extra replaces its default (a repeated key is an error)
    return ["--config", DEMO, "--output-dir", str(run_dir), *[b for b in base if b.split("=", 1)[0] not in given],
            *extra]


# The two U-Net families: the own U-Net (the demo's tiny size) and diffusers' UNet2DConditionModel (Stable
# Diffusion's shape, shrunk), in pixel space: what works for one must work for the other.
FAMILIES = {"unet": [], "diffusers": ["model.size=sd", *TINY_SD_OVERRIDES]}


def weights(path):
    return load_file(str(path))


def assert_same(a, b, tol=0.0):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= tol, worst


# --- config ------------------------------------------------------------------------------------------------------

def test_config_loads_overrides_and_refuses_unknown_keys_and_bad_types(tmp_path):
    cfg = load_config(DEMO, ["optim.lr=3e-4", "data.shards=/x/{0..3}.tar", "model.overrides.dropout=0.1",
                             "logging.sample_prompts=[a, b]", "text_encoder.pretrained=null"])
    assert isinstance(cfg, TrainConfig) and cfg.optim.lr == 3e-4 and cfg.data.shards == "/x/{0..3}.tar"
    assert cfg.model.overrides == {"dropout": 0.1} and cfg.logging.sample_prompts == ["a", "b"]
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(DEMO, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(DEMO, ["nosection.x=1"])
    with pytest.raises(ConfigError, match="optim.batch_size: expected an integer"):
        load_config(DEMO, ["optim.batch_size=eight"])
    with pytest.raises(ConfigError, match="train.caption_dropout"):
        load_config(DEMO, ["train.caption_dropout=1.5"])
    with pytest.raises(ConfigError, match="model.overrides"):
        load_config(DEMO, ["model.overrides.nonsense=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  resolution: [32]\n")
    with pytest.raises(ConfigError, match="data.resolution"):
        load_config(bad)
    # the documented value `no` is a string on the command line, not YAML 1.1's false; in a file, quoting is asked for
    assert load_config(DEMO, ["optim.mixed_precision=no"]).optim.mixed_precision == "no"
    bad.write_text("optim:\n  mixed_precision: no\n")
    with pytest.raises(ConfigError, match="optim.mixed_precision: expected a string, got False; quote"):
        load_config(bad)
    # an unquoted brace pattern expanded by a shell arrives as many overrides of one key: refused, not last-one-wins
    with pytest.raises(ConfigError, match="data.shards is given more than once.*quote it"):
        load_config(DEMO, ["data.shards=/d/00000.tar", "data.shards=/d/00001.tar"])
    # --output-dir / --max-steps replace an override of the same key rather than repeating it
    cfg = train.config_from_args(train.parse_args(["--config", DEMO, "--max-steps", "7", "train.max_steps=3"]))
    assert cfg.train.max_steps == 7
    # torch.compile's backend and mode: a name torch does not know, or inductor's mode with another backend
    with pytest.raises(ConfigError, match="train.compile_backend='inductr' is not a torch.compile backend.*aot_eager"):
        load_config(DEMO, ["train.compile=true", "train.compile_backend=inductr"])
    with pytest.raises(ConfigError, match="train.compile_mode must be one of"):
        load_config(DEMO, ["train.compile_mode=fast"])
    with pytest.raises(ConfigError, match="compile_mode is inductor's"):
        load_config(DEMO, ["train.compile_backend=aot_eager", "train.compile_mode=max-autotune"])
    assert load_config(DEMO, ["train.compile=true", "train.compile_mode=max-autotune"]).train.compile_mode == \
        "max-autotune"


def test_lr_schedule_and_caption_dropout_rate():
    f = [train.lr_factor(s, 10, 110, "cosine", 0.1) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.55) and f[-1] < 0.11 and all(a >= b for a, b in zip(f[10:], f[11:]))
    assert train.lr_factor(500, 10, 110, "constant", 0.0) == 1.0
    n, p = 20000, 0.1
    captions, dropped = train.drop_captions(["caption"] * n, list(range(n)), p, seed=0)
    assert dropped == captions.count("") and abs(dropped / n - p) < 4 * (p * (1 - p) / n) ** 0.5
    # decided per sample by its global index: the same whichever batch the sample is in
    again, _ = train.drop_captions(["caption"] * 100, list(range(500, 600)), p, seed=0)
    assert again == captions[500:600] and captions != train.drop_captions(["caption"] * n, list(range(n)), p, 1)[0]


def test_timestep_and_noise_follow_the_sample_not_the_batch():
    from diffusion import DiffusionConfig, GaussianDiffusion

    d = GaussianDiffusion.from_config(DiffusionConfig())
    x0 = torch.zeros(6, 3, 4, 4)
    t, noise = train.sample_draws(d, x0, list(range(10, 16)), seed=3)
    t2, noise2 = train.sample_draws(d, x0[:2], [14, 11], seed=3)
    assert torch.equal(t2, t[[4, 1]]) and torch.equal(noise2, noise[[4, 1]])
    assert len(set(t.tolist())) > 1 and noise.std() > 0.5 and t.max() < d.num_steps
    assert not torch.equal(train.sample_draws(d, x0, list(range(10, 16)), seed=4)[1], noise)


def test_stratified_timesteps_follow_the_global_batch_not_the_micro_batch():
    """diffusion.timestep_sampling=stratified: global batch k (indices kG … kG + G − 1) has one t in each of the G
    strata, whichever rank or micro-batch each sample lands in; the noise is the uniform draws' noise."""
    from diffusion import DiffusionConfig, GaussianDiffusion

    d = GaussianDiffusion.from_config(DiffusionConfig())
    x0 = torch.zeros(8, 3, 4, 4)
    t, noise = train.sample_draws(d, x0, list(range(16, 24)), seed=3, stratify=8)
    assert sorted((t // 125).tolist()) == list(range(8))  # 1000 steps in 8 strata of 125
    halves = [train.sample_draws(d, x0[:4], list(range(i, i + 4)), seed=3, stratify=8) for i in (16, 20)]
    assert torch.equal(torch.cat([h[0] for h in halves]), t)
    assert torch.equal(noise, train.sample_draws(d, x0, list(range(16, 24)), seed=3)[1])
    nxt, _ = train.sample_draws(d, x0, list(range(24, 32)), seed=3, stratify=8)
    assert sorted((nxt // 125).tolist()) == list(range(8)) and not torch.equal(nxt, t)  # a new offset per batch


def test_a_run_with_stratified_timesteps_draws_them_per_global_batch(shards, tmp_path, monkeypatch):
    from diffusion.gaussian import GaussianDiffusion

    real, seen = GaussianDiffusion.training_losses, []

    def record(self, model, x0, cond=None, t=None, noise=None, generator=None):
        seen.append(t.clone())
        return real(self, model, x0, cond, t=t, noise=noise, generator=generator)

    monkeypatch.setattr(GaussianDiffusion, "training_losses", record)
    train.main(small(shards, tmp_path / "run", "--max-steps", "2", "optim.grad_accum=2",
                     "optim.batch_size=4", "diffusion.timestep_sampling=stratified"))
    assert len(seen) == 4  # 2 steps × 2 micro-batches of 4: each step's 8 timesteps, one per stratum of 125
    for step in (seen[:2], seen[2:]):
        assert sorted((torch.cat(step) // 125).tolist()) == list(range(8))


# --- one process ---------------------------------------------------------------------------------------------------

def test_short_run_lowers_loss_exports_and_logs(shards, tmp_path):
    run = tmp_path / "run"
    train.main(small(shards, run, "--max-steps", "40", "optim.lr=2e-3", "logging.every=5", "logging.sample_every=20",
                     "logging.tracker=tensorboard"))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < 0.75 * metrics[0]["loss"], [m["loss"] for m in metrics]
    for key in ("lr", "grad_norm", "images_per_s", "data_wait_fraction", "nan_skips"):
        assert key in metrics[-1]
    assert abs(metrics[-1]["caption_dropout_rate"] - 0.1) < 0.05  # 320 captions: 4 SE = 0.067
    assert (run / "samples" / "step_00000020.png").is_file() and (run / "samples" / "step_00000040.png").is_file()
    assert list((run / "logs").rglob("events.out.tfevents*")), "no TensorBoard events"
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml").train.max_steps == 40
    unet, encoder, diffusion, _, meta = load_exported(run / "model")
    assert meta["step"] == 40 and meta["resolution"] == 16
    assert_same(unet.state_dict(), weights(run / "model" / "unet_ema.safetensors"))
    out = unet(torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), encoder.encode(["a red circle", ""]))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_resume_is_exact(family, shards, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    fam = FAMILIES[family]
    train.main(small(shards, straight, "--max-steps", "12", *fam))
    train.main(small(shards, split, "--max-steps", "6", "checkpoint.every=6", *fam))
    train.main(small(shards, split, "--max-steps", "12", "--resume", "latest", "checkpoint.every=6", *fam))
    a, b = straight / "checkpoints" / "step_00000012", split / "checkpoints" / "step_00000012"
    assert_same(weights(a / "model.safetensors"), weights(b / "model.safetensors"), tol=0.0)
    assert_same(weights(a / "ema.safetensors"), weights(b / "ema.safetensors"), tol=0.0)
    assert json.loads((a / "data" / "rank0.json").read_text())["positions"] == \
        json.loads((b / "data" / "rank0.json").read_text())["positions"]
    assert [p.name for p in list_checkpoints(split / "checkpoints")] == ["step_00000006", "step_00000012"]


def test_deterministic_option_selects_deterministic_kernels(shards, tmp_path):
    """train.deterministic=true turns on PyTorch's deterministic kernels for the run (what makes GPU runs and resumes
    bit-exact: tests/test_gpu.py); the job runs with them."""
    try:
        train.main(small(shards, tmp_path / "det", "--max-steps", "2", "train.deterministic=true"))
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert (tmp_path / "det" / "checkpoints" / "step_00000002" / "train_state.json").is_file()
    finally:
        torch.use_deterministic_algorithms(False)


def test_gradient_accumulation(shards, tmp_path):
    run = tmp_path / "accum"
    train.main(small(shards, run, "--max-steps", "3", "optim.grad_accum=2"))
    state = json.loads((run / "checkpoints" / "step_00000003" / "train_state.json").read_text())
    assert state["seen"] == 3 * 2 * 8  # two micro-batches of 8 per optimiser step
    assert json.loads((run / "checkpoints" / "step_00000003" / "data" / "rank0.json").read_text())["steps"] == 3
    raw, init = weights(run / "model" / "unet.safetensors"), train.build(train.model_config("tiny", context_dim=64,
                                                                                         pooled_dim=64)).state_dict()
    assert any(not torch.equal(raw[k], init[k]) for k in raw)  # the optimiser stepped


def test_gradient_accumulation_equals_one_large_batch(shards, tmp_path, monkeypatch):
    """8 images × 2 micro-steps is one step on 16 images: the same losses, gradient norms and weights. Each image's
    timestep and noise are keyed by its pixels, so both runs draw the same ones whatever the batching."""
    from diffusion.gaussian import GaussianDiffusion

    real = GaussianDiffusion.training_losses

    def keyed(self, model, x0, cond=None, t=None, noise=None, generator=None):
        gens = [torch.Generator().manual_seed(int(hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest()[:15], 16))
                for x in x0]
        t = torch.cat([self.sample_timesteps(1, generator=g) for g in gens]).to(x0.device)
        noise = torch.stack([torch.randn(x.shape, generator=g) for x, g in zip(x0, gens)]).to(x0)
        return real(self, model, x0, cond, t=t, noise=noise)

    monkeypatch.setattr(GaussianDiffusion, "training_losses", keyed)
    runs = {}
    for name, batch, accum in [("big", 16, 1), ("accum", 8, 2)]:
        runs[name] = tmp_path / name
        train.main(small(shards, runs[name], "--max-steps", "3", "logging.every=1", "data.num_workers=1",
                         "train.caption_dropout=0", f"optim.batch_size={batch}", f"optim.grad_accum={accum}"))
    big, acc = ([json.loads(line) for line in (runs[n] / "metrics.jsonl").read_text().splitlines()] for n in runs)
    assert [m["step"] for m in big] == [m["step"] for m in acc] == [1, 2, 3]
    keys = [json.loads((runs[n] / "checkpoints" / "step_00000003" / "data" / "rank0.json").read_text())["last_keys"]
            for n in runs]
    assert keys[0][8:] == keys[1]  # the same images, in the same order
    for b, a in zip(big, acc):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # the accumulated gradient is the mean
    w_big, w_acc = (weights(runs[n] / "model" / "unet.safetensors") for n in runs)
    assert_same(w_big, w_acc, tol=4e-3)  # Adam's first steps are ±lr per weight: a flipped sign of a ~0 gradient
    close = sum(int(((w_big[k] - w_acc[k]).abs() < 1e-5).sum()) for k in w_big)
    assert close / sum(v.numel() for v in w_big.values()) > 0.99


@pytest.mark.parametrize("decay,power,inv_gamma,start,every", [(0.9, 0.75, 1.0, 0, 1), (0.999, 2 / 3, 2.0, 3, 1),
                                                               (0.95, 1.0, 1.0, 2, 2)])
def test_ema_update_follows_its_formula(decay, power, inv_gamma, start, every):
    """k-th update (k = 1, 2, ...): the first, and those up to start_step, copy; then, every update_every-th,
    θ_ema ← d θ_ema + (1 − d) θ with d = min(decay, 1 − (1 + (k − 1 − start)/inv_gamma)^(−power)). The online
    weights are bf16 (DeepSpeed's casts): the EMA stays fp32."""
    from types import SimpleNamespace

    from pipeline.config import EMASection

    model = torch.nn.Linear(3, 2)
    ema = train.build_ema(model, EMASection(decay=decay, power=power, inv_gamma=inv_gamma, start_step=start,
                                            update_every=every))
    model.to(torch.bfloat16)
    no_deepspeed = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None))
    gen = torch.Generator().manual_seed(0)
    expected = None
    for n in range(12):  # n = k − 1
        with torch.no_grad():
            model.weight.copy_(torch.randn(2, 3, generator=gen))
        train.update_ema(ema, model, no_deepspeed)
        w = model.weight.detach().double()
        if n == 0 or (n % every == 0 and n <= start):
            expected = w.clone()
        elif n % every == 0:
            d = min(decay, max(0.0, 1 - (1 + (n - start) / inv_gamma) ** -power))
            expected = d * expected + (1 - d) * w
        got = ema.ema_model.weight
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def _nan_losses(monkeypatch, bad_steps):
    """Make the loss non-finite on the given calls of training_losses (counted from 0)."""
    from diffusion.gaussian import GaussianDiffusion

    real = GaussianDiffusion.training_losses
    calls = {"n": 0}

    def patched(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if calls["n"] in bad_steps:
            out["loss"] = out["loss"] * float("nan")
        calls["n"] += 1
        return out

    monkeypatch.setattr(GaussianDiffusion, "training_losses", patched)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_nan_guard_skips_then_stops(family, shards, tmp_path, monkeypatch):
    _nan_losses(monkeypatch, {2, 3})
    run = tmp_path / "skips"
    train.main(small(shards, run, "--max-steps", "6", *FAMILIES[family]))
    state = json.loads((run / "checkpoints" / "step_00000006" / "train_state.json").read_text())
    assert state["nan_skips"] == 2
    assert all(torch.isfinite(v).all() for v in weights(run / "model" / "unet.safetensors").values())

    _nan_losses(monkeypatch, set(range(100)))
    with pytest.raises(RuntimeError, match="non-finite losses in a row"):
        train.main(small(shards, tmp_path / "stops", "--max-steps", "20", "train.max_nan_in_row=3"))


class _InfGradient(torch.autograd.Function):
    """The identity forward; an infinite gradient backward: a finite loss whose gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_non_finite_gradients_of_a_finite_loss_skip_the_step(shards, tmp_path, monkeypatch):
    """fp32 has no loss scaler to catch them: the step is skipped (weights untouched), counted as overflow_skips, and
    the grad norm is logged with clipping off (measured at max_norm = ∞)."""
    from diffusion.gaussian import GaussianDiffusion

    real, calls = GaussianDiffusion.training_losses, {"n": 0}

    def patched(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if calls["n"] in {2, 3}:  # steps 3 and 4 (1-based)
            out["loss"] = _InfGradient.apply(out["loss"])
        calls["n"] += 1
        return out

    monkeypatch.setattr(GaussianDiffusion, "training_losses", patched)
    run = tmp_path / "run"
    train.main(small(shards, run, "--max-steps", "6", "logging.every=1", "checkpoint.every=2", "checkpoint.keep_last=4",
                     "optim.grad_clip=0"))
    state = json.loads((run / "checkpoints" / "step_00000006" / "train_state.json").read_text())
    assert state["overflow_skips"] == 2 and state["nan_skips"] == 0 and state["optimizer_steps"] == 4
    assert all(torch.isfinite(v).all() for v in weights(run / "model" / "unet.safetensors").values())
    assert_same(weights(run / "checkpoints" / "step_00000002" / "model.safetensors"),
                weights(run / "checkpoints" / "step_00000004" / "model.safetensors"))  # steps 3, 4 changed nothing
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["optimizer_steps"] for m in metrics] == [1, 2, 2, 2, 3, 4]
    assert all(m["grad_norm"] > 0 for i, m in enumerate(metrics) if i not in (2, 3))


KILL_DURING_SAVE = """
import os, sys
sys.path.insert(0, {root!r})
from accelerate import Accelerator
real = Accelerator.save_state
def save_state(self, output_dir=None, **kw):
    out = real(self, output_dir, **kw)
    if "step_00000008" in str(output_dir):
        os._exit(9)  # killed after Accelerate wrote its files, before the checkpoint was complete
    return out
Accelerator.save_state = save_state
from pipeline import train
train.main({argv!r})
"""


def test_kill_during_save_leaves_previous_checkpoint(shards, tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "kill.py"
    script.write_text(KILL_DURING_SAVE.format(root=str(ROOT), argv=small(shards, run, "--max-steps", "12")))
    res = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 9, res.stderr[-2000:]
    assert (run / "checkpoints" / "step_00000008.tmp").is_dir()  # the half-written save is there …
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000004"]  # … but not counted
    train.main(small(shards, run, "--max-steps", "12", "--resume", "latest"))
    assert not (run / "checkpoints" / "step_00000008.tmp").exists()
    assert (run / "checkpoints" / "step_00000012" / "train_state.json").is_file()


@pytest.mark.parametrize("case", ["unknown_key", "wrong_type", "no_shards", "unwritable", "no_checkpoint",
                                  "other_model", "other_global_batch", "no_validation_shards", "retries"])
def test_bad_input_fails_before_any_step(shards, tmp_path, case):
    run = tmp_path / "run"
    argv = {
        "unknown_key": small(shards, run, "optim.learning_rate=1"),
        "wrong_type": small(shards, run, "train.max_steps=many"),
        "no_shards": small(str(tmp_path / "nothing_{000..003}.tar"), run),
        "unwritable": small(shards, tmp_path / "a_file" / "run"),
        "no_checkpoint": small(shards, run, "--resume", "latest"),
        "other_model": small(shards, run, "--resume", "latest", "model.overrides.base_channels=16"),
        # a resume that cannot continue the same data sequence (another global batch)
        "other_global_batch": small(shards, run, "--resume", "latest", "optim.batch_size=4"),
        "no_validation_shards": small(shards, run, f"validation.shards={tmp_path / 'held_{0..3}.tar'}"),
        "retries": small(shards, run, "data.retries=-1"),
    }[case]
    expected = {"unknown_key": "optim.learning_rate", "wrong_type": "expected an integer", "no_shards": "matches no file",
                "unwritable": "cannot write to the output folder", "no_checkpoint": "no checkpoint",
                "other_model": "different model config", "other_global_batch": "does not fit this run.*global batch",
                "no_validation_shards": "held_.*matches no file", "retries": "data.retries must be in"}[case]
    (tmp_path / "a_file").write_text("a file, not a folder")
    if case in ("other_model", "other_global_batch"):
        train.main(small(shards, run, "--max-steps", "2"))
    before = sorted(p.name for p in run.rglob("*")) if run.exists() else []
    with pytest.raises(SystemExit, match=expected):
        train.main(argv)
    after = sorted(p.name for p in run.rglob("*")) if run.exists() else []
    assert [p for p in after if p.startswith("step_")] == [p for p in before if p.startswith("step_")]
    if case not in ("other_model", "other_global_batch"):  # a run folder this failed run made is not left behind
        assert not run.exists()


def _one_line_exit(excinfo, *needles):
    """A SystemExit with a message (exit status 1) of one line holding every needle."""
    message = excinfo.value.code
    assert isinstance(message, str) and "\n" not in message and "Traceback" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_damaged_checkpoints_and_models_fail_in_one_line_or_fall_back(shards, tmp_path, capfd):
    from pipeline import sample

    run = tmp_path / "run"
    ck = run / "checkpoints"
    train.main(small(shards, run, "--max-steps", "4", "checkpoint.every=2", "checkpoint.keep_last=5"))
    assert json.loads((ck / "step_00000004" / "checksums.json").read_text()).keys() >= {"optimizer.bin",
                                                                                       "model.safetensors"}
    # --resume latest: the newest checkpoint is damaged → the newest intact one, with a warning
    _truncate(ck / "step_00000004" / "optimizer.bin")
    capfd.readouterr()
    train.main(small(shards, run, "--max-steps", "6", "--resume", "latest", "checkpoint.every=2",
                     "checkpoint.keep_last=5"))
    log = capfd.readouterr().err
    assert "step_00000004 is damaged (optimizer.bin differ from its checksums): trying the one before" in log
    assert f"resumed from {ck / 'step_00000002'} at step 2" in log
    assert json.loads((run / "model" / "config.json").read_text())["step"] == 6
    # an explicitly named damaged checkpoint: one line naming the file
    _truncate(ck / "step_00000006" / "optimizer.bin")
    with pytest.raises(SystemExit) as e:
        train.main(small(shards, run, "--max-steps", "8", "--resume", str(ck / "step_00000006")))
    _one_line_exit(e, "step_00000006 is damaged: optimizer.bin differ from its checksums")
    # without checksums (an older checkpoint): still one line, and never "load it with weights_only=False"
    (ck / "step_00000006" / "checksums.json").unlink()
    with pytest.raises(SystemExit) as e:
        train.main(small(shards, run, "--max-steps", "8", "--resume", str(ck / "step_00000006")))
    assert "weights_only" not in _one_line_exit(e, "step_00000006 cannot be loaded", "damaged")
    # a damaged train_state.json / exported model: one line naming the file
    (ck / "step_00000004" / "train_state.json").write_text('{"step": 4, "model_con')
    (ck / "step_00000004" / "checksums.json").unlink()
    with pytest.raises(SystemExit) as e:
        train.main(small(shards, run, "--max-steps", "8", "--resume", str(ck / "step_00000004")))
    _one_line_exit(e, "train_state.json is damaged (not valid JSON")
    argv = ["--model", str(run / "model"), "--out", str(tmp_path / "samples"), "--prompt", "a red circle", "--steps",
            "2"]
    _truncate(run / "model" / "unet_ema.safetensors")
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    _one_line_exit(e, "unet_ema.safetensors is damaged")
    (run / "model" / "config.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    _one_line_exit(e, "config.json is damaged (not valid JSON")


def test_malformed_yaml_is_one_line_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  resolution: 32\n  shards: [a, b\noptim:\n  lr: 1\n")
    res = subprocess.run([sys.executable, str(ROOT / "pipeline" / "train.py"), "--config", str(bad), "--output-dir",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"config error: {bad}:4:6: not valid YAML (expected ',' or ']', but got ':'; while parsing a flow sequence "
        f"at line 3)")
    assert not (tmp_path / "run").exists()


def test_precomputed_caption_embeddings_skip_the_encoder(shards, tmp_path, monkeypatch):
    from models.text_encoders import OpenCLIPTextEncoder
    from pipeline import precompute

    cache = tmp_path / "captions.safetensors"
    overrides = small(shards, tmp_path / "run")[2:]  # the same config, minus --config/--output-dir
    precompute.main(["--config", DEMO, "--out", str(cache), *overrides[2:]])
    calls = []
    real = OpenCLIPTextEncoder.encode
    monkeypatch.setattr(OpenCLIPTextEncoder, "encode", lambda self, c: calls.append(list(c)) or real(self, c))
    train.main(small(shards, tmp_path / "run", "--max-steps", "4", f"text_encoder.cache={cache}"))
    assert calls == []  # every caption (and "" for dropout) came from the cache
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "train_state.json").read_text())
    assert state["dropped"] > 0  # caption dropout still happens with cached embeddings


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_training_follows_eager_and_keeps_checkpoint_keys(family, shards, tmp_path):
    """train.compile=true: compiled steps give eager's losses and weights (to float reassociation), and the
    checkpoints and export have the plain keys (no `_orig_mod.`), so they load into an uncompiled U-Net. Backend
    aot_eager: dynamo's graphs and AOTAutograd's joint forward/backward, exactly what inductor receives, run eagerly
    (inductor's CPU C++ code generation is not the product's path and costs ~2 min per cold run; its Triton kernels
    run in tests/test_gpu.py)."""
    from torch._dynamo.utils import counters

    runs = {}
    for compiled in (False, True):
        run = tmp_path / ("compiled" if compiled else "eager")
        torch._dynamo.reset()
        counters.clear()
        train.main(small(shards, run, "--max-steps", "4", f"train.compile={str(compiled).lower()}", "optim.lr=1e-3",
                         "train.compile_backend=aot_eager", *FAMILIES[family]))
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # the compiled run really ran compiled code
        assert (counters["aot_autograd"]["total"] > 0) == compiled  # through AOTAutograd, as inductor would
        runs[compiled] = run
    losses = [[json.loads(line)["loss"] for line in (r / "metrics.jsonl").read_text().splitlines()] for r in runs.values()]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    a, b = (weights(r / "checkpoints" / "step_00000004" / "model.safetensors") for r in runs.values())
    assert_same(a, b, tol=1e-3)  # lr 1e-3: a flipped Adam sign on a near-zero gradient moves a weight by ≤ 4·lr
    assert all(k.count("_orig_mod") == 0 for k in b)
    load_exported(runs[True] / "model")


def test_channels_last_training_follows_nchw(shards, tmp_path, monkeypatch):
    """train.channels_last=true: the U-Net sees channels_last batches and its activations stay so; losses and weights
    follow the NCHW run (to float reassociation), and checkpoints and export keep plain NCHW weights (safetensors
    refuses non-contiguous tensors)."""
    from models.unet import UNet

    layouts = []
    real_forward = UNet.forward

    def spy(self, x, t, cond=None):
        out = real_forward(self, x, t, cond)
        if torch.is_grad_enabled():  # training steps, not the sample grid
            layouts.append((x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                            out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()))
        return out

    monkeypatch.setattr(UNet, "forward", spy)
    runs = {}
    for cl in (False, True):
        layouts.clear()
        run = tmp_path / ("channels_last" if cl else "nchw")
        train.main(small(shards, run, "--max-steps", "4", f"train.channels_last={str(cl).lower()}", "optim.lr=1e-3"))
        assert layouts and all(pair == (cl, cl) for pair in layouts), layouts
        runs[cl] = run
    losses = [[json.loads(line)["loss"] for line in (r / "metrics.jsonl").read_text().splitlines()] for r in runs.values()]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    a, b = (weights(r / "checkpoints" / "step_00000004" / "model.safetensors") for r in runs.values())
    assert_same(a, b, tol=1e-3)  # as in the compile test: a flipped Adam sign moves a weight by ≤ 4·lr
    load_exported(runs[True] / "model")


# --- two processes -------------------------------------------------------------------------------------------------

def torchrun(args, env_extra, timeout=240, nproc=2, ok=True, script=ROOT / "pipeline" / "train.py"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert (res.returncode == 0) == ok, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def check_two_ranks(run: Path, step: int):
    ck = run / "checkpoints" / f"step_{step:08d}"
    r0, r1 = (json.loads((ck / "data" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["weights_checksum"] == r1["weights_checksum"] is not None  # identical replicas
    assert r0["last_keys"] and not set(r0["last_keys"]) & set(r1["last_keys"])  # each rank its own samples


def test_two_processes_compiled_train_identically(shards, tmp_path):
    """train.compile=true under DDP (the inner module is compiled; DDP's gradient hooks still fire)."""
    run = tmp_path / "ddp_compiled"
    torchrun(small(shards, run, "--max-steps", "4", "data.num_workers=1", "train.compile=true",
                   "train.compile_backend=aot_eager"),
             {"ACCELERATE_USE_CPU": "true"}, timeout=480)
    check_two_ranks(run, 4)


@pytest.mark.slow
def test_resume_on_another_number_of_processes_continues_the_loss_curve(shards, held_out, tmp_path):
    """Elastic resume with real processes (the one-process runs in this one): stopped after 3 steps on 2 processes
    (8 + 8 images) and resumed on 1 (16), and 1 → 2: the losses logged after the resume equal the uninterrupted run's to float rounding (the same
    samples, each with the same timestep, noise and caption dropout), and so do the streams' positions. The
    validation loss (steps 0, 3, 6) is the same number on 1 and 2 processes."""
    hashing = tmp_path / "count_hashing.py"  # the job, with every file hash counted per rank
    hashing.write_text(
        f"import atexit, os, sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom pipeline import checkpoint, train\n"
        "calls, real = [0], checkpoint._sha256\n"
        "checkpoint._sha256 = lambda p: calls.__setitem__(0, calls[0] + 1) or real(p)\n"
        "atexit.register(lambda: open(os.environ['HASH_LOG'] + os.environ['RANK'], 'w').write(str(calls[0])))\n"
        "train.main(sys.argv[1:])\n")

    def launch(run, nproc, batch, steps, resume=False):
        args = small(shards, run, "--max-steps", str(steps), "data.num_workers=1", "data.streams=2", "logging.every=1",
                     "checkpoint.every=3", f"optim.batch_size={batch}", f"validation.shards={held_out}",
                     "validation.every=3", "validation.num_samples=10", "validation.batch_size=4", "validation.bins=4",
                     *(["--resume", "latest"] if resume else []))
        if nproc == 1:  # in this process, with the kernels of a process started with OMP_NUM_THREADS=1
            with threads(1):
                train.main(args)
        else:
            torchrun(args, {"ACCELERATE_USE_CPU": "true", "HASH_LOG": str(run) + ".hashes."}, script=hashing)

    def curve(run):
        return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]

    def val(run):
        return {m["step"]: m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "val_loss" in m}

    def positions(run):
        from pipeline.checkpoint import load_data_state

        return load_data_state(run / "checkpoints" / "step_00000006")["positions"]

    straight = tmp_path / "straight"
    launch(straight, 1, 16, 6)
    for name, (first, second) in {"two_then_one": ((2, 8), (1, 16)), "one_then_two": ((1, 16), (2, 8))}.items():
        run = tmp_path / name
        launch(run, *first, 3)
        launch(run, *second, 6, resume=True)
        got, ref = curve(run), curve(straight)
        assert [m["step"] for m in got] == [m["step"] for m in ref] == list(range(1, 7))
        assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in ref], rel=1e-5), name
        assert [m["caption_dropout_rate"] for m in got] == [m["caption_dropout_rate"] for m in ref]
        assert positions(run) == positions(straight)
        if name == "one_then_two":  # the resumed 2-process run: only rank 0 hashed (checked, then wrote) checkpoints
            hashes = [int(Path(f"{run}.hashes.{r}").read_text()) for r in (0, 1)]
            assert hashes[1] == 0 and hashes[0] > 10, hashes
        got, ref = val(run), val(straight)
        assert sorted(got) == sorted(ref) == [0, 3, 6]
        for step in ref:
            assert got[step].keys() == ref[step].keys() and "val_loss/t250-499" in ref[step]
            assert got[step]["val_loss"] == pytest.approx(ref[step]["val_loss"], rel=1e-5)
            bins = [v for k, v in ref[step].items() if k.startswith("val_loss/")]
            assert len(bins) == 4 and min(bins) < ref[step]["val_loss"] < max(bins)
