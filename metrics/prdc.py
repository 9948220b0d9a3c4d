"""Precision and recall with k-NN manifolds (Kynkäänniemi et al. 2019), and density / coverage
(Naeem et al. 2020).

The real manifold is the union of balls B(r_i, d_k(r_i)) around each real feature, with d_k the distance to its k-th
nearest real neighbour (itself excluded); likewise for the generated set.
    precision = fraction of generated samples inside the real manifold
    recall    = fraction of real samples inside the generated manifold
    density   = (1 / kM) Σ_j Σ_i 1[f_j ∈ B(r_i)]        coverage = (1 / N) Σ_i 1[∃ j: f_j ∈ B(r_i)]
"""

from __future__ import annotations

import torch


def _kth_radius(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from every row of x to its k-th nearest other row (N,)."""
    radii = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)  # (c, N)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the row itself is at distance 0
    return torch.cat(radii)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """(P, C) bool: point p lies in the ball of centre c (computed in chunks of points)."""
    return torch.cat([torch.cdist(points[i:i + chunk], centres) <= radii[None] for i in range(0, len(points), chunk)])


def precision_recall(real, fake, k: int = 3, density_coverage: bool = False, chunk: int = 1024) -> dict:
    """real (N, D), fake (M, D) features (numpy or torch) → {"precision", "recall"[, "density", "coverage"]}."""
    real = torch.as_tensor(real, dtype=torch.float64)
    fake = torch.as_tensor(fake, dtype=torch.float64)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]}, generated {fake.shape[1]}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} need more than {k} samples in each set")
    r_real, r_fake = _kth_radius(real, k, chunk), _kth_radius(fake, k, chunk)
    fake_in_real = _inside(fake, real, r_real, chunk)  # (M, N)
    out = {"precision": fake_in_real.any(1).double().mean().item(),
           "recall": _inside(real, fake, r_fake, chunk).any(1).double().mean().item()}
    if density_coverage:
        out["density"] = fake_in_real.double().sum().item() / (k * len(fake))
        out["coverage"] = fake_in_real.any(0).double().mean().item()
    return out
