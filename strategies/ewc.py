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


def checkpointed_ewc_plugin() -> type:
    from avalanche.training.plugins import EWCPlugin
    from avalanche.training.utils import ParamData

    class CheckpointedEWCPlugin(EWCPlugin):
        """Avalanche's EWCPlugin with its saved parameters and Fisher importances (per
        experience, per parameter name) in the run's checkpoints."""

        def state_dict(self) -> dict[str, Any]:
            def tensors(table: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
                return {str(exp): {name: data.data.detach().cpu() for name, data in params.items()}
                        for exp, params in table.items()}

            return {"saved_params": tensors(self.saved_params), "importances": tensors(self.importances)}

        def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
            device = next(model.parameters()).device
            for table, saved in ((self.saved_params, state["saved_params"]), (self.importances, state["importances"])):
                table.clear()
                for exp, params in saved.items():
                    table[int(exp)] = {name: ParamData(name, init_tensor=t.to(device), device=device)
                                       for name, t in params.items()}

    return CheckpointedEWCPlugin


@STRATEGIES.register("ewc", config=EWCConfig)
def build_ewc(config: EWCConfig, context: StrategyContext) -> Any:
    """EWC: a Fisher-weighted quadratic penalty on parameter changes (Avalanche's EWCPlugin)."""
    return checkpointed_ewc_plugin()(ewc_lambda=config.ewc_lambda, mode=config.mode,
                                     decay_factor=config.decay_factor)
