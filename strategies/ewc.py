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

        def compute_importances(self, model: Any, criterion: Any, optimizer: Any, dataset: Any, device: Any,
                                batch_size: int, num_workers: int = 0) -> Any:
            """Under torchrun each rank takes a contiguous block of the minibatches one process
            would make, and the squared-gradient sums are all-reduced: the single-process
            Fisher (an average over those minibatches) for a world-size-th of the work."""
            import torch
            import torch.distributed

            from avalanche.training.utils import zerolike_params_dict

            from incremental.distributed import current

            dist = current()
            if not dist.enabled:
                return super().compute_importances(model, criterion, optimizer, dataset, device, batch_size,
                                                   num_workers)
            batches = -(-len(dataset) // batch_size)
            mine = torch.arange(batches).tensor_split(dist.world_size)[dist.rank]
            if len(mine):
                block = range(int(mine[0]) * batch_size, min((int(mine[-1]) + 1) * batch_size, len(dataset)))
                importances = super().compute_importances(model, criterion, optimizer, dataset.subset(list(block)),
                                                          device, batch_size, num_workers)
            else:
                importances = zerolike_params_dict(model)
            for importance in importances.values():
                importance.data *= len(mine)  # back to a sum over this rank's minibatches
                torch.distributed.all_reduce(importance.data)
                importance.data /= batches
            return importances

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
