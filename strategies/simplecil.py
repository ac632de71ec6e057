"""SimpleCIL (Zhou et al. 2023, "Revisiting class-incremental learning with pre-trained models"):
the pre-trained model, frozen, and a prototype classifier.

After each experience, the prototype of every new class is the mean of its training images'
pooled features (eval transforms); a test image goes to the class of the most cosine-similar
prototype (PILOT's ``simplecil``: a CosineLinear whose weights are the prototypes). No
gradient step is taken: the backbone and the linear head are never trained.
"""

from __future__ import annotations

from typing import Any

from incremental.models.peft import freeze
from incremental.strategy import StrategyContext, StrategyPlugin

from .options import SimpleCILConfig
from .pretrained import class_means, experience_features, set_prototypes


class SimpleCIL(StrategyPlugin):
    """SimpleCIL: the frozen pre-trained model and a prototype (class-mean) classifier."""

    def __init__(self, config: SimpleCILConfig, context: StrategyContext):
        super().__init__(config, context)

    def prepare_model(self, model: Any) -> None:
        freeze(model)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        strategy.train_epochs = 0  # prototypes only

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        features, labels = experience_features(strategy, strategy.experience.current_experience, self.context)
        set_prototypes(strategy.model, class_means(features, labels), self.config.metric)
