"""Cost and precision of the likelihood estimators of `evaluate.py nll` on a trained model.

    python benchmarks/bench_likelihood.py --model runs/quickstart/run/model --images "runs/quickstart/held_out/*.tar"

1. Probability-flow ODE vs the solver's tolerance: seconds per image, network evaluations, bits/dim ± stderr.
2. Hutchinson's estimator vs probes K: the spread of one image's estimate over --repeats probe draws (the same
   dequantised image each time: the estimator's own noise), the standard error over images, seconds per image.
3. ELBO vs the number of timesteps it evaluates: seconds per image, bits/dim ± stderr (all T−1 KL terms = exact sum).
Prints markdown tables for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffusion.likelihood import ode_log_likelihood  # noqa: E402
from metrics.likelihood import LOG2_127_5, LikelihoodOptions, batch_bits, dequantize, generators, summarize  # noqa: E402
from pipeline.checkpoint import load_exported  # noqa: E402
from data.folders import labelled_images  # noqa: E402
from pipeline.generate import cond_to  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model folder")
    p.add_argument("--images", required=True, help="held-out images (folder or shards)")
    p.add_argument("--num-images", type=int, default=8, help="images per measurement (one batch)")
    p.add_argument("--tolerances", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5])
    p.add_argument("--probes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=3, help="probe seeds per K")
    p.add_argument("--elbo-timesteps", type=int, nargs="+", default=[10, 50, 200, 0], help="0 = all")
    p.add_argument("--parts", nargs="+", default=["ode", "probes", "elbo"], choices=["ode", "probes", "elbo"])
    args = p.parse_args()

    torch.set_grad_enabled(False)
    unet, encoder, diffusion, vae, meta = load_exported(args.model)
    samples = labelled_images(args.images, meta["resolution"], args.num_images, False, None, Counter())
    images = torch.from_numpy(np.stack([im for im, _ in samples])).permute(0, 3, 1, 2)
    cond = cond_to(encoder.encode([c for _, c in samples]), "cpu")
    idx = list(range(len(samples)))
    n = len(samples)

    def net(x, t, c):
        return unet(x, t, c).float()

    def run(**kw):
        start = time.perf_counter()
        rows = batch_bits(net, diffusion, images, idx, cond, LikelihoodOptions(**kw), vae)
        return rows, (time.perf_counter() - start) / n

    print(f"model {args.model} (step {meta['step']}, {meta['resolution']} px, {diffusion.prediction}, "
          f"T={diffusion.num_steps}); {n} images in one batch; torch threads {torch.get_num_threads()}\n")
    print("| ODE rtol = atol | s/image | network evaluations | bits/dim ± stderr |\n|---:|---:|---:|---|")
    for tol in args.tolerances if "ode" in args.parts else []:
        rows, sec = run(method="ode", rtol=tol, atol=tol)
        s = summarize(rows)
        print(f"| {tol:g} | {sec:.2f} | {rows[0]['nfe']} | {s['bits_per_dim']:.4f} ± {s['bits_per_dim_stderr']:.4f} |",
              flush=True)

    tol = args.tolerances[0]
    print(f"\n| probes K (rtol {tol:g}) | s/image | spread of one image's estimate (bits/dim) | stderr over images |"
          "\n|---:|---:|---:|---:|")
    x = dequantize(images, generators(0, idx, 1))  # fixed: only the probes change between repeats
    dims, offset = x[0].numel(), LOG2_127_5
    for k in args.probes if "probes" in args.parts and vae is None else []:
        draws, secs = [], []
        for r in range(args.repeats):
            start = time.perf_counter()
            out = ode_log_likelihood(net, diffusion, x, cond, probes=k, rtol=tol, atol=tol,
                                     generators=generators(r, idx, 2))
            secs.append((time.perf_counter() - start) / n)
            draws.append((-out["log_px"] / (dims * math.log(2)) + offset).tolist())
        draws = np.array(draws)  # (repeats, images)
        spread = float(np.mean(np.std(draws, axis=0, ddof=1)))
        stderr = float(np.mean(np.std(draws, axis=1, ddof=1) / math.sqrt(n)))
        print(f"| {k} | {np.mean(secs):.2f} | {spread:.4f} | {stderr:.4f} |", flush=True)

    print("\n| ELBO timesteps | s/image | bits/dim ± stderr |\n|---:|---:|---|")
    for k in args.elbo_timesteps if "elbo" in args.parts else []:
        rows, sec = run(method="elbo", elbo_timesteps=k or None)
        s = summarize(rows)
        label = f"all {diffusion.num_steps - 1}" if not k else str(k)
        print(f"| {label} | {sec:.2f} | {s['elbo_bits_per_dim']:.4f} ± {s['elbo_bits_per_dim_stderr']:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
