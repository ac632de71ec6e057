"""Bias Correction (Wu et al. 2019), Avalanche's BiCPlugin."""

from __future__ import annotations

import inspect
from typing import Any

from incremental.strategy import StrategyContext

from .options import BiCConfig


class _WritableExperience:
    """Forwards to an experience but lets ``dataset`` be assigned (see below)."""

    def __init__(self, experience: Any):
        self.__dict__["_experience"] = experience
        self.__dict__["dataset"] = experience.dataset

    def __getattr__(self, name: str) -> Any:
        return getattr(self._experience, name)


def bic_plugin_class() -> type:
    import avalanche.training.plugins.bic as avalanche_bic
    from avalanche.training.plugins import BiCPlugin
    from torch.optim.lr_scheduler import MultiStepLR

    if "verbose" not in inspect.signature(MultiStepLR).parameters:
        # Avalanche 0.6 passes verbose=False, which torch >= 2.7 no longer accepts; the
        # shim (in Avalanche's bic module only) drops it.
        class MultiStepLRWithoutVerbose(MultiStepLR):
            def __init__(self, *args: Any, verbose: bool = False, **kwargs: Any):
                super().__init__(*args, **kwargs)

        avalanche_bic.MultiStepLR = MultiStepLRWithoutVerbose

    class WritableDatasetBiCPlugin(BiCPlugin):
        """Avalanche 0.6's BiCPlugin holds out its validation exemplars by assigning
        ``strategy.experience.dataset``, a read-only property of the experiences that
        class_incremental_benchmark makes; the assignment goes to a proxy and is copied back."""

        def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            """After Avalanche's bias correction, the bias layer becomes the model's output
            adapter: saved and probed with the model, the classifier behind the accuracy matrix."""
            super().after_training_exp(strategy, **kwargs)
            if self.bias_layer is not None:
                from incremental.models.net import BiasCorrectionOutput

                layer = self.bias_layer
                strategy.model.output_adapter = BiasCorrectionOutput(layer.clss, layer.alpha, layer.beta)

        def after_eval_forward(self, strategy: Any, **kwargs: Any) -> None:
            """The model's classify() applies the bias correction already."""

        def before_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
            experience = strategy.experience
            strategy.experience = _WritableExperience(experience)
            try:
                super().before_train_dataset_adaptation(strategy, **kwargs)
                experience._dataset = strategy.experience.dataset
            finally:
                strategy.experience = experience

    return WritableDatasetBiCPlugin


def build_bic(config: BiCConfig, context: StrategyContext) -> Any:
    """BiC: replay, distillation and a bias layer fitted on held-out exemplars (Avalanche's BiCPlugin)."""
    training = context.config.training
    return bic_plugin_class()(mem_size=context.require_memory("bic"), val_percentage=config.val_percentage,
                     T=config.temperature, stage_2_epochs=config.stage_2_epochs, lr=config.stage_2_lr,
                     lamb=config.distillation_weight, batch_size=training.batch_size,
                     batch_size_mem=training.batch_size)
