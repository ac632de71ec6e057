"""DS-AL (Zhuang et al. 2024, "DS-AL: a dual-stream analytic learning for exemplar-free
class-incremental learning"), as its authors' code runs it (ZHUANGHP/Analytic-continual-learning,
``analytic/DSAL.py``).

ACIL (:mod:`incremental.strategies.acil`) with the expansion's activation moved into two
streams over the same linear expansion ``z = f B^T``:

- the main stream, ACIL's ridge regression on ``ReLU(z)`` (``gamma``);
- the compensation stream, a second one on ``tanh(z)`` (``gamma_comp``), fitted to what the main
  stream, just updated on the same block, leaves of the labels, kept in the current experience's
  classes only (the reference's "previous label cleansing": the other columns are zeroed).

The classifier is ``main + compensation_ratio * compensation``. Because the compensation targets
come from the main stream after each block, the result depends on ``rls_batch_size`` (the
reference's ``--IL-batch-size``) where an experience holds more rows than one block.
"""

from __future__ import annotations

import torch

from incremental.models.net import AnalyticOutput

from .acil import ACIL, RecursiveLeastSquares


class DSAL(ACIL):
    """DS-AL: ACIL's stream plus a tanh stream fitted to its residual on the current classes."""

    def new_streams(self) -> list[RecursiveLeastSquares]:
        m, classes = self.config.expansion_size, self.context.total_classes
        return [RecursiveLeastSquares(m, classes, self.config.gamma),
                RecursiveLeastSquares(m, classes, self.config.gamma_comp)]

    def fit_block(self, expanded: torch.Tensor, onehot: torch.Tensor, current: range) -> None:
        main, compensation = self.streams
        hidden = torch.relu(expanded)
        main.fit(hidden, onehot)
        residual = onehot - main.predict(hidden)
        residual[:, : current.start] = 0.0  # previous label cleansing: the current classes only
        residual[:, current.stop:] = 0.0  # (classes not seen yet: zero on both sides already)
        compensation.fit(torch.tanh(expanded), residual)

    def output(self, seen: int) -> AnalyticOutput:
        main, compensation = self.streams
        return AnalyticOutput(self.expansion, main.weights[:, :seen].T.contiguous(),
                              compensation.weights[:, :seen].T.contiguous(), self.config.compensation_ratio)
