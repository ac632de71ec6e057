"""DER (Yan et al. 2021, "DER: dynamically expandable representation for class incremental
learning"), as PILOT's ``der`` runs it on a pre-trained ViT. (The toolkit's ``der`` is Dark
Experience Replay, Buzzega et al. 2020.)

MEMO's scheme with nothing shared: each experience adds a whole copy of the ViT, started from
the previous copy (the first from the pre-trained weights), and trains it with the head while
the older copies stay frozen. The head reads the copies' pooled features concatenated and grows
as PILOT's ``DERNet.update_fc`` grows it; the loss adds ``aux_weight`` times the auxiliary
cross-entropy on the new copy's features over the new classes plus one "old" class; herding
replay. PILOT's DER runs without the paper's channel masks and pruning, and with its weight
alignment commented out; so does this.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from incremental.models.peft import vision_transformer

from .memo import MEMO, SpecialisedViT
from .pretrained import replace_head


class ExpandedViT(SpecialisedViT):
    """One whole ViT per experience (embeddings, blocks, norms), its pooled features concatenated
    up to ``current`` and zeros after, as :class:`SpecialisedViT` with no shared part."""

    def __init__(self, vit: nn.Module, sets: int, aux_classes: int):
        nn.Module.__init__(self)
        self.specialised = nn.ModuleList(copy.deepcopy(vit) for _ in range(sets))
        self.vit = nn.Identity()  # nothing shared
        self.add_expansion_state(sets, int(vit.num_features), aux_classes)

    def generalised(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def specialised_features(self, x: torch.Tensor, index: int) -> torch.Tensor:
        vit = self.specialised[index]
        return vit.forward_head(vit.forward_features(x), pre_logits=True)


class ExpandableRepresentation(MEMO):
    """DER (Yan et al.): a whole ViT copy per experience, an auxiliary head, herding replay."""

    strategy_name = "expandable_representation"

    def prepare_model(self, model: Any) -> None:
        split = self.context.class_split
        model.backbone = ExpandedViT(vision_transformer(model.backbone), split.num_experiences,
                                     max(split.classes_per_experience) + 1)
        replace_head(model, model.backbone.num_features)

    def trains_generalised(self) -> bool:
        return False  # nothing is shared

    def trains_old_copies(self) -> bool:
        return False  # PILOT's DER freezes every older backbone
