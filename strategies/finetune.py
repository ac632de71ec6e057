"""Plain finetuning on each new experience: the lower bound of every CIL table."""

from __future__ import annotations

from incremental.registry import STRATEGIES
from incremental.strategy import StrategyPlugin


@STRATEGIES.register("finetune")
class Finetune(StrategyPlugin):
    """Naive finetuning: new data only, no memory, no regularisation (the lower bound)."""
