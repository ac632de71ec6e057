"""Learning without Forgetting (Li and Hoiem 2016), Avalanche's LwFPlugin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from incremental.config import opt
from incremental.models.net import frozen
from incremental.registry import STRATEGIES
from incremental.strategy import StrategyContext


@dataclass
class LwFConfig:
    alpha: float = opt(1.0, ge=0)        # distillation weight (Avalanche's and Li & Hoiem's 1)
    temperature: float = opt(2.0, gt=0)  # Li & Hoiem's T = 2


def frozen_teacher_lwf_plugin() -> type:
    from avalanche.training.plugins import LwFPlugin

    class FrozenTeacherLwFPlugin(LwFPlugin):
        """Avalanche's LwFPlugin keeps its copy of the previous model in train mode, so the
        teacher's BatchNorm statistics drift and drop-path makes its targets random; here the
        teacher is put in eval mode after each copy."""

        def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            super().after_training_exp(strategy, **kwargs)
            frozen(self.lwf.prev_model)

    return FrozenTeacherLwFPlugin


@STRATEGIES.register("lwf", config=LwFConfig)
def build_lwf(config: LwFConfig, context: StrategyContext) -> Any:
    """LwF: distillation from the previous model on new data only (Avalanche's LwFPlugin)."""
    return frozen_teacher_lwf_plugin()(alpha=config.alpha, temperature=config.temperature)
