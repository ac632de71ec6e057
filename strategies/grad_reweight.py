"""Gradient reweighting (He 2024, "Gradient reweighting: towards imbalanced class-incremental
learning"), PILOT's ``dgr``.

The whole network trains on the experience's data with the herding exemplar memory, on a
logit-adjusted cross-entropy: the logits plus the log of the training batch stream's label
distribution (the experience's images and the exemplars), so that frequent classes must win by
a margin. From the second experience on, the previous model is a teacher:
``loss = CE + kd_weight x (old / new classes) x KD``, KD the cross-entropy of the old classes'
softmax at ``temperature`` (no T^2).

The classifier's rows get their gradient rebalanced, per step:

- each class's CE gradient norm (its weight row) is accumulated over the experience's steps,
  ``a_c``; within the old classes and within the new, a row's CE gradient is scaled by
  ``min(a) / a_c``, so that the classes that have pushed hardest so far push least;
- from the second experience, the old rows' factors are times ``min(1, mean(a_new) / mean(a_old))``
  and the new rows' times ``min(1, mean(a_new) / mean(a_old) exp(-gamma old / seen))``;
- an old row's gradient is that plus ``r`` times its KD gradient, ``r`` the norm of the
  reweighted CE row norms over the norm of the KD row norms.

The rest of the network takes the plain gradient of the whole loss. (PILOT's code does the same,
and its first experience reweights with the accumulated norms over all classes.)
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch.nn import functional as F

from incremental.distributed import current, sum_tensor
from incremental.losses import soft_target_cross_entropy as distillation
from incremental.models.net import frozen
from incremental.strategy import StrategyContext

from .options import GradReweightConfig
from .pretrained import init_rows_kaiming
from .replay import ExemplarReplay


def class_balance_weights(accumulated: torch.Tensor, old: int, gamma: float) -> torch.Tensor:
    """Per class, the factor of its CE row gradient (see the module's note): ``min / a_c`` within
    the old and within the new classes, the groups then scaled by their mean norms; with no old
    class, ``min / a_c`` over all."""
    if old == 0:
        return accumulated.min() / accumulated
    old_norms, new_norms = accumulated[:old], accumulated[old:]
    ratio = float(new_norms.mean() / old_norms.mean())
    old_scale = min(1.0, ratio)
    new_scale = min(1.0, ratio * math.exp(-gamma * old / len(accumulated)))
    return torch.cat([old_norms.min() / old_norms * old_scale, new_norms.min() / new_norms * new_scale])


class GradientReweighting(ExemplarReplay):
    """Gradient reweighting (DGR): logit-adjusted CE, KD, and class-balanced classifier gradients."""

    def __init__(self, config: GradReweightConfig, context: StrategyContext):
        super().__init__(config, context)
        context.require_memory("grad_reweight")
        self.teacher: torch.nn.Module | None = None
        self.log_prior: torch.Tensor | None = None
        self.accumulated: torch.Tensor | None = None  # per class: the CE row gradient norms so far
        self._head_gradients: tuple[torch.Tensor, torch.Tensor] | None = None

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        t = strategy.experience.current_experience
        seen = self.context.class_split.label_ranges()[t].stop
        counts = torch.bincount(torch.as_tensor(list(strategy.adapted_dataset.targets)), minlength=seen).double()
        self.log_prior = (counts / counts.sum()).log().float().to(strategy.device)
        self.accumulated = torch.zeros(seen, dtype=torch.float64, device=strategy.device)
        if self.config.head_init == "kaiming_uniform":
            init_rows_kaiming(strategy.model.head.classifier, self.context.class_split.label_ranges()[t])
        strategy._criterion = self.adjusted_cross_entropy

    def adjusted_cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.config.logit_adjustment and self.log_prior is not None and logits.shape[1] == len(self.log_prior):
            logits = logits + self.log_prior
        return F.cross_entropy(logits, labels)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        head = strategy.model.head.classifier
        parameters = [head.weight, head.bias]
        dist = current()
        clf = strategy.loss
        share = getattr(strategy.engine, "shard_weight", lambda n: None)(len(strategy.mb_x))

        def reduced(loss: torch.Tensor) -> list[torch.Tensor]:
            """The head's gradient of the global batch's mean loss, as DDP reduces it: each rank's
            shard-mean gradient weighted by its share of a partial last batch, averaged."""
            grads = torch.autograd.grad(loss, parameters, retain_graph=True)
            return [sum_tensor(g.detach() * (1.0 if share is None else share), dist) / dist.world_size for g in grads]

        ce = reduced(clf)
        norms = ce[0].norm(dim=1).double()
        self.accumulated += norms
        old = self.context.class_split.label_ranges()[strategy.experience.current_experience].start
        weights = class_balance_weights(self.accumulated, old, self.config.gamma).to(ce[0].dtype)
        gradients = [weights[:, None] * ce[0], weights * ce[1]]
        if old and self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(strategy.mb_x).float()
            kd = distillation(strategy.mb_output[:, :old].float(), teacher_logits[:, :old], self.config.temperature)
            kd_gradients = reduced(kd)
            ce_norm, kd_norm = (weights * norms.to(weights)).norm(), kd_gradients[0][:old].norm(dim=1).norm()
            # at an experience's first step the student's old logits are the teacher's: the KD
            # gradient is round-off, which the ratio would scale up to the CE gradient's size
            if kd_norm > self.config.kd_gradient_floor * ce_norm:
                ratio = ce_norm / kd_norm
                gradients[0][:old] += ratio * kd_gradients[0][:old]
                gradients[1][:old] += ratio * kd_gradients[1][:old]
            strategy.loss = clf + self.config.kd_weight * old / (len(self.accumulated) - old) * kd
        self._head_gradients = (gradients[0], gradients[1])

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        """The classifier's gradient replaced by the reweighted one (times the fp16 loss scale)."""
        if self._head_gradients is None:
            return
        scaler = strategy.engine.scaler
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        head = strategy.model.head.classifier
        for parameter, gradient in zip((head.weight, head.bias), self._head_gradients):
            parameter.grad.copy_(gradient * scale)
        self._head_gradients = None

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        super().after_training_exp(strategy, **kwargs)
        self.teacher = frozen(copy.deepcopy(strategy.model))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "has_teacher": self.teacher is not None}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        super().load_state_dict(state, model)
        self.teacher = frozen(copy.deepcopy(model)) if state["has_teacher"] else None
