"""InfLoRA (Liang and Li 2024, "InfLoRA: interference-free low-rank adaptation for continual
learning"), as liangyanshuo/InfLoRA's ``methods/inflora.py`` runs it.

The pre-trained ViT stays frozen. Each task t gets, in every block, a LoRA branch on the keys and
on the values of the attention (:class:`~incremental.models.peft.TaskLowRankBank`): ``B_t A_t``,
B trained from zero, A fixed before the task and shared by keys and values. Before task t the
task's training images (train transforms) give each block's input covariance
``C = mean over tokens of x x^T``; with ``M`` the stored subspace of the earlier tasks' inputs
(DualGPM), A_t is the top ``rank`` left singular vectors of ``C - M M^T C`` (``remove``: M spans
what to avoid) or of ``M M^T C`` (``retain``: M spans what is left), divided by sqrt(3). So B_t
A_t x vanishes for inputs in the old tasks' subspace. After task t the covariance of its inputs
(now through its branch) extends M by the directions that hold a share ``threshold`` of the
spectrum, the threshold going from ``lamb`` linearly towards ``lame`` over the tasks; when M
spans more than half the width it is stored by its complement (``retain``).

The loss sees the current task's classes only; prediction is over all classes seen, every
task's branch on.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from incremental.distributed import current, sum_tensor
from incremental.models.peft import add_task_lora, freeze, vision_transformer
from incremental.strategy import StrategyContext, StrategyPlugin
from incremental.timing import phase

from .options import InfLoRAConfig
from .pretrained import loss_on_current_classes


def spectrum_share(singular: np.ndarray) -> np.ndarray:
    return singular ** 2 / (singular ** 2).sum()


def first_basis(covariance: np.ndarray, threshold: float) -> tuple[np.ndarray, str]:
    """After the first task: the left singular vectors holding ``threshold`` of the spectrum
    (at least one), stored as such (``remove``) when they are fewer than half the width, else
    by their complement (``retain``). The reference stores the same vectors as ``retain`` there,
    which its own check then rejects (an AssertionError): this is the case it cannot run."""
    u, s, _ = np.linalg.svd(covariance, full_matrices=False)
    count = max(int(np.sum(np.cumsum(spectrum_share(s)) < threshold)), 1)
    return (u[:, :count], "remove") if count < len(covariance) / 2 else (u[:, count:], "retain")


def extend_removed(basis: np.ndarray, covariance: np.ndarray, threshold: float) -> np.ndarray:
    """A ``remove`` basis extended by the new inputs' directions outside it, until the basis
    and the added directions hold ``threshold`` of the new covariance's spectrum."""
    total = (np.linalg.svd(covariance, compute_uv=False) ** 2).sum()
    u, s, _ = np.linalg.svd(covariance - basis @ (basis.T @ covariance), full_matrices=False)
    held, count = (total - (s ** 2).sum()) / total, 0
    for share in s ** 2 / total:
        if held >= threshold:
            break
        held, count = held + share, count + 1
    return np.hstack([basis, u[:, :count]])[:, :len(covariance)] if count else basis


def shrink_retained(basis: np.ndarray, covariance: np.ndarray, threshold: float) -> np.ndarray:
    """A ``retain`` basis (what is still free) less the new inputs' directions inside it that
    hold the share above ``1 - threshold`` of the new covariance's spectrum."""
    total = (np.linalg.svd(covariance, compute_uv=False) ** 2).sum()
    u, s, _ = np.linalg.svd(basis @ (basis.T @ covariance), full_matrices=False)
    held, count = (s ** 2).sum() / total, 0
    for share in s ** 2 / total:
        if held < 1 - threshold:
            break
        held, count = held - share, count + 1
    if not count:
        return basis
    left = basis - u[:, :count] @ (u[:, :count].T @ basis)
    return np.linalg.svd(left)[0][:, :basis.shape[1] - count]


