"""GDumb (Prabhu et al. 2020), Avalanche's GDumbPlugin."""

from __future__ import annotations

from typing import Any

from incremental.strategy import StrategyContext


def build_gdumb(config: Any, context: StrategyContext) -> Any:
    """GDumb: retrain from scratch on a class-balanced memory only (Avalanche's GDumbPlugin)."""
    from avalanche.training.plugins import GDumbPlugin

    return GDumbPlugin(mem_size=context.require_memory("gdumb"))
