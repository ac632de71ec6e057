"""The run's own Avalanche plugins: optimisation, evaluation records, progress bars, the text
head's initialisation."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import torch
from avalanche.core import SupervisedPlugin

from ..config import TrainingConfig
from .optim import LOSS_CHECK_EVERY, GroupHook, build_optimizer, check_finite, lr_factor, scale_lrs


class OptimizationPlugin(SupervisedPlugin, supports_distributed=True):
    """A fresh optimizer at every experience, and a per-iteration LR schedule.

    Avalanche otherwise carries the optimizer's state (AdamW moments) from one experience
    to the next, which collapsed small ViTs to one class. Building the optimizer here, after
    the head has grown, also keeps every parameter in the groups we chose.
    ``group_hooks`` (``hook(model, groups) -> groups``) let a strategy adjust the groups
    (e.g. a head LR scale); they see the grown head at every experience.
    """

    def __init__(self, cfg: TrainingConfig, group_hooks: Sequence[GroupHook] = ()):
        super().__init__()
        self.cfg = cfg
        self.group_hooks = group_hooks
        self.epochs = cfg.epochs
        self.iteration, self.factor = 0, 1.0

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        first = strategy.experience.current_experience == 0
        optimizer = self.cfg.optimizer
        lr = optimizer.initial_lr if (first and optimizer.initial_lr) else optimizer.lr
        if first and optimizer.initial_weight_decay is not None:
            optimizer = dataclasses.replace(optimizer, weight_decay=optimizer.initial_weight_decay)
        strategy.optimizer = build_optimizer(strategy.model, optimizer, lr, self.group_hooks)
        self.epochs = strategy.train_epochs

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.iteration = strategy.clock.train_exp_iterations
        self.factor = lr_factor(self.cfg.scheduler, iteration=self.iteration,
                                iters_per_epoch=len(strategy.dataloader), epochs=self.epochs)
        scale_lrs(strategy.optimizer, self.factor)

    def schedule_state(self) -> dict[str, Any]:
        """Where the LR schedule stood at the last iteration (the schedule restarts with
        every experience, so a checkpoint records this for inspection only)."""
        return {"name": self.cfg.scheduler.name, "iteration": self.iteration, "lr_factor": self.factor,
                "epochs": self.epochs}


# --------------------------------------------------------------------------- records


def task_il_hits(logits: torch.Tensor, labels: torch.Tensor, label_experience: torch.Tensor,
                 experience: int) -> torch.Tensor:
    """How many of a batch of ``experience``'s test images the argmax over that experience's own
    classes gets right (task-IL: the task is given). Logits of classes outside the protocol's
    (a head wider than the class order) never count."""
    width = logits.shape[1]
    own = torch.zeros(width, dtype=torch.bool, device=logits.device)
    known = min(width, len(label_experience))
    own[:known] = label_experience[:known] == experience
    within = logits.masked_fill(~own, float("-inf")).argmax(dim=1)
    return (within == labels).sum()


class EvaluationRecorder(SupervisedPlugin, supports_distributed=True):
    """Counts correct predictions per evaluated experience, and the training loss.

    Read-only: it looks at ``mb_output`` and ``mb_y`` after each eval iteration, so the
    accuracy matrix comes from the same forward passes Avalanche runs, with no second pass.
    """

    def __init__(self, label_experience: Sequence[int] = ()) -> None:
        super().__init__()
        # label (order position) -> experience that brought it, for the prediction matrix
        self.label_experience = torch.as_tensor(list(label_experience), dtype=torch.long)
        self.num_experiences = int(self.label_experience.max()) + 1 if len(self.label_experience) else 0
        self.correct: dict[int, int] = {}
        self.total: dict[int, int] = {}
        self.predicted: dict[int, torch.Tensor] = {}
        self._hits: dict[int, torch.Tensor] = {}  # correct predictions so far, on the device
        # task-IL: correct when the argmax is taken over the evaluated experience's classes only
        self.task_correct: dict[int, int] = {}
        self._task_hits: dict[int, torch.Tensor] = {}
        self.loss_sum = 0.0
        self.loss_count = 0
        self._pending: list[torch.Tensor] = []  # this epoch's unread per-step losses, on the device
        self.epoch_losses: list[float] = []
        self.train_samples = 0
        self.trained_params = 0

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.train_samples = len(strategy.adapted_dataset)  # new data plus any replayed memory
        self.epoch_losses = []
        # after OptimizationPlugin built this experience's optimizer (it comes earlier in the list)
        self.trained_params = 0 if not strategy.train_epochs else sum(
            p.numel() for group in strategy.optimizer.param_groups if group.get("name") != "idle"
            for p in group["params"])
        self.loss_sum, self.loss_count, self._pending = 0.0, 0, []  # no step, no loss

    def before_eval(self, strategy: Any, **kwargs: Any) -> None:
        self.correct, self.total, self.predicted, self._hits = {}, {}, {}, {}
        self.task_correct, self._task_hits = {}, {}

    def after_eval_iteration(self, strategy: Any, **kwargs: Any) -> None:
        # Counted on the device and read once per experience (after_eval_exp), not per batch.
        exp = strategy.experience.current_experience
        predictions = strategy.mb_output.argmax(dim=1)
        hits = (predictions == strategy.mb_y).sum()
        self._hits[exp] = self._hits[exp] + hits if exp in self._hits else hits
        self.total[exp] = self.total.get(exp, 0) + len(strategy.mb_y)
        if len(self.label_experience):
            if self.label_experience.device != predictions.device:
                self.label_experience = self.label_experience.to(predictions.device)
            counts = torch.bincount(self.label_experience[predictions], minlength=self.num_experiences)
            self.predicted[exp] = self.predicted[exp] + counts if exp in self.predicted else counts
            task_hits = task_il_hits(strategy.mb_output, strategy.mb_y, self.label_experience, exp)
            self._task_hits[exp] = self._task_hits[exp] + task_hits if exp in self._task_hits else task_hits

    def after_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        exp = strategy.experience.current_experience
        if exp in self._hits:
            self.correct[exp] = int(self._hits.pop(exp))
        if exp in self._task_hits:
            self.task_correct[exp] = int(self._task_hits.pop(exp))
        if exp in self.predicted:
            self.predicted[exp] = self.predicted[exp].cpu()

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self.loss_sum, self.loss_count = 0.0, 0  # report the last epoch's mean loss

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self._flush_losses(strategy)
        if self.loss_count:
            self.epoch_losses.append(self.loss_sum / self.loss_count)

    def after_eval(self, strategy: Any, **kwargs: Any) -> None:
        """Under torchrun each rank evaluated a shard: sum the counts over ranks."""
        from ..distributed import sum_tensor

        dist = getattr(strategy, "dist", None)
        if dist is None or not dist.enabled:
            return
        n = self.num_experiences or 1 + max(self.total, default=0)
        device = strategy.device
        correct = torch.tensor([self.correct.get(j, 0) for j in range(n)], device=device)
        task_correct = torch.tensor([self.task_correct.get(j, 0) for j in range(n)], device=device)
        total = torch.tensor([self.total.get(j, 0) for j in range(n)], device=device)
        predicted = torch.stack([torch.as_tensor(self.predicted.get(j, torch.zeros(n, dtype=torch.long)),
                                                 dtype=torch.long).reshape(-1)[:n] for j in range(n)]).to(device)
        for counts in (correct, task_correct, total, predicted):
            sum_tensor(counts, dist)
        seen = [j for j in range(n) if total[j] > 0]
        self.correct = {j: int(correct[j]) for j in seen}
        self.task_correct = {j: int(task_correct[j]) for j in seen} if len(self.label_experience) else {}
        self.total = {j: int(total[j]) for j in seen}
        self.predicted = {j: predicted[j].cpu() for j in seen} if len(self.label_experience) else {}

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        # Kept on the device: reading the loss every step would stall the GPU's queue once per
        # iteration. The losses are read, and checked for NaN, every LOSS_CHECK_EVERY steps.
        loss = strategy.loss.detach().float().reshape(())
        self._pending.append(torch.stack([loss * len(strategy.mb_y), loss.new_tensor(float(len(strategy.mb_y)))]))
        if len(self._pending) >= LOSS_CHECK_EVERY:
            self._flush_losses(strategy)

    def _flush_losses(self, strategy: Any) -> None:
        """Read the pending steps' losses (one host sync), each the loss of the global batch
        under torchrun, so every rank sees the same values and a NaN stops all of them together."""
        if not self._pending:
            return
        from ..distributed import sum_tensor

        steps = torch.stack(self._pending)  # (k, 2): loss x batch size, batch size
        dist = getattr(strategy, "dist", None)
        if dist is not None and dist.enabled:
            steps = sum_tensor(steps, dist)
        losses = (steps[:, 0] / steps[:, 1]).tolist()
        first_step = self.loss_count + 1
        self._pending = []
        for offset, loss in enumerate(losses):
            check_finite(loss, "training loss", f"in experience {strategy.experience.current_experience}, "
                         f"epoch {strategy.clock.train_exp_epochs + 1} (step {first_step + offset} of the epoch)",
                         key="training.optimizer.lr")
        self.loss_sum += sum(losses)
        self.loss_count += len(losses)

    @property
    def train_loss(self) -> float | None:
        return self.loss_sum / self.loss_count if self.loss_count else None

    def accuracies(self, num_experiences: int) -> list[float]:
        """Accuracy (%) on experiences 0..num_experiences-1 from the last evaluation."""
        return [100.0 * self.correct.get(j, 0) / max(1, self.total.get(j, 0)) for j in range(num_experiences)]

    def task_accuracies(self, num_experiences: int) -> list[float] | None:
        """Task-IL accuracy (%) on experiences 0..num_experiences-1 from the last evaluation: the
        argmax over each experience's own classes; None without the label-to-experience map."""
        if not len(self.label_experience):
            return None
        return [100.0 * self.task_correct.get(j, 0) / max(1, self.total.get(j, 0)) for j in range(num_experiences)]

    def prediction_matrix(self, num_experiences: int) -> list[list[int]]:
        """Row j: how many test images of experience j were predicted in each seen experience."""
        rows = []
        for j in range(num_experiences):
            counts = self.predicted.get(j)  # one count per experience of the protocol
            rows.append([int(c) for c in counts[:num_experiences]] if counts is not None else [0] * num_experiences)
        return rows


