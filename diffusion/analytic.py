"""Exact ε-predictors for Gaussian and Gaussian-mixture data: ground truth for testing samplers and guidance.

For x_0 ~ Σ_k π_k N(μ_k, s_k² I), the forward marginal is p_t = Σ_k π_k N(√ᾱ_t μ_k, v_k I) with
v_k = ᾱ_t s_k² + 1 − ᾱ_t, so the score is ∇log p_t(x) = Σ_k r_k(x) · (√ᾱ_t μ_k − x)/v_k with responsibilities
r_k ∝ π_k N(x; √ᾱ_t μ_k, v_k I), and the optimal ε-predictor is ε*(x, t) = −√(1−ᾱ_t) ∇log p_t(x) (Song et al. 2021).
"""

from __future__ import annotations

import torch

from .gaussian import GaussianDiffusion


class GaussianMixtureModel:
    """The exact network for a mixture of isotropic Gaussians in D dimensions.

    means: (K, D); stds: (K,); weights: (K,) summing to 1. Called as ``model(x (B, D), t (B,), cond)``, it
    returns the exact ε (or v / x_0, following ``diffusion.prediction``). ``cond`` may be None (the mixture)
    or an int64 tensor (B,) of component indices with −1 meaning "unconditional": the exact class-conditional
    model for classifier-free-guidance tests.
    """

    def __init__(self, diffusion: GaussianDiffusion, means, stds, weights=None):
        self.diffusion = diffusion
        self.means = torch.as_tensor(means, dtype=torch.float64)
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k)
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()

    def score(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        # Batch last, (K, D, B): the sums over K and D then run along the contiguous batch (2.5× faster on a CPU for
        # B = 20 000, K = D = 2 than reducing over a last dimension of 2), which the sampler tests call ~1000×.
        xd = x.double().T[None]  # (1, D, B)
        ab = self._alpha_bar(t, x.double()[:, :1]).T[None]  # (1, 1, B)
        mu = ab.sqrt() * self.means[:, :, None]  # (K, D, B)
        var = ab * self.stds[:, None, None] ** 2 + (1 - ab)  # (K, 1, B)
        diff = xd - mu
        d = x.shape[1]
        logp = -0.5 * (diff**2).sum(1) / var[:, 0] - 0.5 * d * torch.log(var[:, 0]) + torch.log(self.weights)[:, None]
        if cond is not None:  # logp: (K, B)
            cond = torch.as_tensor(cond, device=x.device).long()
            onehot = torch.nn.functional.one_hot(cond.clamp(min=0), len(self.weights)).bool().T  # (K, B)
            keep = onehot | (cond[None] < 0)  # −1: all components (unconditional)
            logp = logp.masked_fill(~keep, float("-inf"))
        r = torch.softmax(logp, dim=0)  # (K, B) responsibilities
        return (r[:, None] * (-diff / var)).sum(0).T.contiguous()  # (B, D)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        score = self.score(x, t, cond)
        ab = self._alpha_bar(t, x.double())
        eps = -(1 - ab).sqrt() * score
        if self.diffusion.prediction == "epsilon":
            out = eps
        else:
            # x̂_0 = E[x_0 | x_t]; where ᾱ_t = 0 (zero terminal SNR) x_t says nothing and it is the data mean
            x0 = ((x.double() - (1 - ab).sqrt() * eps) / ab.sqrt()).nan_to_num()
            x0 = torch.where(ab > 0, x0, (self.weights[:, None] * self.means).sum(0))
            out = x0 if self.diffusion.prediction == "x0" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
        return out.to(x.dtype)

    def _alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t (B, 1): the table at integer t, the continuous-time ᾱ(t) of the likelihood's ODE at real t."""
        t = torch.as_tensor(t, device=like.device)
        if t.is_floating_point():
            return self.diffusion.alpha_bar_at(t.expand(like.shape[0]))[:, None].to(like.dtype)
        return self.diffusion.alpha_bar(t, like)

    def log_prob(self, x: torch.Tensor, t: float = -1.0, cond: torch.Tensor | None = None) -> torch.Tensor:
        """log p_t(x) in nats, (B,) float64: the closed-form density of the forward marginal at real time t (−1 = the
        data). The ground truth the likelihood estimators are tested against."""
        xd = x.double()
        ab = self.diffusion.alpha_bar_at(torch.tensor([float(t)], dtype=torch.float64))[0]
        var = ab * self.stds**2 + (1 - ab)  # (K,)
        diff = xd[:, None, :] - ab.sqrt() * self.means[None]  # (B, K, D)
        d = x.shape[1]
        logp = -0.5 * (diff**2).sum(-1) / var - 0.5 * d * torch.log(2 * torch.pi * var)  # (B, K): each component
        mixture = torch.logsumexp(logp + torch.log(self.weights), dim=1)
        if cond is None:
            return mixture
        cond = torch.as_tensor(cond).long()
        own = logp.gather(1, cond.clamp(min=0)[:, None])[:, 0]  # the density of the component given (−1: mixture)
        return torch.where(cond < 0, mixture, own)
