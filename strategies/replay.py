"""Rehearsal: train on the new data together with a class-balanced exemplar memory."""

from __future__ import annotations

from typing import Any

import torch

from incremental.timing import phase
from incremental.memory import ExemplarMemory, extract_features, herding_order, indices_by_label
from incremental.strategy import StrategyContext, StrategyPlugin

from .options import ReplayConfig


class ExemplarReplay(StrategyPlugin):
    """Exemplar replay: class-balanced memory (herding), mixed into each experience's data."""

    def __init__(self, config: ReplayConfig, context: StrategyContext):
        super().__init__(config, context)
        self.memory = ExemplarMemory(total=context.memory_total, per_class=context.memory_per_class)

    def after_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
        memory = self.memory.dataset(self.context.train_dataset)
        if memory is not None:
            strategy.adapted_dataset = strategy.adapted_dataset.concat(memory.train())

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if not self.memory.enabled:
            return
        experience = strategy.experience.current_experience
        data = self.context.train_dataset(experience)
        groups = indices_by_label(data.targets)
        with phase(strategy, "exemplar_selection"):
            if self.config.selection == "herding":
                feats = extract_features(strategy.model, data, batch_size=strategy.eval_mb_size,
                                         device=strategy.device)
                ranked = {label: [idx[k] for k in herding_order(feats[idx])] for label, idx in groups.items()}
            else:
                ranked = {label: [idx[k] for k in torch.randperm(len(idx)).tolist()] for label, idx in groups.items()}
        self.memory.add_classes(experience, ranked)

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        self.memory.load_state_dict(state)
