"""Coil (Zhou et al. 2021, "Co-transport for class-incremental learning"), PILOT's ``coil``.

The whole network trains through PILOT's cosine classifier (a learnt scale sigma) on the
experience's data and the herding exemplar memory. Classes are tied to one another by optimal
transport between their prototypes (the mean of L2-normalised features, normalised again),
under a cost ``||p_i - p_j||_q`` (``cost_norm`` q) and Sinkhorn's entropic plan (``sinkhorn_reg``):

- **new rows from old ones.** Before experience t, the plan from the old classes' prototypes to
  the new classes' (the network as trained so far; the new classes' training images) maps the
  normalised old head rows onto new rows, ``n_old P^T W_old``, rescaled so that their mean norm is
  the old rows' (gamma). Those rows start the new classes, and in the first epoch the new logits
  are also distilled from them, weight ``new_branch_weight``.
- **old rows from new ones.** From the second epoch, every ``refresh_every`` iterations, the plan
  from the new prototypes (the network as it is now) to the old ones (the exemplars' prototypes)
  maps the new rows back, ``n_old gamma P^T W_new``; the teacher's soft old-class predictions are
  distilled into the features' cosine scores against those rows, weight
  ``old_branch_weight (epoch / epochs)^2``.

The loss: from the second experience, ``(old / seen) KD + (1 - old / seen) CE`` plus the
branch term, KD the cross-entropy of the previous model's softmax at ``temperature`` (no T^2);
in the first, the plain cross-entropy.

As PILOT's code, the plans are fitted between marginals of different mass (each class 1 / n_old
on both sides) for a fixed 1,000 Sinkhorn iterations, and the old-to-new prototypes are taken on
every training image of the old classes (``old_prototypes: all_data``; ``memory`` takes them on
the exemplars, within the memory budget). PILOT's ``calibration_term`` is never read: gamma
replaces it before its first use.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.nn import functional as F

from incremental.losses import soft_target_cross_entropy as distillation
from incremental.memory import extract_features
from incremental.models.net import frozen
from incremental.strategy import StrategyContext
from incremental.training.template import strategy_autocast

from .options import CoilConfig
from .pretrained import CosineIncrementalClassifier, experience_features
from .replay import ExemplarReplay

EPSILON = 1e-8  # PILOT's, in each feature's norm and in the new-to-old cost


@torch.no_grad()
def sinkhorn(source: torch.Tensor, target: torch.Tensor, cost: torch.Tensor, reg: float,
             iterations: int = 1000, tolerance: float = 1e-9) -> torch.Tensor:
    """The entropic transport plan ``diag(u) exp(-cost / reg) diag(v)`` by Sinkhorn-Knopp, as
    POT's ``ot.sinkhorn`` computes it (fp64; the right marginal checked every 10 iterations,
    stopping below ``tolerance``; a step that overflows is undone). ``source`` and ``target``
    need not have equal mass: the iterations then run to ``iterations``."""
    source, target, cost = source.double(), target.double(), cost.double()
    kernel = torch.exp(cost / -reg)
    scaled = kernel / source[:, None]
    u = torch.full_like(source, 1.0 / len(source))
    v = torch.full_like(target, 1.0 / len(target))
    for iteration in range(iterations):
        previous = (u, v)
        column = kernel.T @ u
        v = target / column
        u = 1.0 / (scaled @ v)
        if (column == 0).any() or not (torch.isfinite(u).all() and torch.isfinite(v).all()):
            u, v = previous
            break
        if iteration % 10 == 0 and torch.linalg.norm((u[:, None] * kernel * v).sum(0) - target) < tolerance:
            break
    return u[:, None] * kernel * v[None, :]


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, classes: range) -> torch.Tensor:
    """Per class of ``classes``: the mean of its L2-normalised features, normalised (PILOT's
    ``_extract_class_means``)."""
    unit = features / (features.norm(dim=1, keepdim=True) + EPSILON)
    means = torch.stack([unit[labels == c].mean(dim=0) for c in classes])
    return means / means.norm(dim=1, keepdim=True)


def transported_rows(plan: torch.Tensor, rows: torch.Tensor, n_old: int) -> torch.Tensor:
    """``n_old P^T normalise(rows)``: each target class's mix of the source classes' unit rows
    (the plan cast to the rows' fp32 first, as PILOT does)."""
    return plan.T.to(rows.dtype) @ F.normalize(rows, dim=1) * n_old


def rows_for_new_classes(old_prototypes: torch.Tensor, new_prototypes: torch.Tensor, old_rows: torch.Tensor,
                         config: CoilConfig) -> tuple[torch.Tensor, float]:
    """The new classes' head rows from the old ones (PILOT's ``solving_ot``), and gamma: the old
    rows' mean norm over the transported rows'."""
    n_old, n_new = len(old_prototypes), len(new_prototypes)
    cost = torch.cdist(old_prototypes.double(), new_prototypes.double(), p=config.cost_norm)
    plan = sinkhorn(torch.full((n_old,), 1.0 / n_old), torch.full((n_new,), 1.0 / n_old), cost,
                    config.sinkhorn_reg, config.sinkhorn_iterations)
    rows = transported_rows(plan, old_rows, n_old)
    gamma = float(old_rows.norm(dim=1).mean() / rows.norm(dim=1).mean())
    return rows * gamma, gamma


def rows_for_old_classes(new_prototypes: torch.Tensor, old_prototypes: torch.Tensor, new_rows: torch.Tensor,
                         gamma: float, config: CoilConfig) -> torch.Tensor:
    """The old classes' rows transported from the current new rows (PILOT's ``solving_ot_to_old``)."""
    n_old, n_new = len(old_prototypes), len(new_prototypes)
    cost = torch.cdist(new_prototypes.double(), old_prototypes.double(), p=config.cost_norm) + EPSILON
    plan = sinkhorn(torch.full((n_new,), 1.0 / n_old), torch.full((n_old,), 1.0 / n_old), cost,
                    config.sinkhorn_reg, config.sinkhorn_iterations)
    return transported_rows(plan, new_rows, n_old) * gamma


def cosine_scores(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The features' cosine with each row (no sigma): the logits of a transported head."""
    return F.linear(F.normalize(features, dim=1), F.normalize(rows, dim=1))


class FeatureKeepingCosineClassifier(CosineIncrementalClassifier):
    """PILOT's cosine classifier keeping its last training input, the pooled features the
    transport losses score (cleared by the strategy after each step)."""

    kept: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.training:
            self.kept = x
        return super().forward(x, **kwargs)


class Coil(ExemplarReplay):
    """Coil: replay, with the new and old head rows tied by optimal transport between class prototypes."""

    def __init__(self, config: CoilConfig, context: StrategyContext):
        super().__init__(config, context)
        context.require_memory("coil")
        self.teacher: torch.nn.Module | None = None
        self.gamma = 1.0
        self.new_branch: torch.Tensor | None = None  # rows transported to the new classes, fixed
        self.old_branch: torch.Tensor | None = None  # rows transported back, refreshed in training

    def prepare_model(self, model: Any) -> None:
        model.head = FeatureKeepingCosineClassifier(model.num_features, model.head.classifier.out_features)

    def classes(self, strategy: Any) -> range:
        return self.context.class_split.label_ranges()[strategy.experience.current_experience]

    def prototypes(self, strategy: Any, experiences: range, source: str) -> torch.Tensor:
        """Prototypes of the classes of ``experiences`` (in label order): from their training
        images (``all_data``) or from the exemplars (``memory``)."""
        ranges = self.context.class_split.label_ranges()
        classes = range(ranges[experiences.start].start, ranges[experiences.stop - 1].stop)
        if source == "memory":
            memory = self.memory.dataset(self.context.train_dataset)
            features = extract_features(strategy.model, memory, batch_size=strategy.eval_mb_size,
                                        device=strategy.device, engine=getattr(strategy, "engine", None))
            return class_prototypes(features, torch.as_tensor(list(memory.targets)), classes)
        parts = [experience_features(strategy, e, self.context) for e in experiences]
        return class_prototypes(torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts]), classes)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        t, seen = strategy.experience.current_experience, self.classes(strategy)
        self.old_branch = None
        if t == 0:
            self.new_branch = None
            return
        head = strategy.model.head.classifier
        old_prototypes = self.prototypes(strategy, range(t), self.config.old_prototypes)
        new_prototypes = self.prototypes(strategy, range(t, t + 1), "all_data")
        with torch.no_grad():
            rows, self.gamma = rows_for_new_classes(old_prototypes, new_prototypes, head.weight[: seen.start].float(),
                                                    self.config)
            head.weight[seen.start: seen.stop] = rows.to(head.weight.dtype)
        self.new_branch = rows.to(strategy.device)

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        """From the second epoch, the old rows transported back every ``refresh_every`` steps."""
        clock = strategy.clock
        t = strategy.experience.current_experience
        if t == 0 or clock.train_exp_epochs < 1 or clock.train_epoch_iterations % self.config.refresh_every:
            return
        old_prototypes = self.prototypes(strategy, range(t), "memory")
        new_prototypes = self.prototypes(strategy, range(t, t + 1), "all_data")
        seen = self.classes(strategy)
        with torch.no_grad():
            new_rows = strategy.model.head.classifier.weight[seen.start: seen.stop].float()
            self.old_branch = rows_for_old_classes(new_prototypes, old_prototypes, new_rows, self.gamma, self.config)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        head = strategy.model.head
        features, head.kept = head.kept, None
        if self.teacher is None or features is None:
            return
        seen = self.classes(strategy)
        old = seen.start
        logits = strategy.mb_output
        with torch.no_grad(), strategy_autocast(strategy):
            teacher_logits = self.teacher(strategy.mb_x)[:, :old].float()
        kd = distillation(logits[:, :old], teacher_logits, self.config.temperature)
        share = old / seen.stop
        loss = share * kd + (1 - share) * strategy.loss
        epoch, temperature = strategy.clock.train_exp_epochs, self.config.temperature
        if epoch < 1:  # the new logits distilled from the rows transported to them
            branch = distillation(logits[:, old: seen.stop], cosine_scores(features.float(), self.new_branch),
                                  temperature)
            loss = loss + self.config.new_branch_weight * branch
        elif self.old_branch is not None:  # the teacher distilled into the rows transported back
            branch = distillation(cosine_scores(features.float(), self.old_branch), teacher_logits, temperature)
            loss = loss + self.config.old_branch_weight * (epoch / strategy.train_epochs) ** 2 * branch
        strategy.loss = loss

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        super().after_training_exp(strategy, **kwargs)
        strategy.model.head.kept = None
        self.teacher = frozen(copy.deepcopy(strategy.model))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "has_teacher": self.teacher is not None, "gamma": self.gamma}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        super().load_state_dict(state, model)
        self.gamma = float(state["gamma"])
        self.teacher = frozen(copy.deepcopy(model)) if state["has_teacher"] else None
