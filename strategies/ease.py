"""EASE (Zhou et al. 2024, "Expandable subspace ensemble for pre-trained model-based
class-incremental learning"), PILOT's ``ease``.

Each experience t trains its own set of AdaptFormer adapters (an adapter *subspace*) on a frozen
pre-trained ViT, the earlier sets frozen; an image's feature is the concatenation of its pooled
features under each trained set. Classes are prototypes in that concatenated space (cosine).
After experience t, the new classes' prototypes are computed in every subspace 0..t; an old
class of experience i has no data left for subspace t, so its prototype there is complemented
from the new classes' (EASE's semantic-guided prototype complement):

    P[old, t] = softmax_j( cos(P[old, i], P[new_j, i]) ) @ P[new, t]

i.e. old classes borrow the new classes' subspace-t prototypes, weighted by how alike they are
in the old class's own subspace i. During training the head sees the current subspace's block
only (the other blocks are zeros), on the current classes.

Departures: PILOT recomputes these similarities between every pair of subspaces
(``recalc_sim``) and reweights the subspaces' logits at test time (``use_reweight``); this
complements from the newest classes only, and weighs the subspaces equally.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from incremental.models.net import PrototypeOutput
from incremental.models.peft import add_adapters, adapters_set, freeze, vision_transformer
from incremental.strategy import StrategyContext, StrategyPlugin

from .options import EASEConfig
from .pretrained import experience_features, loss_on_current_classes, replace_head


class SubspaceViT(nn.Module):
    """A frozen ViT with one adapter set per experience; its pooled feature is the
    concatenation over the sets up to ``current`` (just ``current``'s in training), zeros for
    the others, so its width stays ``sets x dim``."""

    def __init__(self, vit: nn.Module, sets: int, bottleneck: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.vit = freeze(vit)
        add_adapters(vit, bottleneck=bottleneck, scale=scale, sets=sets, dropout=dropout)
        self.sets, self.dim = sets, int(vit.num_features)
        self.num_features = sets * self.dim
        self.register_buffer("current", torch.tensor(0))

    def subspace(self, x: torch.Tensor, index: int) -> torch.Tensor:
        with adapters_set(self.vit, index):
            return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        current = int(self.current)
        used = [current] if self.training else list(range(current + 1))
        out = x.new_zeros(len(x), self.sets, self.dim)
        for index in used:
            out[:, index] = self.subspace(x, index)
        return out.flatten(1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x

    def train(self, mode: bool = True) -> "SubspaceViT":
        super().train(mode)
        self.vit.eval()  # the pre-trained ViT keeps its eval behaviour; adapter dropout is none
        return self


def complement(prototypes: torch.Tensor, old: range, new: range, own: int, target: int) -> torch.Tensor:
    """The old classes' prototypes in subspace ``target``: the new classes' there, weighted by
    the softmax of the cosine similarities between old and new classes in subspace ``own``."""
    similarity = F.cosine_similarity(prototypes[old.start:old.stop, own].unsqueeze(1),
                                     prototypes[new.start:new.stop, own].unsqueeze(0), dim=2)
    return F.softmax(similarity, dim=1) @ prototypes[new.start:new.stop, target]


class EASE(StrategyPlugin):
    """EASE: an adapter subspace per experience and prototypes complemented across subspaces."""

    def __init__(self, config: EASEConfig, context: StrategyContext):
        super().__init__(config, context)

    def prepare_model(self, model: Any) -> None:
        vit = vision_transformer(model.backbone, swin=True)
        model.backbone = SubspaceViT(vit, self.context.class_split.num_experiences, self.config.bottleneck,
                                     self.config.adapter_scale, self.config.adapter_dropout)
        replace_head(model, model.backbone.num_features)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        experience = strategy.experience.current_experience
        backbone = strategy.model.backbone
        backbone.current.fill_(experience)
        for index, adapters in enumerate(backbone.vit.adapters.sets):  # only this experience's set learns
            for p in adapters.parameters():
                p.requires_grad_(index == experience)

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        loss_on_current_classes(strategy, self.context)

    @torch.no_grad()
    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        t = strategy.experience.current_experience
        model, backbone = strategy.model, strategy.model.backbone
        ranges = self.context.class_split.label_ranges()
        features, labels = experience_features(strategy, t, self.context)  # (N, sets * dim), blocks 0..t filled
        blocks = features.view(len(features), backbone.sets, backbone.dim)
        seen = ranges[t].stop
        prototypes = torch.zeros(seen, backbone.sets, backbone.dim)
        if isinstance(model.output_adapter, PrototypeOutput):
            old = model.output_adapter.prototypes.cpu().view(-1, backbone.sets, backbone.dim)
            prototypes[: len(old)] = old
        for label in ranges[t]:
            prototypes[label, : t + 1] = blocks[labels == label, : t + 1].mean(dim=0)
        for i in range(t):  # each old experience's classes get a prototype in the new subspace
            prototypes[ranges[i].start:ranges[i].stop, t] = complement(prototypes, ranges[i], ranges[t], i, t)
        device = next(model.parameters()).device
        model.output_adapter = PrototypeOutput(prototypes.flatten(1).to(device), "cosine")
