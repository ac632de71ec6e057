"""What the methods that start from a pre-trained ViT share: class prototypes kept in the model's
output adapter, features of an experience's training images, and first-session-only training."""

from __future__ import annotations

import math
from typing import Any

import torch
from avalanche.models import IncrementalClassifier
from torch import nn
from torch.nn import functional as F

from incremental.memory import extract_features
from incremental.models.net import PrototypeOutput
from incremental.models.peft import apply_tuning, vision_transformer
from incremental.strategy import StrategyPlugin
from incremental.timing import phase


def experience_features(strategy: Any, experience: int, context: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (eval transforms, eval mode, fp32) and labels of experience ``experience``'s
    training images."""
    data = context.train_dataset(experience)

    def compute() -> torch.Tensor:
        return extract_features(strategy.model, data, batch_size=strategy.eval_mb_size, device=strategy.device,
                                engine=getattr(strategy, "engine", None))

    cache = getattr(strategy, "feature_cache", None)  # the run's FeatureCache (not on a plain template)
    key = ("train", experience, len(data))
    with phase(strategy, "feature_pass"):
        features = compute() if cache is None else cache.features(key, strategy.model, compute)
    return features, torch.as_tensor(list(data.targets))


def class_means(features: torch.Tensor, labels: torch.Tensor) -> dict[int, torch.Tensor]:
    """The mean feature of each label present."""
    return {int(c): features[labels == c].mean(dim=0) for c in labels.unique()}


def set_prototypes(model: nn.Module, means: dict[int, torch.Tensor], metric: str) -> None:
    """Put ``means`` (label -> prototype) into the model's prototype classifier, growing it to
    the largest label; rows of classes not given stay as they were (zeros if new)."""
    width = next(iter(means.values())).numel()
    old = model.output_adapter.prototypes if isinstance(model.output_adapter, PrototypeOutput) else None
    rows = max(max(means) + 1, 0 if old is None else len(old))
    prototypes = torch.zeros(rows, width, device=next(model.parameters()).device)
    if old is not None:
        prototypes[: len(old)] = old
    for label, mean in means.items():
        prototypes[label] = mean.to(prototypes.device)
    model.output_adapter = PrototypeOutput(prototypes, metric)


def loss_on_current_classes(strategy: Any, context: Any) -> None:
    """The training loss sees the current experience's classes only (PILOT's L2P, DualPrompt,
    CODA-Prompt, SLCA and EASE; an ``after_forward``): the template's loss takes the logits from
    the experience's first class on, with the labels shifted to match, as PILOT's SLCA and EASE
    slice them. For plain cross-entropy that is the loss of L2P's -inf masking of the older
    logits; with label smoothing it stays finite, where -inf logits make it infinite."""
    strategy.loss_classes_from = context.class_split.label_ranges()[strategy.experience.current_experience].start


@torch.no_grad()
def init_head_rows(classifier: torch.nn.Linear, labels: range) -> None:
    """The rows of ``labels`` as timm initialises a ViT's head (PILOT's L2P, DualPrompt and SLCA
    heads start so): weights from N(0, 0.02) truncated at +-2 (absolute, as timm's
    trunc_normal_), zero bias. The head has grown to these classes already (Avalanche's model
    adaptation)."""
    torch.nn.init.trunc_normal_(classifier.weight[labels.start:labels.stop], std=0.02)
    if classifier.bias is not None:
        classifier.bias[labels.start:labels.stop] = 0.0


@torch.no_grad()
def init_rows_kaiming(classifier: torch.nn.Linear, labels: range) -> None:
    """The rows of ``labels`` as PILOT's SimpleLinear draws a head (LAE's, DGR's): Kaiming-uniform
    for a linear layer (bound sqrt(3 / d)), zero bias."""
    nn.init.kaiming_uniform_(classifier.weight[labels.start:labels.stop], nonlinearity="linear")
    if classifier.bias is not None:
        classifier.bias[labels.start:labels.stop] = 0.0


@torch.no_grad()
def grow_head(classifier: nn.Linear, old: range, new: range, width: int, sets_used: int) -> None:
    """PILOT's ``update_fc`` of an expanding network (MEMO's, DER's, FOSTER's) on the first
    ``sets_used x width`` columns: the old rows keep their weights on the earlier sets' columns
    and bias; the old rows' new set columns and the new rows are drawn as ``SimpleLinear`` draws a
    fresh layer of that width (Kaiming-uniform for a linear layer, bound sqrt(3 / fan_in)), the
    new biases 0; columns of unused sets are 0."""
    used = sets_used * width
    bound = math.sqrt(3.0 / used)
    weight = classifier.weight
    weight[new.start:new.stop, :used].uniform_(-bound, bound)
    weight[old.start:old.stop, used - width:used].uniform_(-bound, bound)
    weight[old.start:new.stop, used:] = 0.0
    classifier.bias[new.start:new.stop] = 0.0


def replace_head(model: nn.Module, num_features: int) -> None:
    """A fresh growing classifier for a backbone whose feature width the strategy changed."""
    from avalanche.models import IncrementalClassifier

    model.head = IncrementalClassifier(num_features, initial_out_features=model.head.classifier.out_features)
    model.num_features = num_features


class CosineIncrementalClassifier(IncrementalClassifier):
    """Avalanche's growing classifier, scoring ``sigma cos(x[:, columns], w_c)``: PILOT's
    CosineLinear (rows uniform in +-1/sqrt(d) as nn.Linear draws them, no bias, a learnt scale
    sigma from 1), which its APER and RanPAC train in the first session and EASE per adapter set.
    ``columns`` picks the features it sees (APER's adapted half, EASE's current block). Unseen
    classes are masked as Avalanche masks them."""

    def __init__(self, in_features: int, initial_out_features: int, columns: slice = slice(None)):
        super().__init__(len(range(in_features)[columns]), initial_out_features=initial_out_features)
        self.columns = columns
        self.sigma = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        pooled = F.normalize(x[:, self.columns], dim=1)
        out = self.sigma * F.linear(pooled, F.normalize(self.classifier.weight, dim=1))
        if self.masking:
            out = out.masked_fill(mask=torch.logical_not(self.active_units), value=self.mask_value)
        return out


class SharedHeadClassifier(IncrementalClassifier):
    """Avalanche's growing linear classifier applied alike to each ``d``-wide member of its input
    (``d`` its input width): (B, k d) gives (B, k C), one block of class scores per member, for an
    output adapter to combine (LAE's online and offline networks, MOS's adapter sets); one member
    gives the plain logits, as training sees them."""

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        width = self.classifier.in_features
        members = x.shape[1] // width
        logits = super().forward(x.reshape(len(x) * members, width), **kwargs)
        return logits.reshape(len(x), -1)


def use_training_head(model: nn.Module, kind: str, columns: slice = slice(None)) -> None:
    """The head a strategy trains with (APER's and RanPAC's first session, EASE's adapters):
    ``cosine`` (PILOT's, over ``columns`` of the features) or ``linear`` (Avalanche's over all
    of them, as the model was built)."""
    if kind == "cosine":
        model.head = CosineIncrementalClassifier(model.num_features, model.head.classifier.out_features, columns)


class FirstSessionTraining(StrategyPlugin):
    """Trains in the first experience only (``tune_epochs`` of it), then adds classes without
    gradient steps (APER, RanPAC, FeCAM, ACIL): later experiences run zero epochs."""

    def prepare_model(self, model: Any) -> None:
        """The config's ``tuning`` on the ViT (or Swin), trained through its ``first_session_head``."""
        apply_tuning(vision_transformer(model.backbone, swin=True), self.config.tuning)
        if self.config.tuning.name != "frozen":  # a head nothing trains would only draw random numbers
            use_training_head(model, self.config.first_session_head)

    def tune_epochs(self) -> int:
        training = self.context.config.training
        configured = getattr(self.config, "tune_epochs", None)
        return configured if configured is not None else (training.initial_epochs or training.epochs)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        first = strategy.experience.current_experience == 0
        trains = first and any(p.requires_grad for p in strategy.model.backbone.parameters())
        strategy.train_epochs = self.tune_epochs() if trains else 0
