"""Class-balanced finetuning (EEIL, Castro et al. 2018; ViTIL; DyTox): a short training pass on
a set with as many images of every seen class, to undo the bias toward new classes."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import nn

from ..config import OptimizerConfig, SchedulerConfig
from ..errors import ConfigError
from ..plugins import GroupHook, build_optimizer, check_finite, lr_factor, scale_lrs


def frozen_encoder_modules(model: nn.Module) -> list[nn.Module]:
    """DyTox's ``freeze_ft: [sab]`` on a ViT: the patch embedding and every transformer block
    but the last (its self-attention blocks; the last plays the task-attention block's part).
    The position embedding is frozen with them (see :func:`balanced_finetune`)."""
    backbone = getattr(model, "backbone", model)
    blocks, patch = getattr(backbone, "blocks", None), getattr(backbone, "patch_embed", None)
    if blocks is None or patch is None or len(blocks) < 2:
        raise ConfigError("params: frozen_encoder (DyTox's freeze_ft [sab]) needs a ViT backbone with at least "
                          "2 blocks", key="strategy.balanced_finetuning.params")
    return [patch, *list(blocks)[:-1]]


def balanced_finetune(model: nn.Module, dataset: Any, *, epochs: int, lr: float, batch_size: int,
                      params: Literal["head", "all", "frozen_encoder"], optimizer: OptimizerConfig, device: Any,
                      seed: int, num_workers: int = 0, label_smoothing: float = 0.0,
                      group_hooks: Sequence[GroupHook] = (), precision: str = "fp32",
                      schedule: Literal["cosine", "constant"] = "cosine", batches: Any = None,
                      desc: str = "balanced finetuning") -> list[float]:
    """Train ``model`` on the Avalanche ``dataset`` (train transforms) for ``epochs`` at ``lr``,
    cosine-decayed or constant (``schedule``). ``params``: ``all``; ``head``, the classifier
    only, with the backbone in eval mode (frozen BN statistics, no drop path); or
    ``frozen_encoder``, DyTox's: the patch and position embeddings and all blocks but the last
    frozen, in eval mode. ``precision`` as the run's (autocast, and loss scaling for fp16).
    ``batches``: the epochs' batches from the run's data path (``IncrementalTemplate.batches``,
    the device path when it is on); by default a DataLoader with the train transforms.
    ``desc`` labels its progress bar. Returns the mean loss of each epoch."""
    from torch.utils.data import DataLoader

    from ..progress import bar
    from .template import autocast

    if params == "head":
        eval_modules = [m for name, m in model.named_children() if name != "head"]
    elif params == "frozen_encoder":
        eval_modules = frozen_encoder_modules(model)
    else:
        eval_modules = []
    frozen = [p for m in eval_modules for p in m.parameters() if p.requires_grad]
    pos_embed = getattr(getattr(model, "backbone", model), "pos_embed", None)
    if params == "frozen_encoder" and isinstance(pos_embed, nn.Parameter) and pos_embed.requires_grad:
        frozen.append(pos_embed)
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.train(True)
    for module in eval_modules:
        module.eval()
    loader = batches if batches is not None else DataLoader(
        dataset.train(), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers, drop_last=len(dataset) > batch_size)
    opt = build_optimizer(model, optimizer, lr, group_hooks)
    schedule_cfg = SchedulerConfig(name=schedule)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
    epoch_losses: list[float] = []
    progress = bar(epochs * len(loader), desc)
    try:
        iteration = 0
        for epoch in range(epochs):
            # Summed on the device and read once per epoch: a read per step would make the CPU
            # wait for the GPU's queue every step. A NaN is reported at the end of its epoch.
            total, count = torch.zeros((), device=device), 0
            for x, y, *_ in loader:
                scale_lrs(opt, lr_factor(schedule_cfg, iteration=iteration, iters_per_epoch=len(loader),
                                         epochs=epochs))
                with autocast(device, precision):
                    logits = model(x.to(device, non_blocking=True))
                loss = criterion(logits.float(), y.to(device, non_blocking=True))
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                total += loss.detach()
                count += 1
                iteration += 1
                progress.update(1)
            mean = float(total) / max(1, count)
            check_finite(mean, "balanced-finetuning loss", f"in epoch {epoch + 1}",
                         key="strategy.balanced_finetuning.lr_scale")
            epoch_losses.append(mean)
            progress.set_postfix(epoch=epoch + 1, loss=f"{mean:.3f}", refresh=False)
    finally:
        progress.close()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return epoch_losses
