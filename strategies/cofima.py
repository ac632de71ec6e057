"""CoFiMA (Marouf et al. 2024, "Weighted ensemble models are strong continual learners"),
PILOT's ``cofima``: SLCA with the network merged across experiences.

After the slow learner has trained experience t (t > 0), every parameter becomes the
Fisher-weighted average of the network as experience t-1 left it (``theta_0``: merged and
aligned) and the network as training left it (``theta_1``)::

    theta = ((1 - w) F_0 theta_0 + w F_1 theta_1) / ((1 - w) F_0 + w F_1)

with ``w`` the ``merge_weight`` and ``F`` each network's diagonal Fisher on its own experience's
training images: the squared gradient of each batch's cross-entropy over every logit (labels as
they are, not shifted to the experience), summed over batches, over the number of batches, then
capped at ``fisher_max``. Then, as in SLCA, the experience's class Gaussians are taken under the
merged network and the classifier is aligned on them.

Parameters that exist only in ``theta_1`` (PILOT: the new experience's head; here: its rows of
the growing head) become ``F_1 theta_1`` in PILOT's code; ``new_head_rows: trained`` keeps
``theta_1`` instead. The older classes' head rows are frozen while the slow learner trains
(``freeze_old_heads``; PILOT freezes old heads), and PILOT's Fisher pass then reads whatever
their ``.grad`` still holds from the previous experience: the gradient of alignment's last
step (after the first experience: of the Fisher pass's last batch). ``old_head_fisher:
stale_gradient`` (the default) gives those rows the square of that gradient, as PILOT does;
``computed`` gives them their own Fisher on the experience's data. Where both Fishers are zero
(no gradient reaches the parameter, e.g. a frozen backbone) PILOT's division is 0/0; here the
parameter keeps ``theta_1``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from incremental.distributed import current, sum_tensor
from incremental.strategy import StrategyContext
from incremental.timing import phase

from .options import CoFiMAConfig
from .slca import SLCA

HEAD_PARAMETERS = ("head.classifier.weight", "head.classifier.bias")


def capped_fisher_diagonal(model: torch.nn.Module, batches: Any, device: torch.device,
                           cap: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per parameter: the mean over ``batches`` of the squared gradient of the batch's mean
    cross-entropy (all logits, labels as given), capped at ``cap``; zero where no gradient
    reaches. Under torchrun each batch's gradient is the global batch's before it is squared.
    Also the last batch's gradients (what PILOT's loop leaves in ``.grad``)."""
    dist = current()
    parameters = dict(model.named_parameters())
    fisher = {name: torch.zeros_like(p) for name, p in parameters.items()}
    last: dict[str, torch.Tensor] = {}
    count = 0
    for x, y, *_ in batches:
        x, y = x.to(device), y.to(device)
        model.zero_grad(set_to_none=True)
        size = sum_tensor(torch.tensor(float(len(y)), device=device), dist)
        loss = F.cross_entropy(model(x).float(), y, reduction="sum") / size
        loss.backward()
        last = {name: sum_tensor(p.grad.detach(), dist) for name, p in parameters.items() if p.grad is not None}
        for name, gradient in last.items():
            fisher[name] += gradient.pow(2)
        count += 1
    model.zero_grad(set_to_none=True)
    return {name: (value / max(count, 1)).clamp(max=cap) for name, value in fisher.items()}, last


@torch.no_grad()
def fisher_merge(previous: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
                 previous_fisher: dict[str, torch.Tensor] | None, trained_fisher: dict[str, torch.Tensor] | None,
                 weight: float, new_rows: str = "times_fisher") -> dict[str, torch.Tensor]:
    """CoFiMA's merge of ``trained`` into ``previous`` (name -> tensor), Fisher-weighted or,
    without Fishers, the plain ``(1 - w) previous + w trained``. Rows beyond the previous
    tensor's (the head's new classes) are the trained ones, times their Fisher with
    ``new_rows: times_fisher`` (PILOT's); where both Fishers are zero the trained value stays."""
    merged = {}
    for name, now in trained.items():
        before = previous[name].to(now)
        rows = len(before) if before.dim() else None
        old = now[:rows] if rows is not None else now
        if previous_fisher is None:
            value = (1 - weight) * before + weight * old
        else:
            f0, f1 = previous_fisher[name].to(now), trained_fisher[name]
            f1 = f1[:rows] if rows is not None else f1
            denominator = (1 - weight) * f0 + weight * f1
            value = torch.where(denominator > 0, ((1 - weight) * f0 * before + weight * f1 * old)
                                / denominator.where(denominator > 0, torch.ones_like(denominator)), old)
        if rows is not None and len(now) > rows:
            added = now[rows:]
            if previous_fisher is not None and new_rows == "times_fisher":
                added = trained_fisher[name][rows:] * added
            value = torch.cat([value, added])
        merged[name] = value
    return merged


