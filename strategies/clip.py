"""Strategies for image-text dual encoders (backbone: clip): classifiers written from class names.

- ``zeroshot``: CLIP as it is, classifying by cosine similarity to the class names' text
  embeddings times CLIP's logit scale; the lower bound every CLIP-based CIL paper reports.
- ``continual_clip`` (Thengane et al. 2022, "CLIP model is an efficient continual learner"):
  the same classifier over the names of the classes seen so far; no training, no memory.
- ``clip_replay``: finetuning the image tower from the text-initialised head (``backbone.head_init:
  text``), herding replay, and a distillation term through the old classes' text embeddings.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.nn import functional as F

from incremental.models.net import PrototypeOutput, frozen
from incremental.models.peft import freeze
from incremental.strategy import StrategyContext, StrategyPlugin

from .options import CLIPReplayConfig, ZeroShotConfig
from .replay import ExemplarReplay


def text_classifier(model: Any, context: StrategyContext, labels: range) -> PrototypeOutput:
    """CLIP's zero-shot classifier for ``labels`` (positions in the class order): cosine similarity
    to their text embeddings (the protocol's templates, ensembled) times the logit scale."""
    embeddings = context.text_embeddings(model.backbone, labels)
    return PrototypeOutput(embeddings, "cosine", scale=float(model.backbone.logit_scale()))


class ZeroShot(StrategyPlugin):
    """Zero-shot CLIP: no training; the classifier is the class names' text embeddings."""

    classes = "all"

    def __init__(self, config: Any, context: StrategyContext):
        super().__init__(config, context)
        if isinstance(config, ZeroShotConfig):
            self.classes = config.classes

    def prepare_model(self, model: Any) -> None:
        self.context.require_text_tower(model, "zeroshot" if type(self) is ZeroShot else "continual_clip")
        freeze(model)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        strategy.train_epochs = 0  # nothing trains

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        experience = strategy.experience.current_experience
        seen = self.context.class_split.label_ranges()[experience].stop
        labels = range(self.context.total_classes if self.classes == "all" else seen)
        strategy.model.output_adapter = text_classifier(strategy.model, self.context, labels).to(strategy.device)


class ContinualCLIP(ZeroShot):
    """Continual-CLIP: zero-shot CLIP over the class names seen so far (Thengane et al. 2022)."""

    classes = "seen"


class HeadInputs:
    """Keeps the pooled features the head last received (a forward pre-hook), so a loss can use
    the training forward's features without a second pass through the backbone."""

    def __init__(self) -> None:
        self.pooled: torch.Tensor | None = None
        self.handle: Any = None

    def attach(self, model: Any) -> None:
        if self.handle is None:
            self.handle = model.head.register_forward_pre_hook(self._keep)

    def _keep(self, module: Any, inputs: tuple[torch.Tensor, ...]) -> None:
        self.pooled = inputs[0]

    def __deepcopy__(self, memo: dict) -> "HeadInputs":
        # a copied model (a teacher) keeps its hook but none of the student's graph
        return HeadInputs()


class CLIPReplay(ExemplarReplay):
    """CLIP finetuning: text-initialised head, herding replay, distillation through old text embeddings."""

    def __init__(self, config: CLIPReplayConfig, context: StrategyContext):
        super().__init__(config, context)
        self.teacher: Any = None
        self.old_text: torch.Tensor | None = None  # normalised text embeddings of the classes seen before
        self.scale = 1.0
        self.teacher_after: int | None = None  # the experience after which the teacher was copied
        self.head_inputs = HeadInputs()

    def prepare_model(self, model: Any) -> None:
        backbone = self.context.require_text_tower(model, "clip_replay")
        # The text tower (and the logit scale) stays as pre-trained: it anchors the old classes.
        for name, p in backbone.model.named_parameters():
            if not name.startswith("visual."):
                p.requires_grad_(False)
        self.head_inputs.attach(model)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.teacher is None or not self.config.distill_weight or self.head_inputs.pooled is None:
            return
        tau = self.config.temperature
        with torch.no_grad():
            old = self.teacher.forward_head(self.teacher.forward_features(strategy.mb_x), pre_logits=True).float()
            old_logits = self.scale * old @ self.old_text.T
        new_logits = self.scale * self.head_inputs.pooled.float() @ self.old_text.T
        kl = F.kl_div(F.log_softmax(new_logits / tau, dim=1), F.log_softmax(old_logits / tau, dim=1),
                      reduction="batchmean", log_target=True)
        strategy.loss = strategy.loss + self.config.distill_weight * tau ** 2 * kl

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        super().after_training_exp(strategy, **kwargs)
        self._remember(strategy.model, strategy.experience.current_experience)

    def _remember(self, model: Any, experience: int) -> None:
        """The teacher for the next experience: this model, frozen, and its seen classes' text."""
        self.teacher_after = experience
        self.teacher = frozen(copy.deepcopy(model))
        self.teacher.output_adapter = None
        seen = self.context.class_split.label_ranges()[experience].stop
        self.old_text = self.context.text_embeddings(model.backbone, range(seen))
        self.scale = float(model.backbone.logit_scale())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "teacher_after": self.teacher_after}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        state = dict(state)
        after = state.pop("teacher_after")
        super().load_state_dict(state, model)
        if after is not None:
            self._remember(model, int(after))
