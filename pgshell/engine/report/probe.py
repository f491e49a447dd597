"""Baselines on frozen features: a weighted k-NN (DINO's protocol) and a linear probe (logistic regression).

The number a fine-tune must beat, in seconds: the backbone runs once over train and val (batches/features.py), then
these pure functions classify the stored features. Inputs are tensors — features (N, D), labels (N,) — on any device;
nothing here loads data or touches a model.

k-NN (Caron et al. 2021, DINO's eval_knn.py): features are L2-normalised, each query's k most cosine-similar training
features vote for their class with weight exp(similarity / T), T = 0.07; the class with the most weight wins.

Linear probe: multinomial logistic regression on standardised features, fitted full-batch with L-BFGS (a convex
problem: deterministic, no learning rate to tune). The L2 strength is chosen along a path from strong to weak by the
loss on a seeded fifth of the training features, then the probe is refitted on all of them — the validation split is
never used to choose anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KNN_K = 20  # DINO reports k = 20 as the best on ImageNet
KNN_TEMPERATURE = 0.07  # DINO's default temperature for the votes
WEIGHT_DECAYS = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)  # the linear probe's L2 path, strongest first
HOLDOUT = 0.2  # fraction of the training features that chooses the L2 strength


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of class scores (N, C) against labels (N,)."""
    if not len(labels):
        return 0.0
    return (scores.argmax(1) == labels.to(scores.device)).float().mean().item()


@torch.no_grad()
def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, num_classes: int,
               k: int = KNN_K, temperature: float = KNN_TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """Class scores (Q, C): the summed exp(cos / T) weights of each query's k nearest training features, by class."""
    if k < 1:
        raise ValueError("k must be at least 1")
    train = F.normalize(train_x.float(), dim=1)
    labels = train_y.to(train.device).long()
    k = min(k, len(train))
    out = []
    for b in range(0, len(query_x), chunk):  # (chunk, N) similarities at a time: the full Q x N matrix can be large
        q = F.normalize(query_x[b:b + chunk].float().to(train.device), dim=1)
        sim, idx = (q @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=train.device)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        out.append(votes)
    return torch.cat(out) if out else torch.empty(0, num_classes)


@dataclass
class LinearProbe:
    """A fitted probe: scores = ((x - mean) / std) @ weight.T + bias."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    weight_decay: float

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float().to(self.mean.device) - self.mean) / self.std) @ self.weight.T + self.bias

    def as_linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of one Linear layer on the raw features giving the same scores: the standardisation folded
        in, W / std and b - (W / std) @ mean."""
        weight = self.weight / self.std
        return weight, self.bias - weight @ self.mean


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int,
         init: tuple | None = None) -> tuple:
    """Logistic regression on already standardised x: (weight, bias) minimising mean cross-entropy + wd/2 |W|^2,
    from `init` (a neighbouring solution on the regularisation path) or zeros."""
    w0, b0 = init or (torch.zeros(num_classes, x.shape[1], device=x.device), torch.zeros(num_classes, device=x.device))
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may hold no_grad; the fit needs gradients of its own two tensors only
        opt.step(closure)
    return w.detach(), b.detach()


def fit_linear(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
               weight_decays: tuple[float, ...] = WEIGHT_DECAYS, max_iter: int = 100, seed: int = 0) -> LinearProbe:
    """Fit the probe. With several `weight_decays` (strongest first) it walks the regularisation path on 80% of the
    training features, each fit starting from the previous one, and stops once the loss on the other 20% rises: weaker
    L2 past that point only overfits more, and those are the slow, ill-conditioned fits. The L2 with the lowest
    holdout loss is then refitted on all the training features."""
    x, y = train_x.float(), train_y.to(train_x.device).long()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    chosen, start = weight_decays[0], None
    n_hold = int(len(z) * HOLDOUT)
    if len(weight_decays) > 1 and n_hold >= num_classes:
        perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed)).to(z.device)
        hold, fit = perm[:n_hold], perm[n_hold:]
        best, previous = float("inf"), None
        for wd in weight_decays:
            previous = _fit(z[fit], y[fit], num_classes, wd, max_iter, previous)
            loss = F.cross_entropy(z[hold] @ previous[0].T + previous[1], y[hold]).item()
            if loss >= best:
                break
            best, chosen, start = loss, wd, previous
    w, b = _fit(z, y, num_classes, chosen, max_iter, start)
    return LinearProbe(mean, std, w, b, chosen)
