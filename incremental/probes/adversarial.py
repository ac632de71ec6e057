"""Adversarial robustness: PGD accuracy under L-inf and L2 budgets, and where adversarial
perturbations put their energy in the DCT spectrum (Paul and Chen 2022: ViTs' perturbations
sit lower in frequency than CNNs')."""

from __future__ import annotations


from typing import Any

import numpy as np
import torch

from .attacks import deepfool, pgd
from ..tensorboard import render_heat_map
from .base import Probe, ProbeBatch, ProbeResult


def attack_batches(batch: ProbeBatch, **kwargs: object) -> torch.Tensor:
    """PGD on every batch of the probe's images."""
    return torch.cat([pgd(batch.model, x, y, generator=batch.generator, **kwargs)  # type: ignore[arg-type]
                      for x, y in batch.batches()])


class AdversarialProbe(Probe):
    """Accuracy under PGD attacks (L-inf and L2) at each budget."""

    default_samples = 100
    needs_input_gradients = True  # type: ignore[assignment]

    def resolved(self, batch: ProbeBatch) -> dict[str, Any]:
        cfg = self.config
        return {"attack": "pgd", "step_size": {f"{norm}/{eps}": cfg.step_size or 2.5 * eps / cfg.steps
                                               for norm in ("linf", "l2") for eps in getattr(cfg, f"{norm}_eps")}}

    def forward_passes(self, batch: ProbeBatch) -> int:
        budgets = len(self.config.linf_eps) + len(self.config.l2_eps)
        return (1 + budgets * (self.config.steps + 1)) * batch.chunks()  # PGD's steps, then the accuracy

    def run(self, batch: ProbeBatch) -> ProbeResult:
        scalars = {"clean_accuracy": batch.accuracy(batch.images)}
        details: dict[str, dict[str, float]] = {"linf": {}, "l2": {}}
        for norm, budgets in (("linf", self.config.linf_eps), ("l2", self.config.l2_eps)):
            for eps in budgets:
                adversarial = attack_batches(batch, eps=eps, norm=norm, steps=self.config.steps,
                                             step_size=self.config.step_size, random_start=self.config.random_start)
                details[norm][f"{eps:.6g}"] = scalars[f"{norm}/{eps:.4g}"] = batch.accuracy(adversarial)
        return ProbeResult(scalars=scalars, details={"clean_accuracy": scalars["clean_accuracy"], **details,
                                                     "steps": self.config.steps})


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix: ``D @ x`` transforms along the first axis."""
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    matrix = torch.cos(torch.pi * (2 * i + 1) * k / (2 * n)) * (2.0 / n) ** 0.5
    matrix[0] /= 2 ** 0.5
    return matrix.float()


def dct_energy(perturbations: torch.Tensor) -> np.ndarray:
    """Mean energy of the 2-D DCT coefficients of (N, C, H, W) perturbations, (H, W)."""
    h, w = perturbations.shape[-2:]
    rows, cols = dct_matrix(h).to(perturbations.device), dct_matrix(w).to(perturbations.device)
    coefficients = rows @ perturbations.float() @ cols.T
    return (coefficients ** 2).mean(dim=(0, 1)).cpu().double().numpy()


def band_fractions(energy: np.ndarray) -> dict[str, float]:
    """Share of the energy in the low, middle and high thirds of the DCT index sum u + v."""
    h, w = energy.shape
    index = (np.arange(h)[:, None] + np.arange(w)[None, :]) / max(1, h + w - 2)
    total = float(energy.sum()) or 1.0
    return {"low": float(energy[index < 1 / 3].sum() / total),
            "mid": float(energy[(index >= 1 / 3) & (index < 2 / 3)].sum() / total),
            "high": float(energy[index >= 2 / 3].sum() / total)}


class DctSpectrumProbe(Probe):
    """DCT energy of PGD and DeepFool perturbations: heat maps and the share per frequency band."""

    default_samples = 50
    needs_input_gradients = True  # type: ignore[assignment]

    def forward_passes(self, batch: ProbeBatch) -> int:
        # PGD's steps, or DeepFool's first pass and at most its iterations; then the accuracy
        per_attack = {"pgd": self.config.steps, "deepfool": 1 + self.config.deepfool_iterations}
        return sum(per_attack[attack] + 1 for attack in self.config.attacks) * batch.chunks()

    def run(self, batch: ProbeBatch) -> ProbeResult:
        scalars: dict[str, float] = {}
        details: dict[str, object] = {}
        images = {}
        for attack in self.config.attacks:
            if attack == "pgd":
                adversarial = attack_batches(batch, eps=self.config.eps, norm=self.config.norm, steps=self.config.steps)
            else:
                adversarial = torch.cat([deepfool(batch.model, x, num_candidates=self.config.deepfool_candidates,
                                                  max_iter=self.config.deepfool_iterations)
                                         for x, _ in batch.batches()])
            perturbation = adversarial - batch.images
            energy = dct_energy(perturbation)
            fractions = band_fractions(energy)
            l2 = perturbation.flatten(1).norm(dim=1)
            scalars.update({f"{attack}/{band}": share for band, share in fractions.items()})
            scalars[f"{attack}/accuracy"] = batch.accuracy(adversarial)
            details[attack] = {"band_fraction": fractions, "mean_l2": float(l2.mean()),
                               "accuracy": scalars[f"{attack}/accuracy"],
                               "energy": [[float(f"{v:.4g}") for v in row] for row in energy]}
            images[f"{attack}_energy"] = render_heat_map(
                np.log10(energy + 1e-12), f"log10 DCT energy of {attack} perturbations, step {batch.step}",
                cmap="magma", axis_labels=("horizontal DCT index", "vertical DCT index"))
        details["pgd_budget"] = {"norm": self.config.norm, "eps": self.config.eps, "steps": self.config.steps}
        return ProbeResult(scalars=scalars, details=details, images=images)
