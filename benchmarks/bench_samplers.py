"""Sampler accuracy vs network evaluations, against a closed-form target.

Data x_0 ~ N(μ, s² I) in D dimensions has an exact ε-predictor (diffusion/analytic.py), so every sampler's error is
its own: the 2-Wasserstein distance between the Gaussian fitted to its samples and the true data distribution.
x_T is drawn from the exact p_T, so the prior mismatch of a finite schedule does not enter.

    python benchmarks/bench_samplers.py [--num-samples 200000] [--out benchmarks/results]

Writes samplers.md (table) and samplers.png (error vs evaluations, log-log).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffusion import DiffusionConfig, GaussianDiffusion, sample
from diffusion.analytic import GaussianMixtureModel

STEPS = {
    "ddpm": [10, 20, 50, 100, 250, 1000],
    "ddim": [5, 10, 20, 50, 100, 250, 1000],
    "euler_maruyama": [20, 50, 100, 250, 1000],
    "heun": [5, 8, 10, 15, 25, 50],
    "dpmpp_2m": [5, 8, 10, 15, 20, 25, 50],
    "langevin": [100, 250, 1000],
    "pc": [20, 50, 100, 250, 1000],
}


class Counting:
    """Wraps a model and counts its evaluations (one per call: a guided batch counts once)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t, cond=None):
        self.calls += 1
        return self.model(x, t, cond)


def w2_to_isotropic(x: torch.Tensor, mu: torch.Tensor, s: float) -> float:
    """W2 between N(mean(x), cov(x)) and N(μ, s² I): ‖m − μ‖² + tr C + D s² − 2 s tr C^{1/2}."""
    m, c = x.mean(0), torch.cov(x.T)
    ev = torch.linalg.eigvalsh(c).clamp(min=0)
    d2 = (m - mu).pow(2).sum() + ev.sum() + len(mu) * s**2 - 2 * s * ev.sqrt().sum()
    return float(d2.clamp(min=0).sqrt())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=200_000, help="samples per run (Monte-Carlo floor ~ s·√(D/2N))")
    p.add_argument("--dim", type=int, default=2, help="data dimension D")
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine"], help="β schedule (T = 1000)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for samplers.md / samplers.png")
    args = p.parse_args()

    d = GaussianDiffusion.from_config(DiffusionConfig(schedule=args.schedule))
    mu, s = torch.linspace(-1, 1, args.dim, dtype=torch.float64), 0.5
    model = Counting(GaussianMixtureModel(d, mu[None], [s]))
    ab = d.alphas_cumprod[-1]
    g = torch.Generator().manual_seed(0)
    x_T = ab.sqrt() * mu + (ab * s**2 + 1 - ab).sqrt() * torch.randn(args.num_samples, args.dim, generator=g, dtype=torch.float64)
    floor = w2_to_isotropic(mu + s * torch.randn(args.num_samples, args.dim, generator=g, dtype=torch.float64), mu, s)

    rows = []
    for name, steps_list in STEPS.items():
        for steps in steps_list:
            model.calls = 0
            t0 = time.perf_counter()
            out = sample(name, model, x_T.clone(), d, steps=steps, generator=torch.Generator().manual_seed(1))
            rows.append((name, steps, model.calls, w2_to_isotropic(out, mu, s), time.perf_counter() - t0))
            print(f"{name:15s} steps {steps:5d}  NFE {model.calls:5d}  W2 {rows[-1][3]:.5f}", flush=True)

    ddpm_1000 = next(r[3] for r in rows if r[0] == "ddpm" and r[1] == 1000)
    dpm_20 = min(r[3] for r in rows if r[0] == "dpmpp_2m" and r[2] <= 20)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Sampler error vs evaluations ({args.schedule} schedule, T = 1000, D = {args.dim}, N = {args.num_samples})",
             "", f"Monte-Carlo floor (exact samples): W2 = {floor:.5f}", "",
             "| sampler | steps | NFE | W2 to target |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {st} | {nfe} | {w:.5f} |" for n, st, nfe, w, _ in rows]
    verdict = "reaches" if dpm_20 <= ddpm_1000 else "does NOT reach"
    lines += ["", f"DPM-Solver++(2M) at <= 20 NFE: W2 = {dpm_20:.5f}; DDPM ancestral at 1000: W2 = {ddpm_1000:.5f} "
              f"-> DPM-Solver++(2M) {verdict} DDPM-1000's error."]
    (args.out / "samplers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in STEPS:
        pts = [(r[2], r[3]) for r in rows if r[0] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.axhline(floor, color="gray", ls="--", label="Monte-Carlo floor")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations", ylabel="W2 to the data distribution",
           title=f"Sampler error vs NFE (exact ε, Gaussian data, {args.schedule})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "samplers.png", dpi=120)
    print(f"wrote {args.out / 'samplers.md'} and {args.out / 'samplers.png'}")


if __name__ == "__main__":
    main()
