"""Elastic Weight Consolidation (Kirkpatrick et al. 2017), Avalanche's EWCPlugin."""

from __future__ import annotations

from typing import Any

from incremental.strategy import StrategyContext

from .options import EWCConfig


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


def build_ewc(config: EWCConfig, context: StrategyContext) -> Any:
    """EWC: a Fisher-weighted quadratic penalty on parameter changes (Avalanche's EWCPlugin)."""
    return checkpointed_ewc_plugin()(ewc_lambda=config.ewc_lambda, mode=config.mode,
                                     decay_factor=config.decay_factor)
