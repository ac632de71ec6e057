"""A custom strategy in one file: weight aligning (Zhao et al., CVPR 2020).

After each experience, the classifier rows of the new classes are rescaled so that their
mean norm matches the old classes' mean norm, against the bias toward new classes.

    incremental run digits_b0_5steps --plugin experiments/custom_plugin/weight_aligning.py \
        --set strategy=weight_aligning
"""

from dataclasses import dataclass

import torch

from incremental.config import opt
from incremental.registry import STRATEGIES
from incremental.strategy import StrategyPlugin


@dataclass
class WeightAligningConfig:
    strength: float = opt(1.0, ge=0, le=1)  # 1: full alignment, 0: none (plain finetuning)


@STRATEGIES.register("weight_aligning", config=WeightAligningConfig)
class WeightAligning(StrategyPlugin):
    """Finetuning, then new-class classifier rows rescaled to the old rows' mean norm."""

    def after_training_exp(self, strategy, **kwargs):
        ranges = self.context.class_split.label_ranges()
        step = strategy.experience.current_experience
        if step == 0:
            return
        weight = strategy.model.head.classifier.weight
        with torch.no_grad():
            old = weight[: ranges[step].start].norm(dim=1).mean()
            new = weight[ranges[step].start: ranges[step].stop].norm(dim=1).mean()
            gamma = 1 + self.config.strength * (old / new - 1)
            weight[ranges[step].start: ranges[step].stop] *= gamma
