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
in the old class's own subspace i. With ``recalc_sim`` (PILOT's default) every later subspace
d = i+1..t is complemented afresh after each experience, from the classes of experiences d..t
(``new`` above is then all of them, and the similarities are measured in subspace i); without
it, only subspace t, from experience t's classes, earlier complements kept.

At test time, with ``use_reweight`` (PILOT's default), a class of experience i scores
``cos(x_i, P_i) + alpha / t * sum_{j != i, j <= t} cos(x_j, P_j)`` over the subspaces
(:class:`~incremental.models.net.SubspaceReweightOutput`); without it, one cosine over the
concatenated features.

During training the head sees the current subspace's block only, on the current classes:
``training_head: cosine`` is PILOT's proxy head, ``sigma cos`` on that block with sigma reset
to 1 at each experience; ``linear`` is nn.Linear over the concatenation (the other blocks are
zeros there).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from incremental.models.net import PrototypeOutput, SubspaceReweightOutput
from incremental.models.peft import add_adapters, adapters_set, freeze, vision_transformer
from incremental.strategy import StrategyContext, StrategyPlugin

from .options import EASEConfig
from .pretrained import (CosineIncrementalClassifier, experience_features, loss_on_current_classes, replace_head,
                         use_training_head)


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
        self.vit.eval()  # the pre-trained ViT keeps its eval behaviour ...
        self.vit.adapters.train(mode)  # ... and its adapters' dropout acts in training, as PILOT's (vit_ease: 0.1)
        return self


def complement(prototypes: torch.Tensor, old: range, new: range, own: int, target: int) -> torch.Tensor:
    """The old classes' prototypes in subspace ``target``: the new classes' there, weighted by
    the softmax of the cosine similarities between old and new classes in subspace ``own``."""
    similarity = F.cosine_similarity(prototypes[old.start:old.stop, own].unsqueeze(1),
                                     prototypes[new.start:new.stop, own].unsqueeze(0), dim=2)
    return F.softmax(similarity, dim=1) @ prototypes[new.start:new.stop, target]


def complement_old_classes(prototypes: torch.Tensor, ranges: list[range], t: int, recalc_sim: bool) -> None:
    """After experience ``t``, in place: the old experiences' classes' prototypes in the subspaces
    they were not trained with (see the module's note)."""
    for i in range(t):
        for d in range(i + 1, t + 1) if recalc_sim else [t]:
            reference = range(ranges[d].start, ranges[t].stop) if recalc_sim else ranges[t]
            prototypes[ranges[i].start:ranges[i].stop, d] = complement(prototypes, ranges[i], reference, i, d)


def subspace_weights(ranges: list[range], t: int, sets: int, alpha: float) -> torch.Tensor:
    """(classes seen, sets): 1 for a class's own experience's subspace, alpha / t for every other
    subspace up to t, 0 beyond (PILOT's forward_reweight)."""
    weights = torch.zeros(ranges[t].stop, sets)
    for i in range(t + 1):
        weights[ranges[i].start:ranges[i].stop, : t + 1] = alpha / t if t else 0.0
        weights[ranges[i].start:ranges[i].stop, i] = 1.0
    return weights


class EASE(StrategyPlugin):
    """EASE: an adapter subspace per experience and prototypes complemented across subspaces."""

    def __init__(self, config: EASEConfig, context: StrategyContext):
        super().__init__(config, context)

    def prepare_model(self, model: Any) -> None:
        vit = vision_transformer(model.backbone, swin=True)
        model.backbone = SubspaceViT(vit, self.context.class_split.num_experiences, self.config.bottleneck,
                                     self.config.adapter_scale, self.config.adapter_dropout)
        replace_head(model, model.backbone.num_features)
        # a cosine head's columns move to each experience's block (before_training_exp)
        use_training_head(model, self.config.training_head, slice(0, model.backbone.dim))

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        experience = strategy.experience.current_experience
        backbone = strategy.model.backbone
        backbone.current.fill_(experience)
        for index, adapters in enumerate(backbone.vit.adapters.sets):  # only this experience's set learns
            for p in adapters.parameters():
                p.requires_grad_(index == experience)
        head = strategy.model.head
        if isinstance(head, CosineIncrementalClassifier):  # PILOT's fresh proxy head on this block
            head.columns = slice(experience * backbone.dim, (experience + 1) * backbone.dim)
            with torch.no_grad():
                head.sigma.fill_(1.0)

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
        if isinstance(model.output_adapter, (PrototypeOutput, SubspaceReweightOutput)):
            old = model.output_adapter.prototypes.cpu().view(-1, backbone.sets, backbone.dim)
            prototypes[: len(old)] = old
        for label in ranges[t]:
            prototypes[label, : t + 1] = blocks[labels == label, : t + 1].mean(dim=0)
        complement_old_classes(prototypes, ranges, t, self.config.recalc_sim)
        device = next(model.parameters()).device
        if self.config.use_reweight:
            weights = subspace_weights(ranges, t, backbone.sets, self.config.alpha)
            model.output_adapter = SubspaceReweightOutput(prototypes.flatten(1).to(device), weights.to(device),
                                                          backbone.dim)
        else:
            model.output_adapter = PrototypeOutput(prototypes.flatten(1).to(device), "cosine")
