"""Learning without Forgetting (Li and Hoiem 2016), Avalanche's LwFPlugin."""

from __future__ import annotations

import copy
from typing import Any

from incremental.models.net import frozen
from incremental.strategy import StrategyContext

from .options import LwFConfig


def frozen_teacher_lwf_plugin() -> type:
    from avalanche.training.plugins import LwFPlugin

    class FrozenTeacherLwFPlugin(LwFPlugin):
        """Avalanche's LwFPlugin keeps its copy of the previous model in train mode, so the
        teacher's BatchNorm statistics drift and drop-path makes its targets random; here the
        teacher is put in eval mode after each copy."""

        def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            super().after_training_exp(strategy, **kwargs)
            frozen(self.lwf.prev_model)

        def state_dict(self) -> dict[str, Any]:
            return {"experiences": self.lwf.expcount, "has_teacher": self.lwf.prev_model is not None,
                    "classes_by_task": {str(t): sorted(int(c) for c in cs)
                                        for t, cs in self.lwf.prev_classes_by_task.items()}}

        def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
            self.lwf.expcount = int(state["experiences"])
            self.lwf.prev_model = frozen(copy.deepcopy(model)) if state["has_teacher"] else None
            for task, classes in state["classes_by_task"].items():
                self.lwf.prev_classes_by_task[int(task)] = set(classes)

    return FrozenTeacherLwFPlugin


def build_lwf(config: LwFConfig, context: StrategyContext) -> Any:
    """LwF: distillation from the previous model on new data only (Avalanche's LwFPlugin)."""
    return frozen_teacher_lwf_plugin()(alpha=config.alpha, temperature=config.temperature)
