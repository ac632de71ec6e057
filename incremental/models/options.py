"""Options every backbone takes, next to its own: local pretrained weights and compression."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config.fields import Component, component, opt


@dataclass
class PruneConfig:
    """Structured pruning with torch-pruning: a fraction of the channels inside each block
    (MLP hidden units, attention head dimensions, inner conv channels), ranked by group L2
    (or L1) norm. Residual widths stay, so ``num_features`` and the growing head do not change."""

    ratio: float = opt(0.5, gt=0, lt=1)
    importance: Literal["l2", "l1", "random"] = "l2"
    round_to: int | None = opt(None, ge=1)  # keep channel counts multiples of this (GPU kernels like 8)


@dataclass
class LowRankConfig:
    """Each Linear layer W (out x in) of the backbone becomes two, W ~ U_r S_r V_r^T from its
    SVD, where that saves parameters. ``rank_ratio`` keeps r = ratio * min(in, out); ``energy``
    instead keeps the fewest singular values holding that fraction of sum(s^2)."""

    rank_ratio: float = opt(0.25, gt=0, le=1)
    energy: float | None = opt(None, gt=0, le=1)
    min_features: int = opt(32, ge=1)  # smaller layers stay dense


@dataclass
class DistillConfig:
    """Feature distillation from a frozen, larger teacher backbone (usually ``pretrained:``):
    a linear projection of the student's pooled features is pulled toward the teacher's."""

    teacher: Component = component("backbones")
    weight: float = opt(1.0, ge=0)
    loss: Literal["cosine", "mse"] = "cosine"


@dataclass
class CompressConfig:
    prune: PruneConfig | None = None
    low_rank: LowRankConfig | None = None
    quantize: Literal["none", "int8_dynamic"] = "none"  # int8 Linear weights for evaluation (CPU)
    distill: DistillConfig | None = None

    @property
    def structural(self) -> bool:
        return self.prune is not None or self.low_rank is not None

    @property
    def enabled(self) -> bool:
        return self.structural or self.quantize != "none" or self.distill is not None


@dataclass
class BackboneOptions:
    """Options every backbone takes, next to its own."""

    # weights only: a safetensors file, or a torch/timm checkpoint (loaded with weights_only)
    pretrained: str | None = None
    compress: CompressConfig = opt(factory=CompressConfig)
