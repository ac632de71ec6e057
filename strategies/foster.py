"""FOSTER (Wang et al. 2022, "FOSTER: feature boosting and compression for class-incremental
learning"), as PILOT's ``foster`` runs it on a pre-trained ViT.

The first experience trains the ViT and a linear head on cross-entropy. Each later experience:

- **boosting.** The network is two ViTs: the old one (the previous experience's compressed
  student; after the first experience, its network), frozen, and a copy of it that trains. The
  head reads both pooled features, grown as PILOT's ``FOSTERNet.update_fc`` grows it (the old
  classes' weights on the old features are the old head's; the rest drawn afresh). The loss:
  ``CE(logits / w, y) + CE(fe_logits, y) + kd_weight KD(logits_old, old_logits, T)``, with
  ``fe_logits`` a head on the new ViT's features alone, ``old_logits`` the old head on the old
  features, KD PyCIL's soft-target cross-entropy, and ``w`` the class-balanced weights of Cui et
  al. (``(1 - beta) / (1 - beta^n_c)``, normalised to sum to the number of classes; ``beta_boosting``),
  n_c a class's images in the experience's data with the exemplars.
- **compression.** A student, the old ViT and a head whose old rows are the old head's, learns
  the boosted network's logits by class-balanced distillation (the teacher's softmax at T times
  ``w`` with ``beta_compression``, renormalised) for ``compression_epochs`` on the same data, SGD
  without weight decay and a cosine stepped once an epoch. The student starts the next experience.

As in PILOT, the accuracy after an experience, and the exemplars herding picks, are the boosted
network's (two ViTs); the student is what carries on. PILOT's ``oofc: az``, teacher and student
weight alignment (``is_teacher_wa``, ``is_student_wa``: false in its exps) are not implemented.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from incremental.config import OptimizerConfig, SchedulerConfig
from incremental.losses import soft_target_cross_entropy
from incremental.models.peft import vision_transformer
from incremental.strategy import StrategyContext
from incremental.timing import phase
from incremental.training.optim import build_optimizer, check_finite, lr_factor
from incremental.training.template import strategy_autocast

from .options import FOSTERConfig
from .pretrained import grow_head, init_rows_kaiming, replace_head
from .replay import ExemplarReplay


def class_balanced_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Cui et al.'s ``(1 - beta) / (1 - beta^n)`` per class, normalised to sum to the number of
    classes (PILOT's ``per_cls_weights``)."""
    weights = (1.0 - beta) / (1.0 - torch.pow(beta, counts.double()))
    return (weights / weights.sum() * len(counts)).float()


