"""The runner's own Avalanche plugins: optimisation, evaluation records, progress bars."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from .config import OptimizerConfig, SchedulerConfig, TrainingConfig
from .errors import UserError


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


# ``hook(model, groups) -> groups``: how a strategy changes the parameter groups (e.g. the
# head's LR); applied whenever an optimizer is built.
GroupHook = Callable[[nn.Module, list[dict[str, Any]]], list[dict[str, Any]]]


LOSS_CHECK_EVERY = 50  # training steps between reads of the loss (a host sync on a GPU)


def check_finite(loss: float, what: str, when: str, key: str) -> None:
    """Stop with a one-line error naming the LR key when the loss is NaN or infinite."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"the {what} became {loss} {when}; lower the learning rate", key=key)


def scale_lrs(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's LR to its ``base_lr`` (see make_optimizer) times ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


# --------------------------------------------------------------------------- optimiser


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups, as timm does: no weight decay on biases, norms and the tokens/embeddings
    the model names in ``no_weight_decay()``."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def head_param_groups(lr_scale: float, weight_decay: float | None = None) -> GroupHook:
    """A group hook that moves the classifier (parameters named ``head.*``) into its own groups,
    at ``lr_scale`` times the base LR and, if given, its own weight decay on the weights.

    Run at every experience on the grown head, so new output units join the head groups.
    """

    def hook(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        head_ids = {id(p) for name, p in model.named_parameters() if name.startswith("head.")}
        body, head = [], []
        for group in groups:
            kept = [p for p in group["params"] if id(p) not in head_ids]
            moved = [p for p in group["params"] if id(p) in head_ids]
            if kept:
                body.append({**group, "params": kept})
            if moved:
                decay = group["weight_decay"]
                if weight_decay is not None and decay > 0:  # biases keep no decay
                    decay = weight_decay
                head.append({**group, "params": moved, "weight_decay": decay, "name": f"head_{group['name']}",
                             "lr_scale": group.get("lr_scale", 1.0) * lr_scale})
        return body + head

    return hook


def make_optimizer(groups: list[dict[str, Any]], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    if not groups:  # nothing trains (SimpleCIL, or after a first-session adaptation): an idle optimizer
        groups = [{"params": [torch.zeros(1, requires_grad=True)], "weight_decay": 0.0, "name": "idle"}]
    for group in groups:
        group["base_lr"] = lr * group.get("lr_scale", 1.0)
        group["lr"] = group["base_lr"]
    # One fused kernel for the whole update on a GPU, rather than a few per parameter tensor.
    fused = {"fused": True} if all(p.is_cuda and p.is_floating_point() for g in groups for p in g["params"]) else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, **fused)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=lr, **fused)
    return torch.optim.AdamW(groups, lr=lr, **fused)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float,
                    group_hooks: Sequence[GroupHook] = ()) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters, after each hook has adjusted the groups."""
    groups = param_groups(model, cfg.weight_decay)
    for hook in group_hooks:
        groups = hook(model, groups)
    return make_optimizer(groups, cfg, lr)


def lr_factor(cfg: SchedulerConfig, *, iteration: int, iters_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base LR at ``iteration`` (0-based, counted within the experience)."""
    total = max(1, iters_per_epoch * epochs)
    warmup = cfg.warmup_epochs * iters_per_epoch
    if iteration < warmup:
        return (iteration + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        epoch = iteration // max(1, iters_per_epoch)
        return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    progress = (iteration - warmup) / max(1, total - warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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
        lr = self.cfg.optimizer.initial_lr if (first and self.cfg.optimizer.initial_lr) else self.cfg.optimizer.lr
        strategy.optimizer = build_optimizer(strategy.model, self.cfg.optimizer, lr, self.group_hooks)
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

    def after_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        exp = strategy.experience.current_experience
        if exp in self._hits:
            self.correct[exp] = int(self._hits.pop(exp))
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
        from .distributed import sum_tensor

        dist = getattr(strategy, "dist", None)
        if dist is None or not dist.enabled:
            return
        n = self.num_experiences or 1 + max(self.total, default=0)
        device = strategy.device
        correct = torch.tensor([self.correct.get(j, 0) for j in range(n)], device=device)
        total = torch.tensor([self.total.get(j, 0) for j in range(n)], device=device)
        predicted = torch.stack([torch.as_tensor(self.predicted.get(j, torch.zeros(n, dtype=torch.long)),
                                                 dtype=torch.long).reshape(-1)[:n] for j in range(n)]).to(device)
        for counts in (correct, total, predicted):
            sum_tensor(counts, dist)
        seen = [j for j in range(n) if total[j] > 0]
        self.correct = {j: int(correct[j]) for j in seen}
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
        from .distributed import sum_tensor

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
        from .models.clip import set_text_rows

        labels = self.context.class_split.label_ranges()[strategy.experience.current_experience]
        set_text_rows(strategy.model, labels, self.context.text_embeddings(strategy.model.backbone, labels))

    def state_dict(self) -> dict[str, Any]:  # stateless: the rows come from the checkpointed model
        return {}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        pass
