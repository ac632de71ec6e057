"""ViTIL (Yu, Chen, Jin, Liu 2021, "Improving Vision Transformers for Incremental Learning").

ViTIL finds three problems of ViTs in class-incremental learning and fixes each:

- slow convergence with few classes -> a convolutional stem: a backbone option,
  ``backbone: {name: vit, stem: conv}`` (Xiao et al. 2021), not part of this plugin;
- a strong bias toward new classes -> balanced finetuning on exemplars (``balanced_finetuning``);
- a classifier learning rate that is too low -> ``head_lr_scale`` times the base LR.

On top: herding exemplar replay (iCaRL) and logit distillation from the previous model
(``distillation``). The paper's hyperparameters are not public; every default below says
where it comes from, and every ingredient can be switched off for ablations:
``vitil`` with ``head_lr_scale: 1``, ``balanced_finetuning.enabled: false`` and
``distillation.enabled: false`` is exactly ``replay``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from incremental.errors import ConfigError
from incremental.training.finetune import balanced_finetune
from incremental.run.environment import resolve_workers
from incremental.timing import phase
from incremental.losses import logit_distillation
from incremental.models.net import frozen
from incremental.training.optim import head_param_groups
from incremental.training.template import strategy_autocast
from incremental.strategy import StrategyContext

from .options import ViTILConfig
from .replay import ExemplarReplay


class ViTIL(ExemplarReplay):
    """ViTIL: herding replay, head LR scaling, balanced finetuning, logit KD (each switchable)."""

    def __init__(self, config: ViTILConfig, context: StrategyContext):
        super().__init__(config, context)
        if config.balanced_finetuning.enabled:
            context.require_memory("vitil (balanced_finetuning)")
            if config.balanced_finetuning.params == "frozen_encoder" and \
                    context.config.backbone.name not in ("vit", "timm_vit", "vit_dlcl"):
                raise ConfigError(f"frozen_encoder (DyTox's freeze_ft [sab]) needs a ViT backbone, not "
                                  f"{context.config.backbone.name!r}", key="strategy.balanced_finetuning.params")
        if config.head_lr_scale != 1.0 or config.head_weight_decay is not None:
            context.param_group_hooks.append(head_param_groups(config.head_lr_scale, config.head_weight_decay))
        self.teacher: torch.nn.Module | None = None
        self.finetuning_losses: list[list[float]] = []

    # ---------------------------------------------------------------- distillation
    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        kd = self.config.distillation
        if self.teacher is None or not kd.enabled or kd.weight == 0:
            return
        with torch.no_grad(), strategy_autocast(strategy):
            with phase(strategy, "kd_teacher"):
                teacher_logits = self.teacher(strategy.mb_x).float()
        strategy.loss = strategy.loss + kd.weight * logit_distillation(
            strategy.mb_output, teacher_logits, kd.temperature)

    # ---------------------------------------------------------------- after each experience
    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        super().after_training_exp(strategy, **kwargs)  # herding: add the new classes' exemplars
        experience = strategy.experience.current_experience
        bft = self.config.balanced_finetuning
        if bft.enabled and experience > 0:
            with phase(strategy, "balanced_finetuning"):
                self.finetuning_losses.append(self.finetune(strategy, experience))
        if self.config.distillation.enabled:
            self.teacher = frozen(copy.deepcopy(strategy.model))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "finetuning_losses": self.finetuning_losses,
                "has_teacher": self.teacher is not None}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        super().load_state_dict(state, model)
        self.finetuning_losses = [list(losses) for losses in state["finetuning_losses"]]
        # The teacher is the model as it was checkpointed (copied after balanced finetuning).
        self.teacher = frozen(copy.deepcopy(model)) if state["has_teacher"] else None

    def balanced_set(self) -> Any:
        """Old classes' exemplars and as many per class of the new classes: the memory after
        its update, whose per-class quotas are equal (up to one, for a remainder)."""
        return self.memory.dataset(self.context.train_dataset)

    def finetune(self, strategy: Any, experience: int) -> list[float]:
        """Balanced finetuning on the run's training engine (its precision, compile, data path
        and torchrun sharding); a plain Avalanche template gets a single-process engine."""
        bft = self.config.balanced_finetuning
        training = self.context.config.training
        data = self.balanced_set()
        return balanced_finetune(
            strategy.model, data, epochs=bft.epochs, engine=getattr(strategy, "engine", None),
            lr=training.optimizer.lr * bft.lr_scale, batch_size=bft.batch_size or training.batch_size,
            params=bft.params, schedule=bft.schedule, optimizer=training.optimizer, device=strategy.device,
            seed=self.context.config.seed * 1000 + experience, num_workers=resolve_workers(training.num_workers),
            label_smoothing=training.label_smoothing, group_hooks=self.context.param_group_hooks,
            precision=training.precision, desc=f"exp {experience} balanced finetuning")