def update_basis(basis: np.ndarray | None, kind: str | None, covariance: np.ndarray,
                 threshold: float) -> tuple[np.ndarray, str]:
    """DualGPM's update of one block's subspace (``update_DualGPM``), then the switch to storing
    the complement once a ``remove`` basis spans more than half the width."""
    if basis is None:
        basis, kind = first_basis(covariance, threshold)
    elif kind == "remove":
        basis = extend_removed(basis, covariance, threshold)
    else:
        basis = shrink_retained(basis, covariance, threshold)
    if kind == "remove" and basis.shape[1] > len(basis) / 2:
        basis, kind = np.linalg.svd(basis)[0][:, basis.shape[1]:], "retain"
    return basis, kind


def design_down_projection(covariance: np.ndarray, basis: np.ndarray | None, kind: str | None,
                           rank: int) -> np.ndarray:
    """A_t (rank x d): the top left singular vectors of the covariance with the old tasks'
    subspace taken out (``remove``) or kept alone (``retain``), over sqrt(3)."""
    if basis is not None:
        projected = basis @ (basis.T @ covariance)
        covariance = covariance - projected if kind == "remove" else projected
    u = np.linalg.svd(covariance, full_matrices=False)[0]
    return u[:, :rank].T / math.sqrt(3)


class InfLoRA(StrategyPlugin):
    """InfLoRA: per-task LoRA on keys and values, down-projections orthogonal to the old tasks' inputs (DualGPM)."""

    def __init__(self, config: InfLoRAConfig, context: StrategyContext):
        super().__init__(config, context)
        self.bases: list[np.ndarray | None] = []
        self.kinds: list[str | None] = []

    def prepare_model(self, model: Any) -> None:
        vit = freeze(vision_transformer(model.backbone))
        add_task_lora(vit, tasks=self.context.class_split.num_experiences, rank=self.config.rank)

    def bank(self, strategy: Any) -> Any:
        return strategy.model.backbone.task_lora

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        task, bank = strategy.experience.current_experience, self.bank(strategy)
        bank.active = task
        for block in bank.b:  # only this task's B trains
            for t, b in enumerate(block):
                b.requires_grad_(t == task)
        covariances = self.input_covariances(strategy, task)
        if not self.bases:
            self.bases, self.kinds = [None] * len(covariances), [None] * len(covariances)
        with torch.no_grad():
            for index, covariance in enumerate(covariances):
                a = design_down_projection(covariance, self.bases[index], self.kinds[index], self.config.rank)
                bank.a[index, task] = torch.from_numpy(a).to(bank.a)  # the same A for keys and values
                bank.b[index][task].zero_()

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        loss_on_current_classes(strategy, self.context)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        task = strategy.experience.current_experience
        covariances = self.input_covariances(strategy, task)
        tasks = self.context.class_split.num_experiences
        threshold = (self.config.lame - self.config.lamb) * task / tasks + self.config.lamb
        for index, covariance in enumerate(covariances):
            self.bases[index], self.kinds[index] = update_basis(self.bases[index], self.kinds[index], covariance,
                                                                threshold)

    @torch.no_grad()
    def input_covariances(self, strategy: Any, task: int) -> list[np.ndarray]:
        """Each block's mean of ``x x^T`` over every token of the task's training images (train
        transforms, as the reference's training loader; eval mode), summed across ranks."""
        bank, model = self.bank(strategy), strategy.model
        bank.input_sums.zero_()
        bank.input_tokens.zero_()
        was_training, bank.collect = model.training, True
        model.eval()
        try:
            with phase(strategy, "feature_pass"):
                batches = strategy.engine.batches(self.context.train_dataset(task), batch_size=strategy.train_mb_size,
                                                  shuffle=False, drop_last=False, seed=self.context.config.seed + task)
                for x, *_ in batches:
                    model.pooled(x.to(strategy.device))
        finally:
            bank.collect = False
            model.train(was_training)
        dist = current()
        sums, tokens = sum_tensor(bank.input_sums, dist), sum_tensor(bank.input_tokens, dist)
        return [(sums[i] / tokens[i]).cpu().numpy() for i in range(len(sums))]

    def state_dict(self) -> dict[str, Any]:
        return {"bases": [None if b is None else torch.from_numpy(b) for b in self.bases], "kinds": list(self.kinds)}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        self.bases = [None if b is None else b.numpy() for b in state["bases"]]
        self.kinds = list(state["kinds"])