class ProgressBars(SupervisedPlugin, supports_distributed=True):
    """tqdm bars: one per experience's training (all epochs), one per evaluated experience."""

    def __init__(self, enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        self._bar: Any = None

    def _open(self, total: int, desc: str, leave: bool) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, leave=leave, dynamic_ncols=True, disable=not self.enabled,
                         unit="it")

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        exp = strategy.experience.current_experience
        self._open(len(strategy.dataloader) * strategy.train_epochs, f"exp {exp} train", leave=False)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if strategy.clock.train_epoch_iterations % 10 == 1:
                self._bar.set_postfix(epoch=strategy.clock.train_exp_epochs + 1,
                                      loss=f"{float(strategy.loss.detach()):.3f}", refresh=False)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._close()

    def before_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        exp = strategy.experience.current_experience
        self._open(len(strategy.dataloader), f"exp {exp} eval", leave=False)

    def after_eval_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def after_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._close()


def silent_evaluator() -> Any:
    """An EvaluationPlugin with no metrics and no loggers: the recorder above does the
    bookkeeping, so Avalanche's own metric names and iteration-based steps stay out."""
    from avalanche.training.plugins import EvaluationPlugin

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        return EvaluationPlugin(loggers=[])


class TextHeadInit(SupervisedPlugin, supports_distributed=True):
    """``backbone.head_init: text``: before each experience trains, the head rows of its new
    classes become ``scale * t_c``, the normalised text embedding of the class name times CLIP's
    logit scale, with a zero bias, so training starts from the zero-shot classifier."""

    def __init__(self, context: Any):
        super().__init__()
        self.context = context

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        from ..models.clip import set_text_rows

        labels = self.context.class_split.label_ranges()[strategy.experience.current_experience]
        set_text_rows(strategy.model, labels, self.context.text_embeddings(strategy.model.backbone, labels))

    def state_dict(self) -> dict[str, Any]:  # stateless: the rows come from the checkpointed model
        return {}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        pass
