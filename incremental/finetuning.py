"""Class-balanced finetuning (EEIL, Castro et al. 2018; ViTIL; DyTox): a short training pass on
a set with as many images of every seen class, to undo the bias toward new classes."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import nn

from .config import OptimizerConfig, SchedulerConfig
from .plugins import GroupHook, build_optimizer, check_finite, lr_factor, scale_lrs


def balanced_finetune(model: nn.Module, dataset: Any, *, epochs: int, lr: float, batch_size: int,
                      params: Literal["head", "all"], optimizer: OptimizerConfig, device: Any,
                      seed: int, num_workers: int = 0, label_smoothing: float = 0.0,
                      group_hooks: Sequence[GroupHook] = (), precision: str = "fp32") -> list[float]:
    """Train ``model`` on the Avalanche ``dataset`` (train transforms) for ``epochs`` with a
    cosine-decayed ``lr``; ``params="head"`` trains the classifier only, with the backbone in
    eval mode (frozen BN statistics, no drop path). ``precision`` as the run's (autocast, and
    loss scaling for fp16). Returns the mean loss of each epoch."""
    from torch.utils.data import DataLoader

    from .template import autocast

    if params == "head":
        frozen = [p for name, p in model.named_parameters() if not name.startswith("head.") and p.requires_grad]
    else:
        frozen = []
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.train(params == "all")
    if params == "head":
        model.head.train()
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset.train(), batch_size=batch_size, shuffle=True, generator=generator,
                        num_workers=num_workers, drop_last=len(dataset) > batch_size)
    opt = build_optimizer(model, optimizer, lr, group_hooks)
    schedule = SchedulerConfig(name="cosine")
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
    epoch_losses: list[float] = []
    try:
        iteration = 0
        for epoch in range(epochs):
            total, count = 0.0, 0
            for x, y, *_ in loader:
                scale_lrs(opt, lr_factor(schedule, iteration=iteration, iters_per_epoch=len(loader), epochs=epochs))
                with autocast(device, precision):
                    logits = model(x.to(device))
                loss = criterion(logits.float(), y.to(device))
                value = float(loss.detach())
                check_finite(value, "balanced-finetuning loss", f"in epoch {epoch + 1}",
                             key="strategy.balanced_finetuning.lr_scale")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                total += value
                count += 1
                iteration += 1
            epoch_losses.append(total / max(1, count))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return epoch_losses
