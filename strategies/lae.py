"""LAE (Gao et al. 2023, "A unified continual learning framework with general parameter-efficient
tuning"), PILOT's ``lae``.

A frozen pre-trained ViT carries one parameter-efficient module (PET), the run's ``tuning``:
PILOT's default is 10 compensatory prefix tokens in blocks 0-4; an adapter or LoRA also serve.
This *online* PET keeps training across experiences. An *offline* copy follows it as an
exponential moving average, updated after every optimizer step::

    offline = decay * offline + (1 - decay) * online

Each experience:
- the PET is frozen for the first ``freeze_epochs`` epochs, so only the new classes' head rows
  learn. The fresh rows then do not drag the PET (LAE's learning-speed calibration);
- the loss sees the current experience's classes only;
- the optimizer starts afresh (the runner's per-experience optimizer, PILOT's reinit_optimizer).

At test time a class scores the larger of the two networks' softmax probabilities for it,
``max(softmax(W f_online + b), softmax(W f_offline + b))``, through one shared head
(:class:`~incremental.strategies.pretrained.SharedHeadClassifier`) and the model's output adapter
(:class:`~incremental.models.net.MaxSoftmaxOutput`, whose output is the log of that score: the
argmax and the ranking are the ensemble's).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from incremental.models.net import MaxSoftmaxOutput
from incremental.models.peft import apply_tuning, vision_transformer
from incremental.strategy import StrategyContext, StrategyPlugin

from .options import LAEConfig
from .pretrained import SharedHeadClassifier, init_rows_kaiming, loss_on_current_classes


class OnlineOfflineBackbone(nn.Module):
    """A tuned backbone and an EMA (offline) copy of its trainable parameters. Its pooled
    features are the online network's in training, and the online then the offline network's,
    side by side, in eval: (B, 2 x ``num_features``)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.pet_names = [name for name, p in backbone.named_parameters() if p.requires_grad]
        # parameters that never train, so the state dict, checkpoints and the feature cache's
        # fingerprint hold them
        self.offline = nn.ParameterList([nn.Parameter(p.detach().clone(), requires_grad=False)
                                         for p in self.pet_parameters()])
        self.num_features = int(backbone.num_features)

    def pet_parameters(self) -> list[nn.Parameter]:
        parameters = dict(self.backbone.named_parameters())
        return [parameters[name] for name in self.pet_names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features under the parameters the module holds (the online ones)."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def offline_features(self, x: torch.Tensor) -> torch.Tensor:
        weights = {f"backbone.{name}": p for name, p in zip(self.pet_names, self.offline)}
        return torch.func.functional_call(self, weights, (x,))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        online = self(x)
        return online if self.training else torch.cat([online, self.offline_features(x)], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x

    @torch.no_grad()
    def update_offline(self, decay: float) -> None:
        for offline, online in zip(self.offline, self.pet_parameters()):
            offline.copy_(offline * decay + online * (1.0 - decay))

    def train(self, mode: bool = True) -> "OnlineOfflineBackbone":
        super().train(mode)
        self.backbone.eval()  # the pre-trained network keeps its eval behaviour (PILOT's has no dropout)
        return self


class LAE(StrategyPlugin):
    """LAE: an online PET trained on, an offline EMA copy, and the max-softmax ensemble of both."""

    def __init__(self, config: LAEConfig, context: StrategyContext):
        super().__init__(config, context)

    def prepare_model(self, model: Any) -> None:
        apply_tuning(vision_transformer(model.backbone, swin=True), self.config.tuning)
        model.backbone = OnlineOfflineBackbone(model.backbone)
        model.head = SharedHeadClassifier(model.num_features, model.head.classifier.out_features)
        model.output_adapter = MaxSoftmaxOutput(members=2)

    def pets(self, strategy: Any) -> list[nn.Parameter]:
        return strategy.model.backbone.pet_parameters()

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.config.head_init == "kaiming_uniform":
            labels = self.context.class_split.label_ranges()[strategy.experience.current_experience]
            init_rows_kaiming(strategy.model.head.classifier, labels)

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        # the optimizer was built with the PET in it; a frozen parameter gets no gradient, so it skips it
        learning = strategy.clock.train_exp_epochs >= self.config.freeze_epochs
        for p in self.pets(strategy):
            p.requires_grad_(learning)

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        loss_on_current_classes(strategy, self.context)

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        strategy.model.backbone.update_offline(self.config.ema_decay)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        for p in self.pets(strategy):  # trainable again, so that the next experience's optimizer holds them
            p.requires_grad_(True)
