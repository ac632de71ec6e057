"""MEMO (Zhou et al. 2023, "A model or 603 exemplars: towards memory-efficient class-incremental
learning"), as PILOT's ``memo`` runs it on a pre-trained ViT.

The ViT splits after block ``depth - specialised_blocks``: the blocks below are generalised,
shared by every experience; the blocks above, with the final norm, are specialised, one copy per
experience. The pooled feature is the concatenation of the specialised copies' features over the
experiences so far; one linear head reads it.

- Experience 0 trains the whole ViT (generalised blocks and copy 0) and the head on
  cross-entropy. After it the generalised blocks are frozen (``train_generalised`` keeps them
  training).
- Experience t > 0 starts copy t from copy t - 1 and trains it, with the head, on the experience's
  data and the herding exemplar memory; the older copies are frozen (``train_old_specialised``).
  The head grows as PILOT's ``AdaptiveNet.update_fc`` grows it: the old classes' weights on the
  old copies' features kept; their weights on copy t's, and every weight of the new classes,
  drawn afresh (Kaiming-uniform for a linear layer, zero bias).
- The loss adds ``aux_weight`` times an auxiliary cross-entropy on copy t's features alone, over
  the new classes plus one class for all the old ones.

As PILOT's ``vit_base_patch16_224_memo``, the specialised block starts from PyTorch's default
initialisation, not from the pre-trained block (``specialised_init: random``: its
``Specialized_Vit`` builds a ``last_block`` the pre-trained weights never reach, and leaves the
pre-trained last block unused); ``pretrained`` starts it from the pre-trained blocks.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from incremental.models.peft import vision_transformer
from incremental.strategy import StrategyContext

from .options import MEMOConfig
from .pretrained import grow_head, init_rows_kaiming, replace_head
from .replay import ExemplarReplay


def reset_to_default_init(module: nn.Module) -> None:
    """Every submodule's own ``reset_parameters`` (PyTorch's default draws), as a block built
    outside timm's weight init starts."""
    for submodule in module.modules():
        if submodule is not module and hasattr(submodule, "reset_parameters"):
            submodule.reset_parameters()


class SpecialisedViT(nn.Module):
    """A ViT's generalised blocks, shared, and a specialised copy per experience of its last
    blocks, final norm and pooling norm. Its pooled feature is ``sets x dim`` wide: the copies up
    to ``current`` concatenated, zeros for the later ones (so the width, the head and the state
    dict's shapes never change)."""

    def __init__(self, vit: nn.Module, sets: int, specialised_blocks: int, init: str, aux_classes: int):
        super().__init__()
        split = len(vit.blocks) - specialised_blocks
        specialised = nn.ModuleDict({"blocks": vit.blocks[split:], "norm": vit.norm, "fc_norm": vit.fc_norm})
        if init == "random":
            reset_to_default_init(specialised["blocks"])
        self.specialised = nn.ModuleList(copy.deepcopy(specialised) for _ in range(sets))
        vit.blocks, vit.norm, vit.fc_norm = vit.blocks[:split], nn.Identity(), nn.Identity()
        self.vit = vit
        self.add_expansion_state(sets, int(vit.num_features), aux_classes)

    def add_expansion_state(self, sets: int, dim: int, aux_classes: int) -> None:
        """The width, the auxiliary head and the current experience, which every expansion shares."""
        self.sets, self.dim = sets, dim
        self.num_features = sets * dim
        self.aux_head = nn.Linear(dim, aux_classes)
        self.register_buffer("current", torch.tensor(0))
        # a training forward's auxiliary logits (copy ``current``'s features through aux_head),
        # for the loss; computed in the forward so that DDP sees the head's parameters used
        self.aux_outputs: tuple[torch.Tensor] | None = None

    def generalised(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        return vit.blocks(vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))))

    def specialised_features(self, tokens: torch.Tensor, index: int) -> torch.Tensor:
        copy_ = self.specialised[index]
        return copy_["fc_norm"](self.vit.pool(copy_["norm"](copy_["blocks"](tokens))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.generalised(x)
        current = int(self.current)
        out = x.new_zeros(len(x), self.sets, self.dim)
        for index in range(current + 1):
            out[:, index] = self.specialised_features(tokens, index)
        if self.training:
            self.aux_outputs = (self.aux_head(out[:, current]),)
        return out.flatten(1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x

    def train(self, mode: bool = True) -> "SpecialisedViT":
        """The frozen parts (the generalised blocks after the first experience, the older copies)
        stay in eval mode, as PILOT's ``set_network`` keeps them."""
        super().train(mode)
        for part in (self.vit, *self.specialised):
            if mode and not any(p.requires_grad for p in part.parameters()):
                part.eval()
        return self


def auxiliary_targets(labels: torch.Tensor, old: int) -> torch.Tensor:
    """0 for an old class, ``1 + label - old`` for a new one (PILOT's aux targets)."""
    return torch.where(labels >= old, labels - old + 1, torch.zeros_like(labels))


class MEMO(ExemplarReplay):
    """MEMO: shared generalised blocks, a specialised block copy per experience, herding replay."""

    strategy_name = "memo"  # in the message when the protocol has no memory

    def __init__(self, config: MEMOConfig, context: StrategyContext):
        super().__init__(config, context)
        context.require_memory(self.strategy_name)

    def prepare_model(self, model: Any) -> None:
        vit = vision_transformer(model.backbone)
        if not 1 <= self.config.specialised_blocks <= len(vit.blocks):
            from incremental.errors import ConfigError

            raise ConfigError(f"the ViT has {len(vit.blocks)} blocks; specialised_blocks must be 1 to that",
                              key="strategy.specialised_blocks")
        split = self.context.class_split
        model.backbone = SpecialisedViT(vit, split.num_experiences, self.config.specialised_blocks,
                                        self.config.specialised_init, max(split.classes_per_experience) + 1)
        replace_head(model, model.backbone.num_features)

    def trains_generalised(self) -> bool:
        """Whether the shared blocks train after the first experience."""
        return self.config.train_generalised

    def trains_old_copies(self) -> bool:
        return self.config.train_old_specialised

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        t = strategy.experience.current_experience
        backbone, ranges = strategy.model.backbone, self.context.class_split.label_ranges()
        backbone.current.fill_(t)
        if t > 0:
            backbone.specialised[t].load_state_dict(backbone.specialised[t - 1].state_dict())
        backbone.vit.requires_grad_(t == 0 or self.trains_generalised())
        for index, copy_ in enumerate(backbone.specialised):
            copy_.requires_grad_(index == t or (index < t and self.trains_old_copies()))
        grow_head(strategy.model.head.classifier, range(0, ranges[t].start), ranges[t], backbone.dim, t + 1)
        # PILOT's aux_fc: a fresh SimpleLinear for the new classes and "old"
        init_rows_kaiming(backbone.aux_head, range(backbone.aux_head.out_features))
        backbone.aux_head.requires_grad_(t > 0)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        backbone = strategy.model.backbone
        outputs, backbone.aux_outputs = backbone.aux_outputs, None
        t = strategy.experience.current_experience
        if t == 0 or outputs is None or not self.config.aux_weight:
            return
        ranges = self.context.class_split.label_ranges()
        logits = outputs[0].float()[:, : len(ranges[t]) + 1]
        aux = F.cross_entropy(logits, auxiliary_targets(strategy.mb_y, ranges[t].start))
        strategy.loss = strategy.loss + self.config.aux_weight * aux

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        strategy.model.backbone.aux_outputs = None
        super().after_training_exp(strategy, **kwargs)
