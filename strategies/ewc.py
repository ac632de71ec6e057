"""Elastic Weight Consolidation (Kirkpatrick et al. 2017), Avalanche's EWCPlugin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from incremental.config import opt
from incremental.errors import ConfigError
from incremental.registry import STRATEGIES
from incremental.strategy import StrategyContext


@dataclass
class EWCConfig:
    ewc_lambda: float = opt(1000.0, ge=0)  # PyCIL's EWC uses lambda = 1000
    # separate: one penalty per past experience; online: one running penalty (Schwarz et al. 2018)
    mode: Literal["separate", "online"] = "separate"
    decay_factor: float | None = opt(None, ge=0, le=1)  # online mode only

    def validate(self) -> None:
        if self.mode == "online" and self.decay_factor is None:
            raise ConfigError("mode online needs decay_factor (e.g. 0.9)", key="decay_factor")
        if self.mode == "separate" and self.decay_factor is not None:
            raise ConfigError("decay_factor is only used with mode: online", key="decay_factor")


@STRATEGIES.register("ewc", config=EWCConfig)
def build_ewc(config: EWCConfig, context: StrategyContext) -> Any:
    """EWC: a Fisher-weighted quadratic penalty on parameter changes (Avalanche's EWCPlugin)."""
    from avalanche.training.plugins import EWCPlugin

    return EWCPlugin(ewc_lambda=config.ewc_lambda, mode=config.mode, decay_factor=config.decay_factor)
