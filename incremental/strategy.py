"""What a strategy is: an Avalanche plugin built from its typed config and a run context.

A registered strategy is a class ``Cls(config, context)`` returning a
:class:`avalanche.core.SupervisedPlugin`. The runner builds one ``SupervisedTemplate`` and
attaches the strategy's plugin next to its own (optimizer, evaluation, progress), so a
strategy only writes the hooks it changes, as Avalanche's LwFPlugin does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from avalanche.core import SupervisedPlugin

from .config import RunConfig
from .protocol import ClassSplit


@dataclass
class StrategyContext:
    """What a strategy may need beyond its own options."""

    config: RunConfig
    class_split: ClassSplit
    benchmark: Any  # the Avalanche CLScenario (train_stream, test_stream)
    device: Any

    @property
    def memory_total(self) -> int | None:
        return self.config.protocol.memory.total

    @property
    def memory_per_class(self) -> int | None:
        return self.config.protocol.memory.per_class

    def train_dataset(self, experience: int) -> Any:
        return self.benchmark.train_stream[experience].dataset


class StrategyPlugin(SupervisedPlugin):
    """Base class for registered strategies (any SupervisedPlugin subclass works too)."""

    def __init__(self, config: Any, context: StrategyContext):
        super().__init__()
        self.config = config
        self.context = context

    def state_dict(self) -> dict[str, Any]:
        """Plain data (ints, floats, lists, dicts, tensors) to checkpoint between experiences."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
