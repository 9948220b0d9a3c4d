"""Every recipe the project ships runs: the launch matrix (each Accelerate launch file under launch/accelerate × the
run configs × precision × gradient accumulation × EMA, in a pairwise design), launched the way users launch it
(`accelerate launch --config_file FILE pipeline/train.py --config CONFIG`) on 2 CPU processes; fault injection for the
NaN guard under DDP and ZeRO-2; launch files and configs that cannot work together; the SLURM script's arguments.

On a CPU the multi-GPU launch file runs with ACCELERATE_USE_CPU=true (DDP over gloo, the stand-in for NCCL); the
DeepSpeed ones run as shipped (DeepSpeed's CPU accelerator)."""

import itertools
import json
import math
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from data.write_shards import write_toy
from helpers import TINY_SD_OVERRIDES, free_port
from pipeline import distributed as dist
from pipeline import train
from pipeline.checkpoint import load_exported

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILES = sorted(p.name for p in (ROOT / "launch" / "accelerate").glob("*.yaml"))
CONFIGS = sorted(p.name for p in (ROOT / "launch" / "configs").glob("*.yaml"))
def _latent(name: str) -> bool:
    raw = yaml.safe_load((ROOT / "launch" / "configs" / name).read_text())
    return bool((raw.get("autoencoder") or {}).get("path") or (raw.get("model") or {}).get("pretrained"))


LATENT_CONFIGS = [c for c in CONFIGS if _latent(c)]  # run by test_latent_recipes (a VAE, latent shards)
PIXEL_CONFIGS = [c for c in CONFIGS if c not in LATENT_CONFIGS]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "shards"
    write_toy(out, count=128, resolution=16, seed=0, max_samples=16)
    return str(out / "{00000..00007}.tar")


def launch_file(name: str) -> dict:
    return yaml.safe_load((ROOT / "launch" / "accelerate" / name).read_text())


def is_deepspeed(name: str) -> bool:
    return launch_file(name)["distributed_type"] == "DEEPSPEED"


def processes(name: str) -> int:
    return 1 if launch_file(name)["distributed_type"] == "NO" else 2


# Test-sized overrides per shipped config: its recipe (schedule, loss weighting, data mode, architecture shape, tracker)
# kept, its sizes shrunk to a CPU (16 px toy shards, 4 images per rank, a narrow U-Net, the toy text tower).
SHRINK = {
    "demo.yaml": ["data.resolution=16", "data.num_workers=1", "data.shuffle_buffer=64", "optim.batch_size=4",
                  "optim.warmup_steps=2"],
    "base64.yaml": ["data.resolution=16", "data.min_size=16", "data.num_workers=1", "data.shuffle_buffer=64",
                    "data.epoch_samples=1000", "optim.batch_size=4", "optim.warmup_steps=2",
                    "model.overrides.base_channels=16", "model.overrides.head_channels=16", "text_encoder.name=toy-clip",
                    "text_encoder.config_file=launch/configs/clip/toy-clip.json", "text_encoder.pretrained=null"],
}
COMMON = ["logging.every=1", "logging.sample_every=2", "logging.sample_steps=2", "logging.sample_per_prompt=1",
          "checkpoint.every=2", "checkpoint.keep_last=4"]


def merged(*overrides: str) -> list[str]:
    """Overrides with a repeated key resolved to its last value (the job refuses a key given twice)."""
    return list({o.split("=", 1)[0]: o for o in overrides}.values())


