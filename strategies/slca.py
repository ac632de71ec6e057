"""SLCA (Zhang et al. 2023, "SLCA: slow learner with classifier alignment"), PILOT's ``slca``.

Slow learner: the whole pre-trained ViT trains at ``backbone_lr_scale`` (1/100) of the head's
LR, on the current experience's classes only (a softmax over them: older classes' logits are
masked out of the loss). Classifier alignment: after each experience every class seen so far is
a Gaussian of its features (mean, and covariance + 1e-4 I, from its training images when its
experience ended); from the second experience on, ``ca_epochs`` epochs train the head alone on
``ca_samples_per_class`` features drawn per class from those Gaussians, with SLCA's logit
normalisation (logits divided by the mean per-experience logit norm, over ``ca_logit_norm``).
The means are drawn at ``(0.9 + 0.1 (t + 1) / (T + 1))`` times their value, t the class's
experience and T the current one, as the reference does.

As PILOT runs it: each experience's head rows start as timm's (``head_init``); the slow learner
leaves the older classes' rows as they were (``freeze_old_heads``); the aligned head classifies
until the next experience starts, which begins from the head as it was before alignment
(``head_after_alignment: restore``, PILOT's ``fc.backup()`` and ``fc.recall()``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from incremental.strategy import StrategyContext, StrategyPlugin

from .options import SLCAConfig
from .pretrained import experience_features, init_head_rows, loss_on_current_classes


def backbone_lr_hook(scale: float) -> Any:
    """Parameter groups: the backbone's at ``scale`` times the LR (the head keeps it)."""

    def hook(model: Any, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        backbone = {id(p) for p in model.backbone.parameters()}
        out = []
        for group in groups:
            slow = [p for p in group["params"] if id(p) in backbone]
            fast = [p for p in group["params"] if id(p) not in backbone]
            if slow:
                out.append({**group, "params": slow, "name": f"backbone_{group['name']}",
                            "lr_scale": group.get("lr_scale", 1.0) * scale})
            if fast:
                out.append({**group, "params": fast})
        return out

    return hook


def alignment_samples(means: torch.Tensor, covariances: torch.Tensor, class_experience: list[int], current: int,
                      per_class: int, generator: torch.Generator | None = None,
                      scale_means: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` features of every class from its Gaussian (with ``scale_means``, the mean
    scaled as SLCA does), and their labels, shuffled."""
    features, labels = [], []
    for label in range(len(means)):
        mean = means[label] * (0.9 + 0.1 * (class_experience[label] + 1) / (current + 1)) if scale_means else means[label]
        normal = torch.distributions.MultivariateNormal(mean.float(), covariance_matrix=covariances[label].float())
        features.append(normal.sample((per_class,)))
        labels += [label] * per_class
    features, labels = torch.cat(features), torch.tensor(labels)
    order = torch.randperm(len(labels), generator=generator)
    return features[order], labels[order]


def class_gaussians(features: torch.Tensor, labels: torch.Tensor, means: torch.Tensor | None,
                    covariances: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and covariance (+ 1e-4 I, fp64) of each label's ``features``, over the earlier
    ``means`` and ``covariances`` (classes absent here keep theirs), grown to the largest label."""
    features = features.double()
    width, seen = features.shape[1], int(labels.max()) + 1
    grown_means = torch.zeros(seen, width, dtype=torch.float64)
    grown_covariances = torch.zeros(seen, width, width, dtype=torch.float64)
    if means is not None:
        grown_means[: len(means)], grown_covariances[: len(covariances)] = means, covariances
    for label in labels.unique().tolist():
        own = features[labels == label]
        grown_means[label] = own.mean(dim=0)
        grown_covariances[label] = torch.cov(own.T) + 1e-4 * torch.eye(width, dtype=torch.float64)
    return grown_means, grown_covariances


def align_head(head: torch.nn.Module, means: torch.Tensor, covariances: torch.Tensor, ranges: list[range], *,
               epochs: int, per_class: int, lr: float, weight_decay: float, device: Any,
               logit_norm: float | None = None, scale_means: bool = True) -> None:
    """Classifier alignment: ``head`` alone, SGD (momentum 0.9) with a cosine over ``epochs``,
    each epoch on ``per_class`` features a class drawn afresh from the class Gaussians, in
    batches of ``per_class``; with ``logit_norm``, SLCA's logits over the mean per-experience
    logit norm. ``ranges``: the label ranges of the experiences seen."""
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    class_experience = [e for e, r in enumerate(ranges) for _ in r]
    for _ in range(epochs):
        features, labels = alignment_samples(means, covariances, class_experience, len(ranges) - 1, per_class,
                                             scale_means=scale_means)
        features, labels = features.to(device), labels.to(device)
        for start in range(0, len(labels), per_class):
            logits = head(features[start:start + per_class])[:, : len(means)]
            target = labels[start:start + per_class]
            if logit_norm is not None:
                norms = torch.stack([logits[:, r.start:r.stop].norm(dim=1) + 1e-7 for r in ranges], 1).mean(1)
                logits = logits / norms.unsqueeze(1) / logit_norm
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()


class SLCA(StrategyPlugin):
    """SLCA: a slow backbone, a fast head, and classifier alignment from class Gaussians."""

    def __init__(self, config: SLCAConfig, context: StrategyContext):
        super().__init__(config, context)
        if config.backbone_lr_scale > 0:
            context.param_group_hooks.append(backbone_lr_hook(config.backbone_lr_scale))
        self.means: torch.Tensor | None = None  # (classes, d)
        self.covariances: torch.Tensor | None = None  # (classes, d, d)
        self.unaligned: dict[str, torch.Tensor] | None = None  # the head before the last alignment
        self._old_rows: tuple[int, dict[str, torch.Tensor]] | None = None  # frozen during the slow learner

    def prepare_model(self, model: Any) -> None:
        if self.config.backbone_lr_scale == 0:
            for p in model.backbone.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        classifier = strategy.model.head.classifier
        labels = self.context.class_split.label_ranges()[strategy.experience.current_experience]
        if self.config.head_after_alignment == "restore" and self.unaligned is not None:
            for name, rows in self.unaligned.items():  # the older classes' rows as before alignment
                getattr(classifier, name)[: len(rows)] = rows.to(getattr(classifier, name))
        if self.config.head_init == "trunc_normal":
            init_head_rows(classifier, labels)
        self._old_rows = None
        if self.config.freeze_old_heads and labels.start:
            self._old_rows = (labels.start, {name: getattr(classifier, name)[: labels.start].clone()
                                             for name in ("weight", "bias") if getattr(classifier, name) is not None})

    @torch.no_grad()
    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self._old_rows is not None:  # undo what weight decay and momentum did to the old rows
            count, rows = self._old_rows
            classifier = strategy.model.head.classifier
            for name, saved in rows.items():
                getattr(classifier, name)[:count] = saved

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        loss_on_current_classes(strategy, self.context)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._old_rows = None
        self.keep_unaligned_head(strategy)
        experience = strategy.experience.current_experience
        self.update_gaussians(strategy, experience)
        if experience > 0 and self.config.ca_epochs > 0:
            self.align(strategy, experience)

    def keep_unaligned_head(self, strategy: Any) -> None:
        """The head as training left it: the next experience starts from it (``restore``)."""
        classifier = strategy.model.head.classifier
        self.unaligned = {name: getattr(classifier, name).detach().clone()
                          for name in ("weight", "bias") if getattr(classifier, name) is not None}

    def update_gaussians(self, strategy: Any, experience: int) -> None:
        """Each class of ``experience``: the mean and covariance (+ 1e-4 I, fp64) of its training
        images' features under the network as it is now; older classes keep theirs."""
        features, labels = experience_features(strategy, experience, self.context)
        self.means, self.covariances = class_gaussians(features, labels, self.means, self.covariances)

    def align(self, strategy: Any, experience: int) -> None:
        """Classifier alignment: the head alone, on features drawn from the class Gaussians."""
        training = self.context.config.training
        was_training = strategy.model.training
        strategy.model.eval()
        align_head(strategy.model.head, self.means, self.covariances,
                   self.context.class_split.label_ranges()[: experience + 1], epochs=self.config.ca_epochs,
                   per_class=self.config.ca_samples_per_class, lr=training.optimizer.lr,
                   weight_decay=training.optimizer.weight_decay, device=strategy.device,
                   logit_norm=self.config.ca_logit_norm)
        strategy.model.train(was_training)

    def state_dict(self) -> dict[str, Any]:
        return {"means": self.means, "covariances": self.covariances, "unaligned": self.unaligned}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        self.means, self.covariances = state["means"], state["covariances"]
        self.unaligned = state.get("unaligned")
