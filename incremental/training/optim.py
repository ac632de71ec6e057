"""Optimisation pieces every training loop shares: parameter groups and the hooks strategies
use to change them, the optimizer, the per-iteration LR factor, and the NaN check."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..config import OptimizerConfig, SchedulerConfig
from ..errors import UserError


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


def param_groups(model: nn.Module, weight_decay: float, decay_on: str = "weights") -> list[dict[str, Any]]:
    """Two groups, as timm does: no weight decay on biases, norms and the tokens/embeddings
    the model names in ``no_weight_decay()``. With ``decay_on="all"`` every trainable
    parameter decays (one group, as PyCIL's and PILOT's ``SGD(model.parameters(), ...)``)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = decay_on != "all" and (param.ndim <= 1 or name in skip)
        (no_decay if exempt else decay).append(param)
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


def make_optimizer(groups: list[dict[str, Any]], cfg: OptimizerConfig, lr: float,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` over ``groups``, each group's ``base_lr`` set (for
    :func:`scale_lrs`); ``betas`` for Adam/AdamW (torch's default; MAE's recipe uses 0.95)."""
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
        return torch.optim.Adam(groups, lr=lr, betas=betas, **fused)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **fused)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float,
                    group_hooks: Sequence[GroupHook] = ()) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters, after each hook has adjusted the groups."""
    groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_on)
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
    if cfg.name == "epoch_quarter_cosine":  # the reference's K - 1 is 0 for one epoch: the LR stays
        epoch = iteration // max(1, iters_per_epoch)
        return math.cos(99 * math.pi * epoch / (200 * (epochs - 1))) if epochs > 1 else 1.0
    if cfg.name == "epoch_cosine":  # torch's CosineAnnealingLR(T_max=epochs) stepped once an epoch
        epoch = iteration // max(1, iters_per_epoch)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    progress = (iteration - warmup) / max(1, total - warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
