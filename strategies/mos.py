"""MOS (Sun et al. 2025, "MOS: model surgery for pre-trained model-based class-incremental
learning"), PILOT's ``mos``.

A frozen pre-trained ViT with one set of AdaptFormer adapters per experience. Experience t:

- set t starts from set t-1 as trained (PILOT carries its ``cur_adapter`` over) and alone trains,
  with the head at ``head_lr_scale`` of the LR, on the current classes' cross-entropy plus
  ``orth_weight`` x an orthogonality loss: the cross-entropy of ``M M^T / orth_temperature``
  against the identity, ``M`` the older classes' mean features stacked on the batch's features;
- adapter merging (t > 0): set t is pulled towards the mean of sets 0..t-1,
  ``A_t <- (1 - m) A_t + m mean(A_0..A_{t-1})`` (``adapter_momentum`` m). ``merge: per_block`` does
  it where PILOT's code does, before every block of each training forward and after every step;
  ``per_step`` only after every step;
- afterwards each new class gets a Gaussian of its features under set t (mean, covariance +
  1e-4 I) and a prototype, its mean feature under set 0; from t = 1 the head is aligned on
  ``ca_samples_per_class`` draws a class from every Gaussian (``ca_epochs`` epochs, SGD at
  ``ca_lr``, as SLCA's alignment without its mean scaling and logit normalisation).

At test time (:class:`~incremental.models.net.AdapterRetrievalOutput`) the cosine to the
prototypes picks a class, whose experience's set the head then reads; the head's prediction
there names the next set, for at most ``rounds`` reads (self-refined retrieval). With
``ensemble`` the last read's softmax is averaged with the prototypes' softmax at temperature
1 / (t + 1).

Two departures from PILOT's code, both kept apart in reference.md's rows: PILOT's evaluation
applies the merge to the *stored* sets 1..t in place at every forward (so after one test batch
each has become nearly the mean of the sets before it), and its class statistics are taken under
a copy of set t that the merge keeps pulling during that pass. Here the stored sets stay as
trained and the statistics are taken under set t as stored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from incremental.models.net import AdapterRetrievalOutput
from incremental.models.peft import transformer_blocks, vision_transformer
from incremental.strategy import StrategyContext, StrategyPlugin
from incremental.training.optim import head_param_groups

from .ease import SubspaceViT
from .options import MOSConfig
from .pretrained import SharedHeadClassifier, experience_features, init_head_rows, loss_on_current_classes
from .slca import align_head, class_gaussians


class AdapterSetsViT(SubspaceViT):
    """A frozen ViT with one adapter set per experience: in training the current set's pooled
    features (B, d), in eval every set's up to the current one side by side (B, sets x d, zeros
    beyond). ``pulling`` merges the current set towards ``merge_means`` before every block."""

    def __init__(self, vit: nn.Module, sets: int, bottleneck: int, scale: float, dropout: float):
        super().__init__(vit, sets, bottleneck, scale, dropout)
        self.num_features = self.dim  # the head's width: it reads one set at a time
        self.momentum = 0.0
        self.merge_means: list[list[torch.Tensor]] | None = None  # per block, per adapter parameter
        self.pulling = False
        for block in transformer_blocks(vit):
            block.register_forward_pre_hook(lambda module, args: self.pull() if self.pulling else None)

    def current_set(self) -> nn.ModuleList:
        return self.vit.adapters.sets[int(self.current)]

    @torch.no_grad()
    def pull(self) -> None:
        """``A_t <- (1 - m) A_t + m mean(A_0..A_{t-1})`` on the current set's values in place: a
        forward already under way reads them, its backward too (as PILOT's ``.data`` writes)."""
        if self.merge_means is None or self.momentum == 0:
            return
        for adapter, means in zip(self.current_set(), self.merge_means):
            for p, mean in zip(adapter.parameters(), means):
                p.data.mul_(1.0 - self.momentum).add_(mean, alpha=self.momentum)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.subspace(x, int(self.current))
        return super().forward_features(x)


class MOS(StrategyPlugin):
    """MOS: an adapter set per experience merged towards the earlier ones, aligned head, self-refined set retrieval."""

    def __init__(self, config: MOSConfig, context: StrategyContext):
        super().__init__(config, context)
        context.param_group_hooks.append(head_param_groups(config.head_lr_scale))
        self.means: torch.Tensor | None = None  # (classes, d): Gaussians under each class's own set
        self.covariances: torch.Tensor | None = None
        self.prototypes: torch.Tensor | None = None  # (classes, d): mean features under set 0
        self._features: torch.Tensor | None = None  # the training batch's pooled features

    def prepare_model(self, model: Any) -> None:
        vit = vision_transformer(model.backbone)
        model.backbone = AdapterSetsViT(vit, self.context.class_split.num_experiences, self.config.bottleneck,
                                        self.config.adapter_scale, self.config.adapter_dropout)
        model.head = SharedHeadClassifier(model.backbone.dim, model.head.classifier.out_features)
        model.num_features = model.backbone.dim
        model.head.register_forward_pre_hook(self._keep_features)

    def _keep_features(self, module: nn.Module, args: tuple) -> None:
        self._features = args[0] if module.training else None

    @torch.no_grad()
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        t = strategy.experience.current_experience
        backbone = strategy.model.backbone
        backbone.current.fill_(t)
        sets = backbone.vit.adapters.sets
        for index, adapters in enumerate(sets):  # only this experience's set learns
            adapters.requires_grad_(index == t)
        if t > 0:
            sets[t].load_state_dict(sets[t - 1].state_dict())  # PILOT's cur_adapter carries over
            backbone.merge_means = [[torch.stack([dict(sets[i][block].named_parameters())[name] for i in range(t)]).mean(0)
                                     for name, _ in sets[t][block].named_parameters()] for block in range(len(sets[t]))]
            backbone.momentum = self.config.adapter_momentum
        backbone.pulling = t > 0 and self.config.merge == "per_block"
        if self.config.head_init == "trunc_normal":
            init_head_rows(strategy.model.head.classifier, self.context.class_split.label_ranges()[t])

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        loss_on_current_classes(strategy, self.context)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.config.orth_weight and self._features is not None:
            strategy.loss = strategy.loss + self.config.orth_weight * self.orthogonality_loss(self._features)
        self._features = None

    def orthogonality_loss(self, features: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``M M^T / temperature`` against the identity, ``M`` the older classes'
        means (PILOT's ``cls_mean``, fp32) on top of the batch's features."""
        stacked = features.float()
        if self.means is not None:
            stacked = torch.cat([self.means.to(stacked), stacked])
        similarity = stacked @ stacked.T / self.config.orth_temperature
        return F.cross_entropy(similarity, torch.arange(len(stacked), device=stacked.device))

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        strategy.model.backbone.pull()  # PILOT's adapter_merge after each step (a no-op at t = 0)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        t = strategy.experience.current_experience
        model, backbone = strategy.model, strategy.model.backbone
        backbone.pulling, backbone.merge_means = False, None
        features, labels = experience_features(strategy, t, self.context)  # (N, sets x d): sets 0..t
        blocks = features.view(len(features), backbone.sets, backbone.dim)
        self.means, self.covariances = class_gaussians(blocks[:, t], labels, self.means, self.covariances)
        prototypes = torch.zeros(len(self.means), backbone.dim)
        if self.prototypes is not None:
            prototypes[: len(self.prototypes)] = self.prototypes
        for label in labels.unique().tolist():
            prototypes[label] = blocks[labels == label, 0].mean(dim=0)
        self.prototypes = prototypes
        if t > 0 and self.config.ca_epochs > 0:
            self.align(strategy, t)
        class_tasks = torch.tensor(self.context.class_split.label_experience()[: len(self.means)])
        device = next(model.parameters()).device
        model.output_adapter = AdapterRetrievalOutput(prototypes.to(device), class_tasks.to(device),
                                                      self.config.rounds, self.config.ensemble)

    def align(self, strategy: Any, t: int) -> None:
        """The head alone, on draws from every class's Gaussian (PILOT's ``classifer_align``)."""
        per_class = self.config.ca_samples_per_class or 5 * self.context.config.training.batch_size
        was_training = strategy.model.training
        strategy.model.eval()
        align_head(strategy.model.head, self.means, self.covariances,
                   self.context.class_split.label_ranges()[: t + 1], epochs=self.config.ca_epochs,
                   per_class=per_class, lr=self.config.ca_lr,
                   weight_decay=self.context.config.training.optimizer.weight_decay, device=strategy.device,
                   scale_means=False)
        strategy.model.train(was_training)

    def state_dict(self) -> dict[str, Any]:
        return {"means": self.means, "covariances": self.covariances, "prototypes": self.prototypes}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        self.means, self.covariances, self.prototypes = state["means"], state["covariances"], state["prototypes"]
