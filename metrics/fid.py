"""FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to Inception-v3 pool3 features of two image sets,
    FID = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}.

The network is pytorch-fid's ``InceptionV3`` (the TF-ported FID weights, ``pt_inception-2015-12-05-6726825d.pth``)
with pytorch-fid's preprocessing — images as [0, 1] tensors at their own size, bilinear resize to 299 inside the
network — so numbers match pytorch-fid and TensorFlow FID. Weights come from a local file only (a flag, or the
torch-hub cache); nothing is downloaded. Statistics are float64 and saved as pytorch-fid-compatible ``.npz``
(``mu``, ``sigma``). The matrix square root's trace comes from the eigenvalues of Σ₁^{1/2} Σ₂ Σ₁^{1/2}
(symmetric PSD), not from ``scipy.linalg.sqrtm``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import torch

log = logging.getLogger(__name__)
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
FID_SHA256_PREFIX = "6726825d"  # torch-hub convention: the file name carries the first 8 hex digits of its SHA-256
CPU_CHUNK = 8  # images per Inception forward on a CPU


def find_inception_weights(path: str | None = None) -> Path:
    """The FID Inception weights file: ``path`` if given, else the torch-hub cache. Never downloads."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights {p} do not exist (--inception-weights)")
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME
    if not cached.is_file():
        raise FileNotFoundError(
            f"the FID Inception weights are not available offline: looked for {cached}. Download {FID_WEIGHTS_URL} "
            f"once and put it there (or pass --inception-weights FILE)")
    return cached


def check_sha256(path: Path):
    """Warn when a file under the official name is not the official file (its numbers are not comparable)."""
    if path.name != FID_WEIGHTS_NAME:
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(FID_SHA256_PREFIX):
        log.warning("%s is not the official FID Inception file (SHA-256 %s…, expected %s…): FIDs computed with it are "
                    "not comparable with published ones", path, digest[:8], FID_SHA256_PREFIX)


def _fold_batch_norms(net: torch.nn.Module) -> None:
    """Fold every inference-mode BatchNorm into the convolution before it (torchvision's ``BasicConv2d``:
    conv → bn → relu): one pass less over each activation (~1.25× on a CPU), features equal to ~1e-6 relative."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for m in net.modules():
        if isinstance(getattr(m, "conv", None), torch.nn.Conv2d) and isinstance(getattr(m, "bn", None), torch.nn.BatchNorm2d):
            m.conv, m.bn = fuse_conv_bn_eval(m.conv, m.bn), torch.nn.Identity()


class InceptionFeatures(torch.nn.Module):
    """images (B, 3, H, W) float in [0, 1] → pool3 features (B, 2048), exactly pytorch-fid's model."""

    dims = 2048

    def __init__(self, weights: str | None = None):
        super().__init__()
        from pytorch_fid import inception

        path = find_inception_weights(weights)
        check_sha256(path)

        def local(url, *args, **kwargs):  # pytorch-fid asks torch hub for its URL: answer with the local file
            return torch.load(path, map_location="cpu", weights_only=True)

        with mock.patch.object(inception, "load_state_dict_from_url", local):
            self.net = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        self.net.eval().requires_grad_(False)
        _fold_batch_norms(self.net)
        # channels_last: oneDNN's fast convolution layout on CPUs (~1.5× here), the same numbers to ~1e-6
        self.net.to(memory_format=torch.channels_last)
        self.identity = f"inception:{path.name}"

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.contiguous(memory_format=torch.channels_last)
        # On a CPU, 8 images per forward run ~1.2× faster than 50 (a 299-px activation of 8 images stays in cache;
        # benchmarks/README.md); results do not depend on the split
        chunk = CPU_CHUNK if x.device.type == "cpu" else len(x)
        return torch.cat([self.net(part)[0].flatten(1) for part in x.split(chunk)])


@dataclass
class FeatureStats:
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    n: int = 0
    # (n, D): (features − μ) / √(n − 1), so that Σ = AᵀA; kept when n ≤ D (not saved: pytorch-fid's .npz has none)
    root: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        f = np.asarray(features, dtype=np.float64)
        if len(f) < 2:
            raise ValueError(f"statistics need at least 2 images, got {len(f)}")
        mu = f.mean(0)
        root = (f - mu) / np.sqrt(len(f) - 1) if len(f) <= f.shape[1] else None
        return cls(mu, np.cov(f, rowvar=False), len(f), root)


def save_stats(stats: FeatureStats, path: str | os.PathLike):
    """pytorch-fid's format (``mu``, ``sigma``) plus the count; written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=stats.mu, sigma=stats.sigma, n=np.array(stats.n))
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike) -> FeatureStats:
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} is not a statistics file (needs arrays 'mu' and 'sigma')")
        return FeatureStats(f["mu"].astype(np.float64), f["sigma"].astype(np.float64), int(f["n"]) if "n" in f else 0)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 tr (Σ_a Σ_b)^{1/2} (Fréchet distance of two Gaussians; Dowson & Landau 1982).

    tr (Σ_a Σ_b)^{1/2} = Σ_i √λ_i over the eigenvalues of a symmetric PSD matrix similar to Σ_a Σ_b (up to zeros):
    A Σ_b Aᵀ (n × n) when Σ_a = AᵀA comes from n ≤ D images — the nonzero eigenvalues of AᵀA Σ_b and A Σ_b Aᵀ are the
    same —, else Σ_a^{1/2} Σ_b Σ_a^{1/2} (D × D). Exact for singular Σ (fewer samples than dimensions), where sqrtm
    needs an ε fudge; with 256 images of 2048 features the first is ~50× cheaper (benchmarks/README.md, "FID")."""
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"statistics have different dimensions: {a.mu.shape[0]} and {b.mu.shape[0]} "
                         f"(computed with different feature extractors?)")
    low = min((s for s in (a, b) if s.root is not None), key=lambda s: s.n, default=None)
    if low is not None:
        other = b if low is a else a
        m = low.root @ other.sigma @ low.root.T
    else:
        s = _psd_sqrt(a.sigma)
        m = s @ b.sigma @ s
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())
