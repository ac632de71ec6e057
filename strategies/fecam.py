"""FeCAM (Goswami et al. 2023, "FeCAM: exploiting the heterogeneity of class distributions in
exemplar-free continual learning"), as PILOT's ``fecam`` runs it on a pre-trained ViT.

The first experience adapts the ViT (``tuning``: adapters by default, PILOT's
``pretrained_vit_b16_224_adapter``) through PILOT's cosine head; afterwards nothing trains.
Every class c keeps the mean ``mu_c`` of its training images' pooled features (eval transforms)
and a matrix ``S_c`` from their covariance ``Sigma_c`` (unbiased):

- ``shrinkage: identity`` (PILOT's): ``Sigma_c + alpha I`` (alpha 100);
  ``fecam`` (the FeCAM paper's): ``Sigma_c + alpha V1 I + alpha V2 (1 - I)``, V1 the mean of the
  diagonal, V2 the mean of the non-zero off-diagonal values (the paper's alpha1 = alpha2 = 1);
- ``normalization: rows_correlation`` (PILOT's ``torch.corrcoef`` of the shrunk matrix, which
  correlates its *rows* as if they were variables, so S_c is singular: rank d - 1);
  ``correlation`` (the FeCAM paper's ``S_ij / sqrt(S_ii S_jj)``).

A test image's pooled feature ``f`` (Tukey-transformed, ``f ** tukey_power``, when given: the
paper's 0.5 for ReLU features; PILOT's ViT features take negative values and get none) scores
class c by minus the Mahalanobis distance ``(f^ - mu^_c) pinv(S_c) (f^ - mu^_c)^T``, with f^
and mu^_c L2-normalised, as PILOT's ``_mahalanobis``. pinv is computed once per class (PILOT
recomputes it at every evaluation), in fp64.
"""

from __future__ import annotations

from typing import Any

import torch

from incremental.errors import UserError
from incremental.models.net import MahalanobisOutput
from incremental.strategy import StrategyContext

from .options import FeCAMConfig
from .pretrained import FirstSessionTraining, experience_features


def shrunk_covariance(features: torch.Tensor, mode: str, alpha: float) -> torch.Tensor:
    """One class's covariance (rows: its images), shrunk as ``mode`` says; fp64. A class of one
    image has no covariance (torch.cov divides by zero): its matrix is the shrinkage alone."""
    x = features.double()
    covariance = torch.cov(x.T) if len(x) > 1 else torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
    identity = torch.eye(len(covariance), dtype=x.dtype)
    if mode == "identity":
        return covariance + alpha * identity
    off_diagonal = covariance * (1 - identity)
    nonzero = off_diagonal != 0
    diagonal_mean = covariance.diagonal().mean()
    off_diagonal_mean = off_diagonal[nonzero].mean() if bool(nonzero.any()) else covariance.new_zeros(())
    return covariance + alpha * diagonal_mean * identity + alpha * off_diagonal_mean * (1 - identity)


def normalized(matrix: torch.Tensor, mode: str) -> torch.Tensor:
    """``rows_correlation``: the correlation between the matrix's rows (PILOT's torch.corrcoef);
    ``correlation``: ``S_ij / sqrt(S_ii S_jj)`` (the FeCAM paper's normalize_cov)."""
    if mode == "rows_correlation":
        return torch.corrcoef(matrix)
    scale = matrix.diagonal().sqrt()
    return matrix / torch.outer(scale, scale)


def tukey(features: torch.Tensor, power: float | None) -> torch.Tensor:
    """Tukey's ladder of powers, ``f ** power`` (none when ``power`` is None)."""
    if power is None:
        return features
    if bool((features < 0).any()):
        raise UserError(f"Tukey's transform ({power}) needs non-negative features; this backbone's pooled features "
                        "take negative values (a ViT's do): leave tukey_power unset", key="strategy.tukey_power")
    return features.pow(power)


class FeCAM(FirstSessionTraining):
    """FeCAM: first-session adaptation, then per-class Mahalanobis distances from shrunk covariances."""

    def __init__(self, config: FeCAMConfig, context: StrategyContext):
        super().__init__(config, context)
        self.means: dict[int, torch.Tensor] = {}
        self.precisions: dict[int, torch.Tensor] = {}

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.experience.current_experience == 0:
            for p in strategy.model.backbone.parameters():  # adapted once, then fixed
                p.requires_grad_(False)
        features, labels = experience_features(strategy, strategy.experience.current_experience, self.context)
        features = tukey(features.float().cpu(), self.config.tukey_power)
        for label in labels.unique().tolist():
            mine = features[labels == label]
            self.means[label] = mine.mean(dim=0)
            shrunk = shrunk_covariance(mine, self.config.shrinkage, self.config.alpha)
            self.precisions[label] = torch.linalg.pinv(normalized(shrunk, self.config.normalization)).float()
        seen = max(self.means) + 1
        device = next(strategy.model.parameters()).device
        strategy.model.output_adapter = MahalanobisOutput(
            torch.stack([self.means[c] for c in range(seen)]), torch.stack([self.precisions[c] for c in range(seen)]),
            self.config.tukey_power).to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"means": self.means, "precisions": self.precisions}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        self.means = {int(c): m for c, m in state["means"].items()}
        self.precisions = {int(c): p for c, p in state["precisions"].items()}
