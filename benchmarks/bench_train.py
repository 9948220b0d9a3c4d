"""The full training step (data → text encoder → loss → backward → AdamW → EMA) through the real job.

    python benchmarks/bench_train.py [--steps 40] [--batch 16] [--compile] [--models tiny small/2]

Runs pipeline/train.py in a child process for `tiny` and a reduced `small` (base_channels 64), with the live text
encoder, with precomputed caption embeddings, and with bf16 autocast (`optim.mixed_precision=bf16`), and reports steady-state images/s and the data-wait fraction
(from the job's own metrics, last logging window), peak resident memory (the child and its data workers, polled),
and the model's training FLOPs per image (forward + backward, torch's FLOP counter). ``--compile`` adds fp32 and
bf16 runs with ``train.compile=true`` (the compilation falls in the first logging window, not the measured one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.write_shards import write_toy  # noqa: E402
from models.registry import build_model  # noqa: E402

MODELS = {"tiny": [], "small/2": ["model.overrides.base_channels=64"]}


def train_flops(size_args: list[str], res: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    overrides = {a.split("=")[0].split(".")[-1]: int(a.split("=")[1]) for a in size_args}
    model = build_model("tiny" if not size_args else "small", context_dim=64, pooled_dim=64, **overrides)
    x, t = torch.randn(1, 3, res, res), torch.tensor([500])
    cond = {"tokens": torch.randn(1, 77, 64), "mask": torch.ones(1, 77, dtype=torch.bool), "pooled": torch.randn(1, 64)}
    with FlopCounterMode(display=False) as counter:
        model(x, t, cond).sum().backward()
    return counter.get_total_flops(), sum(p.numel() for p in model.parameters())


def run(argv: list[str]) -> float:
    """Peak RSS (MiB) of the child and its workers while it runs."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "pipeline/train.py"), *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            procs = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs))
        except psutil.Error:
            pass
        time.sleep(0.2)
    if proc.returncode:
        raise RuntimeError(proc.stderr.read()[-3000:])
    return peak / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimiser steps per run; the last half is measured")
    p.add_argument("--batch", type=int, default=16, help="images per step")
    p.add_argument("--resolution", type=int, default=32, help="image resolution")
    p.add_argument("--compile", action="store_true", help="also run with train.compile=true (fp32 and bf16)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="which models to run")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_toy(tmp / "shards", count=2048, resolution=args.resolution, max_samples=256)
        common = ["--config", str(ROOT / "launch/configs/demo.yaml"), "--max-steps", str(args.steps),
                  f"data.shards={tmp / 'shards'}", f"data.resolution={args.resolution}", "logging.tracker=none",
                  f"logging.every={args.steps // 2}", "logging.sample_every=0", "logging.sample_steps=1",
                  "logging.sample_per_prompt=1", f"checkpoint.every={10 * args.steps}", f"optim.batch_size={args.batch}"]
        cache = tmp / "captions.safetensors"
        subprocess.run([sys.executable, str(ROOT / "pipeline/precompute.py"), *common[:2], "--out", str(cache),
                        f"data.shards={tmp / 'shards'}"], cwd=ROOT, check=True, capture_output=True)
        print(f"{torch.get_num_threads()} threads, {args.resolution} px, batch {args.batch}, {args.steps} steps")
        print("| model | params | train GFLOPs/img | captions | img/s | data wait | peak RSS |")
        print("|---|---:|---:|---|---:|---:|---:|")
        for name in args.models:
            size_args = MODELS[name]
            flops, params = train_flops(size_args, args.resolution)
            settings = [("live encoder", []), ("precomputed", [f"text_encoder.cache={cache}"]),
                        ("live, bf16 autocast", ["optim.mixed_precision=bf16"])]
            if args.compile:
                settings += [("live, compiled", ["train.compile=true"]),
                             ("live, bf16 autocast, compiled", ["optim.mixed_precision=bf16", "train.compile=true"])]
            for i, (label, extra) in enumerate(settings):
                out = tmp / f"run_{name.replace('/', '_')}_{i}"
                size = ["model.size=small", *size_args] if size_args else []
                peak = run([*common, "--output-dir", str(out), *size, *extra])
                last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
                print(f"| {name} | {params / 1e6:.1f}M | {flops / 1e9:.2f} | {label} | {last['images_per_s']:.1f} | "
                      f"{100 * last['data_wait_fraction']:.0f}% | {peak:.0f} MiB |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
