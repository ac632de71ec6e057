"""Gradient attacks on images in [0, 1]: PGD (L-inf, L2) and DeepFool.

Only the input is differentiated (``torch.autograd.grad`` with respect to the
perturbation), so the model's ``.grad`` fields are never written.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

Norm = Literal["linf", "l2"]
# objective(logits, labels) -> per-sample values that the attack increases
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def _l2_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.ndim - 1)))


def pgd(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor, *,
        eps: float, norm: Norm, steps: int, step_size: float | None = None, random_start: bool = True,
        generator: torch.Generator | None = None, objective: Objective = cross_entropy) -> torch.Tensor:
    """Projected gradient ascent on ``objective`` within the ``norm`` ball of radius ``eps``
    (Madry et al. 2018; step 2.5 eps / steps by default). Returns the adversarial images."""
    if eps <= 0 or steps <= 0:
        return images.clone()
    step = step_size if step_size is not None else 2.5 * eps / steps
    delta = torch.zeros_like(images)
    if random_start:
        noise = torch.rand(images.shape, generator=generator).to(images.device)
        if norm == "linf":
            delta = (noise * 2 - 1) * eps
        else:
            direction = torch.randn(images.shape, generator=generator).to(images.device)
            delta = direction / _l2_norm(direction) * eps * noise.flatten(1)[:, :1].view(-1, 1, 1, 1)
        delta = (images + delta).clamp(0, 1) - images
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            value = objective(model(images + delta), labels).sum()
            (grad,) = torch.autograd.grad(value, delta)
        delta = delta.detach()
        if norm == "linf":
            delta = (delta + step * grad.sign()).clamp(-eps, eps)
        else:
            delta = delta + step * grad / _l2_norm(grad)
            delta = delta * (eps / _l2_norm(delta)).clamp(max=1.0)
        delta = (images + delta).clamp(0, 1) - images
    return (images + delta).detach()


def deepfool(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *, num_candidates: int = 10,
             max_iter: int = 50, overshoot: float = 0.02) -> torch.Tensor:
    """DeepFool (Moosavi-Dezfooli et al. 2016), L2, batched: the smallest linearised step to
    the nearest of the ``num_candidates`` top classes, until the prediction changes.
    Returns the adversarial images (clipped to [0, 1])."""
    with torch.no_grad():
        logits = model(images)
    original = logits.argmax(1)
    k = min(num_candidates, logits.shape[1])
    candidates = logits.topk(k, dim=1).indices  # (N, k); column 0 is the prediction
    total = torch.zeros_like(images)
    active = torch.ones(len(images), dtype=torch.bool, device=images.device)
    rows = torch.arange(len(images), device=images.device)
    for _ in range(max_iter):
        if not active.any() or k < 2:
            break
        x = (images + (1 + overshoot) * total).clamp(0, 1).requires_grad_(True)
        with torch.enable_grad():
            out = model(x)
            current = out.gather(1, candidates)  # (N, k)
            grads = [torch.autograd.grad(current[:, j].sum(), x, retain_graph=j < k - 1)[0] for j in range(k)]
        active &= out.argmax(1) == original
        if not active.any():
            break
        grads_t = torch.stack(grads, 1)  # (N, k, C, H, W)
        w = grads_t[:, 1:] - grads_t[:, :1]
        f = (current[:, 1:] - current[:, :1]).detach()
        w_norm = w.flatten(2).norm(dim=2).clamp_min(1e-8)
        ratio = f.abs() / w_norm
        best = ratio.argmin(1)
        r = ((ratio[rows, best] + 1e-4) / w_norm[rows, best]).view(-1, 1, 1, 1) * w[rows, best]
        total = total + r * active.view(-1, 1, 1, 1)
    return (images + (1 + overshoot) * total).clamp(0, 1).detach()


def apgd_score(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *,
               score: Callable[[torch.Tensor], torch.Tensor], eps: float, norm: Norm, steps: int, restarts: int,
               seed: int) -> torch.Tensor:
    """torchattacks' APGD (Croce and Hein 2020) with its cross-entropy loss, raising ``score``
    of each image: the attacked network outputs ``[0, score]`` and the label is 0, whose
    cross-entropy ``log(1 + exp(score))`` rises with the score. ``best_loss`` mode keeps, over
    ``restarts`` random starts, each image's highest score (no early stop on a label change)."""
    try:
        import torchattacks
    except ImportError:
        from ..errors import ConfigError

        raise ConfigError("attack apgd_ce uses torchattacks' APGD, which is not installed: pip install --no-deps "
                          "torchattacks (its requirements pin an old requests)", key="attack") from None

    class ScoreAsCrossEntropy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            value = score(model(x))
            return torch.stack([torch.zeros_like(value), value], dim=1)

    attack = torchattacks.APGD(ScoreAsCrossEntropy(), norm="Linf" if norm == "linf" else "L2", eps=eps, steps=steps,
                               n_restarts=restarts, loss="ce", seed=seed)
    attack.device = images.device
    _, adversarial = attack.perturb(images, torch.zeros(len(images), dtype=torch.long, device=images.device),
                                    best_loss=True)
    return adversarial.detach()
