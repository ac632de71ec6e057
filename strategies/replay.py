"""Rehearsal: train on the new data together with a class-balanced exemplar memory.

The memory counts exemplars (``protocol.memory.total`` / ``per_class``: indices into the
training sets), or bytes (``protocol.memory.bytes``: each class's exemplars stored by a codec,
decoded when replayed; incremental.memory.budget)."""

from __future__ import annotations

from typing import Any

import torch

from incremental.memory import ExemplarMemory, extract_features, herding_order, indices_by_label
from incremental.strategy import StrategyContext, StrategyPlugin
from incremental.timing import phase

from .options import ReplayConfig


class ExemplarReplay(StrategyPlugin):
    """Exemplar replay: class-balanced memory (herding), mixed into each experience's data."""

    def __init__(self, config: ReplayConfig, context: StrategyContext):
        super().__init__(config, context)
        self.memory: Any
        if context.memory_bytes is not None:
            from incremental.memory.budget import ByteBudgetMemory
            from incremental.memory.codecs import build_codec

            context.require_stored_images("a memory in bytes (protocol.memory.bytes)")
            codec = context.config.protocol.memory.codec
            self.memory = ByteBudgetMemory(context.memory_bytes, build_codec(codec), seed=context.config.seed)
            first = context.train_dataset(0)
            sample = context.train_images(0, list(range(min(64, len(first)))))
            self.memory.check_holds_one_exemplar(sample, context.class_split.classes_per_experience[0],
                                                 "raw" if codec is None else codec.name)
        else:
            self.memory = ExemplarMemory(total=context.memory_total, per_class=context.memory_per_class)

    @property
    def in_bytes(self) -> bool:
        return not isinstance(self.memory, ExemplarMemory)

    def after_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
        if self.in_bytes:
            decoded = self.memory.decoded()
            memory = None if decoded is None else self.context.images_dataset(*decoded)
        else:
            memory = self.memory.dataset(self.context.train_dataset)
        if memory is not None:
            strategy.adapted_dataset = strategy.adapted_dataset.concat(memory.train())

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if not self.in_bytes and not self.memory.enabled:
            return
        experience = strategy.experience.current_experience
        data = self.context.train_dataset(experience)
        groups = indices_by_label(data.targets)
        with phase(strategy, "exemplar_selection"):
            if self.config.selection == "herding":
                feats = extract_features(strategy.model, data, batch_size=strategy.eval_mb_size,
                                         device=strategy.device,
                                         engine=getattr(strategy, "engine", None))
                ranked = {label: [idx[k] for k in herding_order(feats[idx])] for label, idx in groups.items()}
            else:
                ranked = {label: [idx[k] for k in torch.randperm(len(idx)).tolist()] for label, idx in groups.items()}
        if self.in_bytes:
            with phase(strategy, "memory_encoding"):
                self.memory.add_classes(experience, ranked, lambda indices: self.context.train_images(experience, indices))
        else:
            self.memory.add_classes(experience, ranked)

    def memory_report(self) -> dict[str, Any]:
        """This experience's row of metrics.json's ``memory``."""
        if self.in_bytes:
            return {"codec": self.context.config.protocol.memory.codec.name,
                    **self.memory.report(self.context.train_images)}
        splits = self.context.splits
        per_image = splits.channels * splits.image_size ** 2 if splits is not None else None
        return {"codec": "raw", "exemplars": len(self.memory),
                "bytes": None if per_image is None else len(self.memory) * per_image}

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        self.memory.load_state_dict(state)
