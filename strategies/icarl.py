"""iCaRL (Rebuffi et al. 2017): herding replay, sigmoid distillation, nearest-mean-of-exemplars.

Avalanche's ICaRL is a template of its own (a TrainEvalModel, images copied into memory,
and ``benchmark.classes_order`` which class_incremental_benchmark does not set), so it
cannot run as a plugin of the shared template. This strategy keeps Avalanche's pieces that
do fit: its iCaRL loss (``ICaRLLossPlugin``: BCE on one-hot targets whose old-class entries
are the previous model's sigmoid outputs) and its ``NCMClassifier``, with the toolkit's
herding memory.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.nn import functional as F

from incremental.memory import extract_features, indices_by_label
from incremental.models.net import frozen
from incremental.strategy import StrategyContext

from .options import ICaRLConfig
from .replay import ExemplarReplay


def icarl_loss_plugin() -> Any:
    from avalanche.training.losses import ICaRLLossPlugin

    class GrowingICaRLLossPlugin(ICaRLLossPlugin):
        """Avalanche's plugin loads the new weights into its first copy of the model, which
        fails once the head has grown, and keeps that copy in train mode; here each
        experience takes a fresh copy, in eval mode."""

        def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            self.old_model = frozen(copy.deepcopy(strategy.model))
            self.old_classes += sorted({int(t) for t in strategy.experience.dataset.targets})

        def state_dict(self) -> dict[str, Any]:
            return {"old_classes": list(self.old_classes), "has_old_model": self.old_model is not None}

        def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
            self.old_classes = [int(c) for c in state["old_classes"]]
            self.old_model = frozen(copy.deepcopy(model)) if state["has_old_model"] else None

    return GrowingICaRLLossPlugin()


class ICaRL(ExemplarReplay):
    """Herding replay with the iCaRL loss as the criterion; NME classification at evaluation.

    The class means become the model's output adapter (``NearestMeanOutput``, the same
    distances as Avalanche's NCMClassifier): they are saved with the model and checkpointed
    with it, and every evaluation, probe and `incremental probe` classifies with them."""

    def __init__(self, config: ICaRLConfig, context: StrategyContext, loss: Any):
        super().__init__(config, context)
        self.loss = loss

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        strategy._criterion = self.loss  # the template calls _criterion(mb_output, mb_y)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        super().after_training_exp(strategy, **kwargs)
        if self.config.classifier == "ncm":
            from incremental.models.net import NearestMeanOutput

            means = self.class_means(strategy)
            strategy.model.output_adapter = NearestMeanOutput(torch.stack([means[c] for c in range(len(means))]))

    @torch.no_grad()
    def class_means(self, strategy: Any) -> dict[int, torch.Tensor]:
        data = self.memory.dataset(self.context.train_dataset)
        feats = F.normalize(extract_features(strategy.model, data, batch_size=strategy.eval_mb_size,
                                             device=strategy.device, engine=getattr(strategy, "engine", None)),
                            dim=1)
        if self.config.flip_means:
            flipped = FlippedDataset(data)
            feats = feats + F.normalize(extract_features(strategy.model, flipped, batch_size=strategy.eval_mb_size,
                                                         device=strategy.device), dim=1)
        means = {}
        for label, idx in indices_by_label(data.targets).items():
            means[label] = F.normalize(feats[idx].mean(dim=0), dim=0).to(strategy.device)
        return means


class FlippedDataset:
    """An Avalanche dataset's eval view with every image mirrored (for iCaRL's class means)."""

    def __init__(self, data: Any):
        self.data = data.eval()

    def eval(self) -> "FlippedDataset":
        return self

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        x, *rest = self.data[index]
        return (torch.flip(x, dims=[-1]), *rest)


def build_icarl(config: ICaRLConfig, context: StrategyContext) -> list[Any]:
    """iCaRL: herding replay, Avalanche's iCaRL loss and NCMClassifier (nearest mean of exemplars)."""
    context.require_memory("icarl")
    loss = icarl_loss_plugin()
    return [ICaRL(config, context, loss), loss]