def accelerate_launch(file: str, script: Path, args: list[str], nproc: int | None = None, env_extra=None,
                      ok=True, timeout=300) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file launch/accelerate/FILE SCRIPT ARGS` on this CPU, 2 processes (1 for a
    single-process launch file)."""
    nproc = nproc or processes(file)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if launch_file(file)["distributed_type"] == "MULTI_GPU":
        env["ACCELERATE_USE_CPU"] = "true"  # DDP over gloo: the CPU stand-in for NCCL
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/accelerate/{file}",
           "--num_processes", str(nproc), "--main_process_port", str(free_port())]
    # a port of its own even for one process: DeepSpeed's single process binds one too (Accelerate's default 29500),
    # and two such launches on xdist's two workers collided there (EADDRINUSE)
    res = subprocess.run([*cmd, str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert (res.returncode == 0) == ok, res.stdout[-3000:] + res.stderr[-6000:]
    return res


# --- the matrix --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    launch: str
    config: str
    precision: str  # optim.mixed_precision
    accum: int
    ema: bool

    @property
    def id(self) -> str:
        return f"{Path(self.launch).stem}-{Path(self.config).stem}-{self.precision}-accum{self.accum}-" \
               f"ema_{'on' if self.ema else 'off'}"


FACTORS = {"launch": LAUNCH_FILES, "config": PIXEL_CONFIGS, "precision": ["no", "bf16", "fp16"], "accum": [1, 2],
           "ema": [True, False]}


def deepspeed_fp16() -> bool:
    """Whether DeepSpeed's accelerator here has fp16: the check the job refuses an fp16 DeepSpeed launch by. Its CPU
    accelerator has it on CPUs with AVX-512 FP16 (oneDNN's fp16 kernels), not on older ones."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().is_fp16_supported()


DS_FP16 = deepspeed_fp16()


def valid(c: dict) -> bool:
    """Every combination runs in the matrix but DeepSpeed with fp16, which only some CPUs have: the same matrix on
    every machine. test_deepspeed_fp16_runs_where_supported_and_is_refused_elsewhere covers it."""
    return not ("launch" in c and "precision" in c and c["precision"] == "fp16" and is_deepspeed(c["launch"]))


def pairs(case: dict) -> set:
    return {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(FACTORS, 2)}


# A pairwise design: every value of each factor beside every value of every other factor at least once (the valid
# pairs; test_matrix_covers_every_pair_and_every_shipped_launch_file checks it), in 10 runs rather than the 80 valid
# ones of the full product. 10 is the least possible: each launch file meets each of its precisions once (4 × 3 − the
# 2 DeepSpeed fp16 pairs). Beyond pairs, it holds the three-way settings an earlier bug needed: DeepSpeed × bf16 × EMA
# off (the sample grid from the engine's bf16 weights, on rank 0 under ZeRO-2 and on every rank under ZeRO-3) and
# ZeRO-3 × bf16 × accumulation. (bf16 with EMA on: DDP here, ZeRO-2 and ZeRO-3 in the latent recipes below.)
CASES = [Case("1gpu.yaml", "base64.yaml", "bf16", 2, True),
         Case("1gpu.yaml", "demo.yaml", "fp16", 1, True),
         Case("1gpu.yaml", "base64.yaml", "no", 1, False),
         Case("8gpu_ddp.yaml", "demo.yaml", "bf16", 1, True),
         Case("8gpu_ddp.yaml", "base64.yaml", "fp16", 2, False),
         Case("8gpu_ddp.yaml", "base64.yaml", "no", 2, False),
         Case("8gpu_zero2.yaml", "base64.yaml", "bf16", 2, False),
         Case("8gpu_zero2.yaml", "demo.yaml", "no", 1, True),
         Case("8gpu_zero3.yaml", "demo.yaml", "bf16", 2, False),
         Case("8gpu_zero3.yaml", "base64.yaml", "no", 1, True)]

# Resumed after step 2 (to 3): each launch file once, its case with the most state to restore (fp16's loss scaler,
# then accumulation, then EMA), on the cheaper config where it ties — resume's exactness is tested per engine
# elsewhere (test_train, the fault injection below), the configs differ only in sizes, and each resume is a launch.
# ZeRO-2 is resumed by the fault injection (bf16, accumulation: the losses after the resume equal the run's) and the
# diffusers family below (EMA), so none of its matrix cases is.
RESUMED = {max((c for c in CASES if c.launch == f), key=lambda c: (c.precision == "fp16", c.accum, c.ema,
                                                                   c.config == "demo.yaml"))
           for f in LAUNCH_FILES if f != "8gpu_zero2.yaml"}
RESUMED.add(Case("8gpu_zero2.yaml", "finetune_sd.yaml", "bf16", 1, True))  # the diffusers family, resumed


def test_matrix_covers_every_pair_and_every_shipped_launch_file():
    covered = set().union(*(pairs(vars(c)) for c in CASES))
    for (a, va), (b, vb) in itertools.product(
            ((a, v) for a in FACTORS for v in FACTORS[a]), ((b, v) for b in FACTORS for v in FACTORS[b])):
        if a < b and valid({a: va, b: vb}):
            assert ((a, va), (b, vb)) in covered or ((b, vb), (a, va)) in covered, (a, va, b, vb)
    assert len(CASES) == 10 and len(set(CASES)) == len(CASES) and all(valid(vars(c)) for c in CASES)
    # the three-way settings above
    assert {(c.launch, c.ema) for c in CASES if c.precision == "bf16"} >= {("8gpu_zero2.yaml", False),
                                                                          ("8gpu_zero3.yaml", False)}
    assert any(c.launch == "8gpu_zero3.yaml" and c.precision == "bf16" and c.accum == 2 for c in CASES)
    assert {c.launch for c in RESUMED} == set(LAUNCH_FILES)
    # every shipped launch file, DeepSpeed JSON, run config and text-tower config is run by the matrix
    assert {c.launch for c in CASES} == set(LAUNCH_FILES) and {c.config for c in CASES} == set(PIXEL_CONFIGS)
    assert {c.config for c, _ in LATENT_CASES} == set(LATENT_CONFIGS) and LATENT_CONFIGS
    jsons = {launch_file(c.launch).get("deepspeed_config", {}).get("deepspeed_config_file") for c in CASES}
    # each ZeRO launch file runs its own JSON, of its own stage
    zero_files = {"8gpu_zero2.yaml": ("zero2.json", 2), "8gpu_zero3.yaml": ("zero3.json", 3)}
    for launch, (json_file, stage) in zero_files.items():
        assert launch_file(launch)["deepspeed_config"]["deepspeed_config_file"] == f"launch/deepspeed/{json_file}"
        assert json.loads((ROOT / "launch" / "deepspeed" / json_file).read_text())["zero_optimization"]["stage"] == stage
    assert {f"launch/deepspeed/{p.name}" for p in (ROOT / "launch" / "deepspeed").glob("*.json")} <= jsons
    towers = {o.split("=", 1)[1] for c in CASES for o in SHRINK[c.config] if o.startswith("text_encoder.config_file=")}
    towers |= {(yaml.safe_load((ROOT / "launch" / "configs" / c.config).read_text()).get("text_encoder") or {}).get(
                  "config_file")
               for c in CASES + [c for c, _ in LATENT_CASES]}
    assert {f"launch/configs/clip/{p.name}" for p in (ROOT / "launch" / "configs" / "clip").glob("*.json")} <= towers
    # and every script under launch/ is named by some test (setup.sh: run by CI itself, before the tests)
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py")) + (ROOT / ".ci" / "run").read_text()
    for script in [*(ROOT / "launch").glob("*.sh"), *(ROOT / "launch" / "slurm").iterdir()]:
        assert script.name in tests, f"launch/{script.relative_to(ROOT / 'launch')} is run by no test"


def check_run(run: Path, case: Case, step: int, log: str):
    ck = run / "checkpoints" / f"step_{step:08d}"
    state = json.loads((ck / "train_state.json").read_text())
    assert state["step"] == step and state["nan_skips"] == 0
    assert state["optimizer_steps"] + state["overflow_skips"] == step  # fp16's scaler may skip a first step
    if case.precision != "fp16":
        assert state["overflow_skips"] == 0
    ranks = [json.loads(p.read_text()) for p in sorted((ck / "data").glob("rank*.json"))]
    world = processes(case.launch)
    assert len(ranks) == world and all(r["world_size"] == world for r in ranks)  # really distributed
    assert len({r["weights_checksum"] for r in ranks}) == 1  # identical replicas (ZeRO-3: gathered)
    mode = yaml.safe_load((ROOT / "launch" / "configs" / case.config).read_text())["data"]["mode"]
    if world == 2 and mode == "exact":  # each rank its own samples (resampled mode draws shards with replacement)
        assert ranks[0]["last_keys"] and not set(ranks[0]["last_keys"]) & set(ranks[1]["last_keys"])
    assert all(r["steps"] == step and r["global_batch"] == 4 * world * case.accum for r in ranks)  # accumulation
    assert (ck / "pytorch_model").is_dir() == is_deepspeed(case.launch)  # DeepSpeed's own layout: its engine ran
    assert (ck / "ema.safetensors").exists() == case.ema
    engine = {"NO": "one process", "MULTI_GPU": "DDP"}.get(launch_file(case.launch)["distributed_type"])
    if engine is None:
        ds = json.loads((ROOT / launch_file(case.launch)["deepspeed_config"]["deepspeed_config_file"]).read_text())
        engine = f"DeepSpeed ZeRO-{ds['zero_optimization']['stage']}"
    assert f"{engine}, precision {case.precision}, grad accumulation {case.accum}" in log
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, step + 1))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert all(m["grad_norm"] > 0 for m in metrics if m["overflow_skips"] == 0)  # DeepSpeed's norm too
    assert (run / "model" / "unet_ema.safetensors").is_file() == case.ema
    for ema in {False, case.ema}:  # the exported weights load into the U-Net, finite
        unet, _, _, _, meta = load_exported(run / "model", ema=ema)
        assert meta["step"] == step
        assert all(torch.isfinite(v).all() for v in unet.state_dict().values())
    assert (run / "samples" / f"step_{step:08d}.png").is_file()  # the sample grid (every rank under ZeRO-3)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_launch_matrix(case, shards, tmp_path):
    run = tmp_path / "run"
    args = ["--config", f"launch/configs/{case.config}", "--output-dir", str(run), *merged(
        f"data.shards={shards}", *SHRINK[case.config], *COMMON, f"optim.mixed_precision={case.precision}",
        f"optim.grad_accum={case.accum}", f"ema.enabled={str(case.ema).lower()}")]
    res = accelerate_launch(case.launch, ROOT / "pipeline" / "train.py", [*args, "--max-steps", "2"])
    check_run(run, case, 2, res.stdout + res.stderr)
    if case not in RESUMED:
        return
    res = accelerate_launch(case.launch, ROOT / "pipeline" / "train.py", [*args, "--max-steps", "3", "--resume", "latest"])
    assert "resumed from" in res.stdout + res.stderr
    check_run(run, case, 3, res.stdout + res.stderr)


# --- the latent recipes: a VAE, latent shards precomputed under the same launcher, then training ------------------

LATENT_SHRINK = ["data.resolution=32", "data.min_size=16", "data.num_workers=1", "data.shuffle_buffer=64",
                 "data.epoch_samples=1000", "optim.batch_size=4", "optim.warmup_steps=2", *TINY_SD_OVERRIDES,
                 "text_encoder.kind=openclip", "text_encoder.name=toy-clip",
                 "text_encoder.config_file=launch/configs/clip/toy-clip.json"]
SHRINK["demo_latent.yaml"] = SHRINK["demo.yaml"]
SHRINK["latent256.yaml"] = SHRINK["latent512.yaml"] = LATENT_SHRINK
# Stable Diffusion fine-tuning from a tiny pipeline folder (its U-Net, VAE, text encoder and scheduler): diffusers' U-Net
SHRINK["finetune_sd.yaml"] = [*LATENT_SHRINK[:7], "model.overrides.gradient_checkpointing=true"]
# (case, data): "latents" = shards precomputed by `pipeline/precompute.py latents --flip --text` (in the test's
# process: each launch costs ~10 s of start-up), "images" = live encoding. The 256 px recipe's own ZeRO-2 + bf16;
# ZeRO-3 for 512 px.
# finetune_sd: the diffusers family under ZeRO-2 (bf16, EMA, precomputed latents and caption embeddings, resumed) and
# ZeRO-3 (bf16, accumulation, live encoding through the pipeline's VAE and CLIP).
LATENT_CASES = [(Case("8gpu_ddp.yaml", "demo_latent.yaml", "no", 2, True), "latents"),
                (Case("8gpu_zero2.yaml", "latent256.yaml", "bf16", 1, True), "images"),
                (Case("8gpu_zero3.yaml", "latent512.yaml", "bf16", 1, True), "latents"),
                (Case("8gpu_zero2.yaml", "finetune_sd.yaml", "bf16", 1, True), "latents"),
                (Case("8gpu_zero3.yaml", "finetune_sd.yaml", "bf16", 2, False), "images")]


@pytest.mark.slow
@pytest.mark.parametrize("case,data", LATENT_CASES, ids=[f"{c.id}-{d}" for c, d in LATENT_CASES])
def test_latent_recipes(case, data, shards, tmp_path):
    from helpers import make_sd, make_vae

    cfg = ["--config", f"launch/configs/{case.config}"]
    if case.config == "finetune_sd.yaml":
        sd = make_sd(tmp_path / "sd")
        vae, source = sd / "vae", f"model.pretrained={sd}"
    else:
        vae = make_vae(tmp_path / "vae")
        source = f"autoencoder.path={vae}"
    common = merged(f"data.shards={shards}", *SHRINK[case.config], source)
    if data == "latents":  # precomputed in this process (two processes precomputing: test_latent.py)
        from pipeline import precompute

        latents = tmp_path / "latents"
        precompute.main(["latents", *cfg, "--out", str(latents), "--flip", "--text", *common])
        assert json.loads((latents / "manifest.json").read_text())["complete"]
        common = merged(*common, f"data.shards={latents}", "data.flip=true")  # the mirrored latents, on 2 ranks
    run = tmp_path / "run"
    args = [*cfg, "--output-dir", str(run), *merged(
        *common, *COMMON, f"optim.mixed_precision={case.precision}", f"optim.grad_accum={case.accum}",
        f"ema.enabled={str(case.ema).lower()}")]
    res = accelerate_launch(case.launch, ROOT / "pipeline" / "train.py", [*args, "--max-steps", "2"])
    log = res.stdout + res.stderr
    check_run(run, case, 2, log)
    assert f"{'latent' if data == 'latents' else 'image'} shards, 2 streams" in log and f"latent space of {vae}" in log
    assert (run / "model" / "vae" / "config.json").is_file()
    if case.config == "finetune_sd.yaml":
        assert json.loads((run / "model" / "config.json").read_text())["model_family"] == "diffusers"
        assert "U-Net weights from" in log
    if case in RESUMED:
        res = accelerate_launch(case.launch, ROOT / "pipeline" / "train.py", [*args, "--max-steps", "3", "--resume",
                                                                             "latest"])
        assert "resumed from" in res.stdout + res.stderr
        check_run(run, case, 3, res.stdout + res.stderr)


# --- fault injection: the NaN guard --------------------------------------------------------------------------------

WRAPPER = """
import hashlib, os, sys
sys.path.insert(0, {root!r})
import torch
from diffusion import GaussianDiffusion
BAD = {bad!r}  # (rank, micro-step call) pairs whose loss is made NaN
KEYED = {keyed!r}  # each image's timestep and noise keyed by its pixels: the same draws under any batching
rank, calls = int(os.environ["RANK"]), [0]
real = GaussianDiffusion.training_losses
def training_losses(self, model, x0, cond=None, t=None, noise=None, generator=None):
    if KEYED:
        gens = [torch.Generator().manual_seed(int(hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest()[:15], 16))
                for x in x0]
        t = torch.cat([self.sample_timesteps(1, generator=g) for g in gens]).to(x0.device)
        noise = torch.stack([torch.randn(x.shape, generator=g) for x, g in zip(x0, gens)]).to(x0)
    out = real(self, model, x0, cond, t=t, noise=noise, generator=generator)
    if (rank, calls[0]) in BAD:
        out["loss"] = out["loss"] * float("nan")
    calls[0] += 1
    return out
GaussianDiffusion.training_losses = training_losses
from pipeline import train
train.main(sys.argv[1:])
"""


def wrapper(tmp_path: Path, bad=frozenset(), keyed=False) -> Path:
    script = tmp_path / f"wrapped_{len(bad)}_{keyed}.py"
    script.write_text(WRAPPER.format(root=str(ROOT), bad=set(bad), keyed=keyed))
    return script


# grad_accum = 2: call 2s + m is 0-based step s, micro-step m. NaN at micro-step 0 on one rank (step 2, 1-based), at
# the last micro-step on the other rank (step 3: the synchronising one), at micro-step 0 on both (step 5) and the
# last on both (step 6).
BAD = {(0, 2), (1, 5), (0, 8), (1, 8), (0, 11), (1, 11)}
SKIPPED = {2, 3, 5, 6}  # 1-based steps


@pytest.mark.slow
@pytest.mark.parametrize("launch,precision", [("8gpu_ddp.yaml", "no"), ("8gpu_zero2.yaml", "bf16")])
def test_nan_guard_skips_the_whole_step_on_every_rank(launch, precision, shards, tmp_path):
    run = tmp_path / "run"
    args = ["--config", "launch/configs/demo.yaml", "--max-steps", "8", *merged(
        f"data.shards={shards}", *SHRINK["demo.yaml"], *COMMON, "logging.sample_every=0", "optim.grad_accum=2",
        "optim.warmup_steps=5", f"optim.mixed_precision={precision}")]
    res = accelerate_launch(launch, wrapper(tmp_path, BAD), [*args, "--output-dir", str(run)])
    log = res.stdout + res.stderr
    # counted and logged, once per skipped step, saying where
    for s, where in [(2, "micro-step 0 on 1 of 2"), (3, "micro-step 1 on 1 of 2"), (5, "micro-step 0 on 2 of 2"),
                     (6, "micro-step 1 on 2 of 2")]:
        assert f"non-finite loss at step {s} ({where} rank(s)): step skipped on every rank" in log
    assert log.count("non-finite loss at step") == len(SKIPPED)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    taken = list(itertools.accumulate(int(s not in SKIPPED) for s in range(1, 9)))
    assert [m["optimizer_steps"] for m in metrics] == taken
    assert [m["nan_skips"] for m in metrics] == list(itertools.accumulate(int(s in SKIPPED) for s in range(1, 9)))
    # the LR schedule follows the optimiser steps taken (warm-up 5: lr·k/5 after k steps), not the loop's steps
    lr = 1e-3
    assert [m["lr"] for m in metrics] == pytest.approx([lr * train.lr_factor(k, 5, 1500, "cosine", 0.1) for k in taken])
    # the replicas stay identical, and a skipped step changes no weight (steps 5 and 6 were skipped)
    fingerprints = {}
    for step in (2, 4, 6, 8):
        ranks = [json.loads((run / "checkpoints" / f"step_{step:08d}" / "data" / f"rank{r}.json").read_text())
                 for r in (0, 1)]
        assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"], step
        fingerprints[step] = ranks[0]["weights_checksum"]
    assert fingerprints[4] == fingerprints[6] != fingerprints[2] and fingerprints[8] != fingerprints[6]
    state = json.loads((run / "checkpoints" / "step_00000008" / "train_state.json").read_text())
    assert state["optimizer_steps"] == 4 and state["nan_skips"] == 4
    assert "replicas diverged" not in log
    # nothing of a skipped window leaks into the next step (step 6's finite micro-step 0 gradients, say): steps 7-8
    # equal a run resumed from the step-6 checkpoint, which holds no gradients
    clean = tmp_path / "clean"
    accelerate_launch(launch, ROOT / "pipeline" / "train.py",
                      [*args, "--output-dir", str(clean), "--resume", str(run / "checkpoints" / "step_00000006")])
    after = [json.loads(line) for line in (clean / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in after] == [7, 8]
    for m, ref in zip(metrics[6:], after):
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-6) and m["grad_norm"] == pytest.approx(ref["grad_norm"],
                                                                                                    rel=1e-5)
    ref = json.loads((clean / "checkpoints" / "step_00000008" / "data" / "rank0.json").read_text())
    moved = abs(float(fingerprints[8]) - float(fingerprints[6]))  # what two steps change
    assert abs(float(ref["weights_checksum"]) - float(fingerprints[8])) < 1e-3 * moved  # (resume under DDP: ~1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["8gpu_ddp.yaml", "8gpu_zero2.yaml"])
def test_accumulation_equals_one_large_batch_across_ranks(launch, shards, tmp_path):
    """2 ranks × 4 images × 2 micro-steps is one step on 2 × 8 images under DDP and DeepSpeed (whose engine scales
    the loss by the accumulation itself): the same losses and gradient norms, so no double or missing division."""
    runs = {}
    for name, batch, accum in [("big", 8, 1), ("accum", 4, 2)]:
        runs[name] = tmp_path / name
        accelerate_launch(launch, wrapper(tmp_path, keyed=True), [
            "--config", "launch/configs/demo.yaml", "--output-dir", str(runs[name]), "--max-steps", "2", *merged(
                f"data.shards={shards}", *SHRINK["demo.yaml"], *COMMON, "logging.sample_every=0",
                "train.caption_dropout=0", f"optim.batch_size={batch}", f"optim.grad_accum={accum}")])
    big, acc = ([json.loads(line) for line in (runs[n] / "metrics.jsonl").read_text().splitlines()] for n in runs)
    assert [m["step"] for m in big] == [m["step"] for m in acc] == [1, 2]
    for b, a in zip(big, acc):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


# --- launch files and configs that cannot work together: refused before the first step ------------------------------

def refused(file: str, shards, tmp_path, *overrides, nproc=1) -> str:
    run = tmp_path / "run"
    res = accelerate_launch(file, ROOT / "pipeline" / "train.py", [
        "--config", "launch/configs/demo.yaml", "--output-dir", str(run), "--max-steps", "2",
        *merged(f"data.shards={shards}", *SHRINK["demo.yaml"], "logging.tracker=none", *overrides)], nproc=nproc, ok=False)
    assert not list((run / "checkpoints").glob("step_*")) if (run / "checkpoints").exists() else True
    return res.stdout + res.stderr


@pytest.mark.slow
def test_deepspeed_fp16_runs_where_supported_and_is_refused_elsewhere(shards, tmp_path):
    """The job decides by DeepSpeed's own capability check (its CPU accelerator has fp16 on CPUs with AVX-512 FP16):
    where it says yes, ZeRO-2 trains in fp16 (its loss scaler may skip a first step); elsewhere one clear line."""
    if not DS_FP16:
        log = refused("8gpu_zero2.yaml", shards, tmp_path / "fp16", "optim.mixed_precision=fp16")
        assert "error: DeepSpeed has no fp16 on this device" in log and 'train.py", line' not in log  # no crash
        return
    case = Case("8gpu_zero2.yaml", "demo.yaml", "fp16", 1, True)
    run = tmp_path / "run"
    res = accelerate_launch(case.launch, ROOT / "pipeline" / "train.py", [
        "--config", "launch/configs/demo.yaml", "--output-dir", str(run), "--max-steps", "2", *merged(
            f"data.shards={shards}", *SHRINK["demo.yaml"], *COMMON, "optim.mixed_precision=fp16")])
    check_run(run, case, 2, res.stdout + res.stderr)


@pytest.mark.slow
def test_incompatible_launches_are_refused_with_a_clear_message(shards, tmp_path):
    log = refused("8gpu_zero2.yaml", shards, tmp_path / "compile", "train.compile=true")
    assert "error: train.compile=true is not supported under DeepSpeed" in log and 'train.py", line' not in log
    # an explicit DeepSpeed batch size that contradicts optim.batch_size
    ds = json.loads((ROOT / "launch" / "deepspeed" / "zero2.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 16
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    res = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
         str(tmp_path / "ds.json"), "--num_processes", "1", "--main_process_port", str(free_port()),
         "pipeline/train.py", "--config", "launch/configs/demo.yaml", "--output-dir", str(tmp_path / "batch"), "--max-steps", "2",
         f"data.shards={shards}", *SHRINK["demo.yaml"], "logging.tracker=none"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "the DeepSpeed config sets train_micro_batch_size_per_gpu=16 but the run config gives 4 (optim.batch_size)" \
        in res.stdout + res.stderr


@pytest.mark.slow
def test_processes_that_would_each_train_alone_are_refused(shards, tmp_path):
    """`accelerate launch` with the multi-GPU file on a machine without GPUs starts 2 processes that each see a world
    of one: they would train apart and overwrite each other's checkpoints."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    res = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/8gpu_ddp.yaml",
         "--num_processes", "2", "--main_process_port", str(free_port()), "pipeline/train.py", "--config",
         "launch/configs/demo.yaml", "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
         f"data.shards={shards}", *SHRINK["demo.yaml"], "logging.tracker=none"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if torch.cuda.device_count() >= 2:
        pytest.skip("GPUs here: the launch is a real DDP one")
    assert res.returncode != 0
    assert "2 processes were launched but Accelerate runs each alone" in res.stdout + res.stderr


class _Plugin:
    zero_stage = 3


class _State:
    deepspeed_plugin = _Plugin()


class _Accelerator:
    state = _State()


def test_zero3_with_a_frozen_module_in_the_engine_is_refused():
    cfg = train.config_from_args(train.parse_args(["--config", str(ROOT / "launch/configs/demo.yaml")]))
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    dist.check_launch(cfg, _Accelerator(), model)  # all trainable: fine
    model[0].requires_grad_(False)
    with pytest.raises(dist.LaunchError, match=r"ZeRO-3 with frozen parameters inside the engine \(0.weight, 0.bias"):
        dist.check_launch(cfg, _Accelerator(), model)


# --- the SLURM script ----------------------------------------------------------------------------------------------

STUBS = {
    # srun: run the task once per node, as SLURM would, with that node's SLURM_NODEID
    "srun": '#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\n'
            'for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n "$@" || exit 1; done\n',
    "scontrol": '#!/bin/bash\necho node-a; echo node-b\n',
    # accelerate: record the arguments it was given, one JSON list per node
    "accelerate": f'#!{sys.executable}\nimport json, os, sys\n'
                  'open(os.environ["STUB_LOG"] + "." + os.environ["SLURM_NODEID"], "w").write(json.dumps(sys.argv[1:]))\n',
}


def test_slurm_script_passes_overrides_intact(tmp_path):
    """train_multinode.sbatch under stub srun/scontrol/accelerate: a quoted brace pattern and a value with spaces reach
    pipeline/train.py as one argument each (no second shell expands them), each node gets its own rank, and a run
    folder holding a checkpoint is resumed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    run_dir = tmp_path / "runs" / "t2i"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "argv"),
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NAME": "t2i", "RUN_DIR": str(run_dir)}
    overrides = ["data.shards=/data/laion/{00000..09999}.tar", "logging.sample_prompts=[a red bus, a corgi]"]

    def submit():
        subprocess.run(["bash", "launch/slurm/train_multinode.sbatch", "launch/configs/base64.yaml", *overrides],
                       cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=60)
        return [json.loads((tmp_path / f"argv.{n}").read_text()) for n in (0, 1)]

    for node, argv in enumerate(submit()):
        assert argv[0] == "launch"
        launcher = argv[1:argv.index("pipeline/train.py")]
        opts = dict(zip(launcher[::2], launcher[1::2]))
        assert opts["--machine_rank"] == str(node) and opts["--num_machines"] == "2"
        assert opts["--num_processes"] == "16" and opts["--main_process_ip"] == "node-a"
        assert opts["--config_file"] == "launch/accelerate/8gpu_zero2.yaml"
        args = train.parse_args(argv[argv.index("pipeline/train.py") + 1:])
        assert args.overrides == overrides and args.resume is None and args.output_dir == str(run_dir)
        cfg = train.config_from_args(args)
        assert cfg.data.shards == "/data/laion/{00000..09999}.tar"
        assert cfg.logging.sample_prompts == ["a red bus", "a corgi"]
    (run_dir / "checkpoints" / "step_00000100").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000100" / "train_state.json").write_text("{}")
    assert all(train.parse_args(a[a.index("pipeline/train.py") + 1:]).resume == "latest" for a in submit())