class CoFiMA(SLCA):
    """CoFiMA: SLCA with the network a Fisher-weighted merge of the previous and the new one."""

    config: CoFiMAConfig

    def __init__(self, config: CoFiMAConfig, context: StrategyContext):
        super().__init__(config, context)
        self.previous: dict[str, torch.Tensor] | None = None  # the network after the last experience
        self.previous_fisher: dict[str, torch.Tensor] | None = None
        self.stale_head: dict[str, torch.Tensor] | None = None  # see fisher()

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._old_rows = None
        self.keep_unaligned_head(strategy)
        experience = strategy.experience.current_experience
        fisher = self.fisher(strategy, experience) if self.config.fisher_weighting else None
        model = strategy.model
        if self.previous is not None:
            trained = {name: p.detach() for name, p in model.named_parameters()}
            merged = fisher_merge(self.previous, trained, self.previous_fisher, fisher, self.config.merge_weight,
                                  self.config.new_head_rows)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(merged[name])
        self.update_gaussians(strategy, experience)
        if experience > 0 and self.config.ca_epochs > 0:
            self.align(strategy, experience)
            self.keep_last_head_gradient(strategy)
        self.previous = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
        self.previous_fisher = None if fisher is None else {name: f.cpu() for name, f in fisher.items()}

    def fisher(self, strategy: Any, experience: int) -> dict[str, torch.Tensor]:
        """The trained network's capped diagonal Fisher on the experience's training images
        (train transforms, shuffled batches of the training size, train mode, as PILOT's
        ``getFisherDiagonal`` over its training loader)."""
        model, was_training = strategy.model, strategy.model.training
        model.train()
        try:
            with phase(strategy, "fisher"):
                batches = strategy.engine.batches(self.context.train_dataset(experience),
                                                  batch_size=strategy.train_mb_size, shuffle=True, drop_last=False,
                                                  seed=self.context.config.seed + experience)
                fisher, last = capped_fisher_diagonal(model, batches, strategy.device, self.config.fisher_max)
        finally:
            model.train(was_training)
        start = self.context.class_split.label_ranges()[experience].start
        stale = self.config.old_head_fisher == "stale_gradient" and self.config.freeze_old_heads
        kept = {}
        for name in HEAD_PARAMETERS:
            if name not in last:
                continue
            kept[name] = last[name].clone()  # the new rows' gradient stays on them (PILOT's .grad)
            if stale and self.stale_head and name in self.stale_head:  # frozen rows keep their old .grad
                old = self.stale_head[name][:start].to(fisher[name])
                fisher[name][:start] = old.pow(2).clamp(max=self.config.fisher_max)
                kept[name][:start] = old
        self.stale_head = kept
        return fisher

    def keep_last_head_gradient(self, strategy: Any) -> None:
        """The head's gradient at alignment's last step: what PILOT's frozen heads still hold
        when the next experience's Fisher pass reads them."""
        parameters = dict(strategy.model.named_parameters())
        self.stale_head = {name: parameters[name].grad.detach().clone() for name in HEAD_PARAMETERS
                           if parameters.get(name) is not None and parameters[name].grad is not None}
        strategy.model.head.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "previous": self.previous, "previous_fisher": self.previous_fisher,
                "stale_head": self.stale_head}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        super().load_state_dict(state, model)
        self.previous, self.previous_fisher = state["previous"], state["previous_fisher"]
        self.stale_head = state["stale_head"]
