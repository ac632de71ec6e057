"""ACIL (Zhuang et al. 2022, "ACIL: analytic class-incremental learning with absolute memorization
and privacy protection"), as its authors' code runs it (ZHUANGHP/Analytic-continual-learning,
``analytic/ACIL.py``, the G-ACIL form of the recursion, which equals ACIL's in this setting).

The backbone is frozen after the first experience (``tuning``: ``frozen`` throughout by default,
which is the reference with a pre-trained backbone and no base classes; ``finetune`` trains it
in the first experience with the linear head, as the reference's base training does). Every
experience then sends the pooled features ``f`` of its training images (eval transforms) through
a fixed random expansion with ReLU, ``x = ReLU(f B^T)`` (B: M x d, drawn as nn.Linear draws its
weights, no bias), and updates a ridge regression onto the one-hot labels by recursive least
squares, ``rls_batch_size`` rows at a time:

    R <- R - R X^T (I + X R X^T)^-1 X R,    W <- W + R X^T (Y - X W)      (R starts at I / gamma)

so that after any number of experiences, W is the ridge solution ``(X^T X + gamma I)^-1 X^T Y``
over every image seen ("absolute memorization"), without keeping an image or a feature. The
classifier is ``x W`` over the classes seen. Everything after the backbone is fp64, as in the
reference.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F

from incremental.models.net import AnalyticOutput
from incremental.models.peft import apply_tuning, freeze, vision_transformer
from incremental.progress import bar
from incremental.strategy import StrategyContext
from incremental.timing import phase

from .options import ACILConfig
from .pretrained import FirstSessionTraining, experience_features


class RecursiveLeastSquares:
    """The ridge regression ``argmin_W ||X W - Y||^2 + gamma ||W||^2`` over every row given to
    :meth:`fit` so far, kept as ``R = (X^T X + gamma I)^-1`` and W and updated per block by the
    Woodbury identity (ACIL's equations 9 and 10), in fp64. The reference forms
    ``R X^T K X R`` left to right (an M x M x M product); here it is one M x n x M product
    added into R in place, the same quantity."""

    def __init__(self, dim: int, outputs: int, gamma: float, device: Any = None):
        self.inverse = torch.eye(dim, dtype=torch.float64, device=device) / gamma
        self.weights = torch.zeros(dim, outputs, dtype=torch.float64, device=device)

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One block of rows ``x`` (n x M) with targets ``y`` (n x outputs)."""
        x, y = x.to(self.inverse), y.to(self.inverse)
        rx = self.inverse @ x.T  # R X^T (M x n); R is symmetric, so X R is its transpose
        kernel = torch.eye(len(x), dtype=x.dtype, device=x.device) + x @ rx
        self.inverse.addmm_(rx, torch.linalg.solve(kernel, rx.T), alpha=-1.0)
        self.weights += (self.inverse @ x.T) @ (y - x @ self.weights)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weights) @ self.weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"inverse": self.inverse, "weights": self.weights}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "RecursiveLeastSquares":
        rls = cls.__new__(cls)
        rls.inverse, rls.weights = state["inverse"], state["weights"]
        return rls


def draw_expansion(in_features: int, out_features: int) -> torch.Tensor:
    """The random buffer's weights (out x in, fp64), drawn as ``nn.Linear.reset_parameters``
    draws a weight (Kaiming-uniform with a = sqrt(5): uniform in +-1/sqrt(in)), which is how the
    reference's RandomBuffer gets them."""
    bound = 1.0 / math.sqrt(in_features)
    return torch.empty(out_features, in_features, dtype=torch.float64).uniform_(-bound, bound)


def tune_backbone(model: Any, tuning: Any) -> None:
    """``frozen`` and ``finetune`` on any backbone (the reference freezes, or trains, a ResNet);
    the parameter-efficient tunings on a ViT or Swin."""
    if tuning.name == "frozen":
        freeze(model.backbone)
    elif tuning.name != "finetune":
        apply_tuning(vision_transformer(model.backbone, swin=True), tuning)


class ACIL(FirstSessionTraining):
    """ACIL: a frozen random ReLU expansion and a ridge head by recursive least squares (exemplar-free, closed form)."""

    def __init__(self, config: ACILConfig, context: StrategyContext):
        super().__init__(config, context)
        self.expansion: torch.Tensor | None = None
        self.streams: list[RecursiveLeastSquares] = []

    def prepare_model(self, model: Any) -> None:
        tune_backbone(model, self.config.tuning)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        experience = strategy.experience.current_experience
        if experience == 0:
            freeze(strategy.model.backbone)  # trained once at most, then fixed
        features, labels = experience_features(strategy, experience, self.context)
        features = features.float().cpu()  # R stays in host RAM, as RanPAC's G
        if self.expansion is None:
            self.expansion = draw_expansion(features.shape[1], self.config.expansion_size)
            self.streams = self.new_streams()
        order = torch.randperm(len(labels))  # the reference's loader shuffles the phase
        current = self.context.class_split.label_ranges()[experience]
        batch, m = self.config.rls_batch_size, self.config.expansion_size
        with phase(strategy, "closed_form"), bar(math.ceil(len(labels) / batch), f"{type(self).__name__} ({m} x {m})",
                                                 unit="block") as progress:
            for block in order.split(batch):  # expanded a block at a time, as the reference streams them
                expanded = features[block].double() @ self.expansion.T
                self.fit_block(expanded, F.one_hot(labels[block], self.context.total_classes).double(), current)
                progress.update(1)
        device = next(strategy.model.parameters()).device
        strategy.model.output_adapter = self.output(current.stop).to(device)

    def new_streams(self) -> list[RecursiveLeastSquares]:
        m, classes = self.config.expansion_size, self.context.total_classes
        return [RecursiveLeastSquares(m, classes, self.config.gamma)]

    def fit_block(self, expanded: torch.Tensor, onehot: torch.Tensor, current: range) -> None:
        self.streams[0].fit(torch.relu(expanded), onehot)

    def output(self, seen: int) -> AnalyticOutput:
        return AnalyticOutput(self.expansion, self.streams[0].weights[:, :seen].T.contiguous())

    def state_dict(self) -> dict[str, Any]:
        return {"expansion": self.expansion, "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        self.expansion = state["expansion"]
        self.streams = [RecursiveLeastSquares.from_state(s) for s in state["streams"]]
