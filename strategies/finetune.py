"""Plain finetuning on each new experience: the lower bound of every CIL table."""

from __future__ import annotations

from incremental.strategy import StrategyPlugin


class Finetune(StrategyPlugin):
    """Naive finetuning: new data only, no memory, no regularisation (the lower bound)."""
