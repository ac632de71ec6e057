"""APER (Zhou et al. 2024, "Revisiting class-incremental learning with pre-trained models:
generalizability and adaptivity are all you need"), PILOT's ``aper_*``.

The first experience adapts the pre-trained ViT (``tuning``: adapters, SSF, VPT-deep, or full
finetuning) through a head on the adapted features (``first_session_head``: PILOT's cosine
head with a learnt scale, or a linear one over both halves); afterwards nothing trains. Every
class gets a prototype, the mean of its training images' features, where a feature is the concatenation of the original
pre-trained model's and the adapted model's pooled features; a test image goes to the class
of the most cosine-similar prototype.

``first_session_head: linear`` is the toolkit's earlier head: nn.Linear over the concatenated
features (the original half frozen). Either way the prototypes, which classify, are APER's.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from incremental.models.peft import apply_tuning, freeze, tuning_off, vision_transformer
from incremental.strategy import StrategyContext

from .options import APERConfig
from .pretrained import (FirstSessionTraining, class_means, experience_features, replace_head, set_prototypes,
                         use_training_head)


class DualBranch(nn.Module):
    """The pooled features of the original pre-trained ViT and of its adapted version, side by
    side. With adapters, SSF or VPT the original is the same ViT with its tuning switched off;
    after full finetuning, a frozen copy kept from before it."""

    def __init__(self, adapted: nn.Module, original: nn.Module | None):
        super().__init__()
        self.adapted = adapted
        self.original = original
        self.num_features = 2 * int(adapted.num_features)

    def _pooled(self, vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return vit.forward_head(vit.forward_features(x), pre_logits=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.original is not None:
            with torch.no_grad():
                original = self._pooled(self.original, x)
        else:
            with torch.no_grad(), tuning_off(self.adapted):
                original = self._pooled(self.adapted, x)
        return torch.cat([original, self._pooled(self.adapted, x)], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x  # the features are pooled already

    def train(self, mode: bool = True) -> "DualBranch":
        super().train(mode)
        if self.original is not None:
            self.original.eval()
        return self


class APER(FirstSessionTraining):
    """APER: first-session adaptation, then prototypes on the adapted and the original features."""

    def __init__(self, config: APERConfig, context: StrategyContext):
        super().__init__(config, context)

    def prepare_model(self, model: Any) -> None:
        vit = vision_transformer(model.backbone, swin=True)
        original = freeze(copy.deepcopy(vit)).eval() if self.config.tuning.name == "finetune" else None
        apply_tuning(vit, self.config.tuning)
        model.backbone = DualBranch(vit, original)
        replace_head(model, model.backbone.num_features)
        half = int(vit.num_features)  # DualBranch's columns: the original's, then the adapted's
        use_training_head(model, self.config.first_session_head, slice(half, 2 * half))

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.experience.current_experience == 0:
            for p in strategy.model.backbone.parameters():  # adapted once, then fixed
                p.requires_grad_(False)
        features, labels = experience_features(strategy, strategy.experience.current_experience, self.context)
        set_prototypes(strategy.model, class_means(features, labels), self.config.metric)