def balanced_distillation(logits: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """PILOT's BKD: the teacher's softmax at T times ``weights``, renormalised, as the target of
    the student's log-softmax at T; batch mean."""
    soft = teacher.div(temperature).softmax(dim=1) * weights
    soft = soft / soft.sum(dim=1, keepdim=True)
    return -(soft * logits.div(temperature).log_softmax(dim=1)).sum(dim=1).mean()


class BoostingViT(nn.Module):
    """FOSTER's two ViTs, ``old`` (0) and ``new`` (1), their pooled features concatenated
    (``2 x dim``; in the first experience only the old slot runs, the new one's features are 0);
    with the feature-enhancement head on the new features and the old head on the old."""

    def __init__(self, vit: nn.Module, classes: int):
        super().__init__()
        self.slots = nn.ModuleList([vit, copy.deepcopy(vit)])
        self.dim = int(vit.num_features)
        self.num_features = 2 * self.dim
        self.fe_head = nn.Linear(self.dim, classes)
        self.old_head = nn.Linear(self.dim, classes)
        self.register_buffer("boosting", torch.tensor(False))
        self.kept: torch.Tensor | None = None  # the old ViT's features, in training
        # the feature-enhancement logits of a boosting forward, computed there so that DDP sees
        # fe_head's parameters used
        self.aux_outputs: tuple[torch.Tensor] | None = None

    def slot_features(self, x: torch.Tensor, index: int) -> torch.Tensor:
        vit = self.slots[index]
        return vit.forward_head(vit.forward_features(x), pre_logits=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        old = self.slot_features(x, 0)
        boosting = bool(self.boosting)
        new = self.slot_features(x, 1) if boosting else torch.zeros_like(old)
        if self.training and boosting:
            self.kept, self.aux_outputs = old, (self.fe_head(new),)
        return torch.cat([old, new], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x

    def train(self, mode: bool = True) -> "BoostingViT":
        """The frozen old ViT stays in eval mode while boosting, as PILOT's ``train()`` keeps it."""
        super().train(mode)
        if mode and bool(self.boosting):
            self.slots[0].eval()
        return self


class Student(nn.Module):
    """The compressed network: one ViT and a linear head over its pooled features."""

    def __init__(self, vit: nn.Module, head: nn.Linear):
        super().__init__()
        self.vit, self.head = vit, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit.forward_head(self.vit.forward_features(x), pre_logits=True))


class FOSTER(ExemplarReplay):
    """FOSTER: feature boosting with a second ViT, then compression into one by balanced KD."""

    def __init__(self, config: FOSTERConfig, context: StrategyContext):
        super().__init__(config, context)
        context.require_memory("foster")
        self.student: Student | None = None
        self.weights: torch.Tensor | None = None

    def prepare_model(self, model: Any) -> None:
        classes = sum(self.context.class_split.classes_per_experience)
        model.backbone = BoostingViT(vision_transformer(model.backbone), classes)
        replace_head(model, model.backbone.num_features)

    def class_weights(self, strategy: Any, beta: float) -> torch.Tensor:
        seen = self.context.class_split.label_ranges()[strategy.experience.current_experience].stop
        counts = torch.bincount(torch.as_tensor(list(strategy.adapted_dataset.targets)), minlength=seen)
        return class_balanced_weights(counts[:seen], beta).to(strategy.device)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        t = strategy.experience.current_experience
        backbone, head = strategy.model.backbone, strategy.model.head.classifier
        ranges = self.context.class_split.label_ranges()
        backbone.boosting.fill_(t > 0)
        with torch.no_grad():
            if t == 0:
                grow_head(head, range(0, 0), ranges[0], backbone.dim, 1)
            else:
                self.start_boosting(backbone, head, range(0, ranges[t].start), ranges[t])
        backbone.slots[0].requires_grad_(t == 0)
        backbone.slots[1].requires_grad_(t > 0)
        backbone.fe_head.requires_grad_(t > 0)
        backbone.old_head.requires_grad_(False)
        self.weights = self.class_weights(strategy, self.config.beta_boosting) if t else None

    def start_boosting(self, backbone: BoostingViT, head: nn.Linear, old: range, new: range) -> None:
        """The student (or the first experience's network) into the old slot and, as a copy, the
        new; the head grown from its head (see the module's note); fresh feature-enhancement rows."""
        student = self.student
        backbone.slots[0].load_state_dict(student.vit.state_dict())
        backbone.slots[1].load_state_dict(student.vit.state_dict())
        grow_head(head, old, new, backbone.dim, 2)
        head.weight[: old.stop, : backbone.dim] = student.head.weight[: old.stop]
        head.bias[: old.stop] = student.head.bias[: old.stop]
        backbone.old_head.weight.zero_()
        backbone.old_head.bias.zero_()
        backbone.old_head.weight[: old.stop] = student.head.weight[: old.stop]
        backbone.old_head.bias[: old.stop] = student.head.bias[: old.stop]
        init_rows_kaiming(backbone.fe_head, range(backbone.fe_head.out_features))

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        backbone = strategy.model.backbone
        old_features, outputs = backbone.kept, backbone.aux_outputs
        backbone.kept, backbone.aux_outputs = None, None
        ranges = self.context.class_split.label_ranges()
        t = strategy.experience.current_experience
        if t == 0 or outputs is None:
            return
        old, seen = ranges[t].start, ranges[t].stop
        logits, labels = strategy.mb_output[:, :seen], strategy.mb_y
        clf = F.cross_entropy(logits / self.weights, labels)
        fe = F.cross_entropy(outputs[0].float()[:, :seen], labels)
        with torch.no_grad():
            old_logits = backbone.old_head(old_features.float())[:, :old]
        kd = soft_target_cross_entropy(logits[:, :old], old_logits, self.config.temperature)
        strategy.loss = clf + fe + self.config.kd_weight * kd

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        t = strategy.experience.current_experience
        strategy.model.backbone.kept = strategy.model.backbone.aux_outputs = None
        if t == 0:
            self.student = self.first_network(strategy)
        else:
            with phase(strategy, "compression"):
                self.student = self.compress(strategy)
        super().after_training_exp(strategy, **kwargs)  # herding on the boosted network, as PILOT's

    def first_network(self, strategy: Any) -> Student:
        """The first experience's network as the student the second starts from."""
        backbone, head = strategy.model.backbone, strategy.model.head.classifier
        seen = self.context.class_split.label_ranges()[0].stop
        linear = nn.Linear(backbone.dim, seen).to(strategy.device)
        with torch.no_grad():
            linear.weight.copy_(head.weight[:seen, : backbone.dim])
            linear.bias.copy_(head.bias[:seen])
        return Student(copy.deepcopy(backbone.slots[0]), linear)

    def compress(self, strategy: Any) -> Student:
        """PILOT's ``_feature_compression``: the old ViT and a head with the old head's rows,
        trained by balanced distillation from the boosted network."""
        model, backbone = strategy.model, strategy.model.backbone
        ranges = self.context.class_split.label_ranges()
        t = strategy.experience.current_experience
        old, seen = ranges[t].start, ranges[t].stop
        head = nn.Linear(backbone.dim, seen).to(strategy.device)
        init_rows_kaiming(head, range(seen))
        with torch.no_grad():
            head.weight[:old] = backbone.old_head.weight[:old]
            head.bias[:old] = backbone.old_head.bias[:old]
        student = Student(copy.deepcopy(backbone.slots[0]).requires_grad_(True), head).train()
        weights = self.class_weights(strategy, self.config.beta_compression)
        model.eval()
        return self.fit_student(strategy, student, weights, seen)

    def fit_student(self, strategy: Any, student: Student, weights: torch.Tensor, seen: int) -> Student:
        training = self.context.config.training
        epochs, engine = self.config.compression_epochs, strategy.engine
        lr = self.config.compression_lr or training.optimizer.lr
        optimizer = build_optimizer(student, OptimizerConfig(name="sgd", lr=lr, momentum=training.optimizer.momentum,
                                                            weight_decay=self.config.compression_weight_decay,
                                                            weight_decay_on="all"), lr)
        schedule = SchedulerConfig(name="epoch_cosine")
        seed = self.context.config.seed + strategy.experience.current_experience  # its own shuffles
        batches = engine.batches(strategy.adapted_dataset, batch_size=training.batch_size, shuffle=True,
                                 drop_last=False, seed=seed)

        def loss(forward: Any, batch: Any) -> torch.Tensor:
            with torch.no_grad(), strategy_autocast(strategy):
                teacher = strategy.model(batch[0])[:, :seen].float()
            return balanced_distillation(forward(batch[0]).float(), teacher, weights, self.config.temperature)

        def check(value: float, when: str) -> None:
            check_finite(value, "compression loss", when, key="strategy.compression_lr")

        engine.fit(student, batches, optimizer, epochs=epochs, loss=loss, check=check, desc="compression",
                   lr_factor=lambda i, steps: lr_factor(schedule, iteration=i, iters_per_epoch=steps, epochs=epochs))
        return student.eval()

    def state_dict(self) -> dict[str, Any]:
        student = None if self.student is None else {k: v.detach().cpu() for k, v in self.student.state_dict().items()}
        return {**super().state_dict(), "student": student}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        super().load_state_dict(state, model)
        saved = state.get("student")
        if saved is None:
            self.student = None
            return
        backbone = model.backbone
        rows = saved["head.weight"].shape[0]
        self.student = Student(copy.deepcopy(backbone.slots[0]), nn.Linear(backbone.dim, rows))
        self.student.load_state_dict(saved)
        self.student.to(next(model.parameters()).device).eval()
