"""Class-balanced finetuning (EEIL, Castro et al. 2018; ViTIL; DyTox): a short training pass on
a set with as many images of every seen class, to undo the bias toward new classes."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import nn

from ..config import OptimizerConfig, SchedulerConfig
from ..errors import ConfigError
from .optim import GroupHook, build_optimizer, check_finite, lr_factor
from .engine import TrainingEngine


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
                      schedule: Literal["cosine", "constant"] = "cosine", engine: TrainingEngine | None = None,
                      desc: str = "balanced finetuning") -> list[float]:
    """Train ``model`` on the Avalanche ``dataset`` (train transforms) for ``epochs`` at ``lr``,
    cosine-decayed or constant (``schedule``). ``params``: ``all``; ``head``, the classifier
    only, with the backbone in eval mode (frozen BN statistics, no drop path); or
    ``frozen_encoder``, DyTox's: the patch and position embeddings and all blocks but the last
    frozen, in eval mode.

    ``engine``: the run's training engine (the template's), whose precision, compile, data path
    and sharding this loop takes: under torchrun each rank trains on its shard of every
    balanced batch, and the result is one process's. Without one, a single-process engine on
    ``device`` at ``precision`` with DataLoader batches. Shuffles (and device-path draws) come
    from ``seed``'s own stream. ``desc`` labels its progress bar. Returns the mean loss of each
    epoch."""
    engine = engine or TrainingEngine(device, precision=precision)
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
    batches = engine.batches(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) > batch_size,
                             seed=seed, num_workers=num_workers)
    opt = build_optimizer(model, optimizer, lr, group_hooks)
    schedule_cfg = SchedulerConfig(name=schedule)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def loss(forward: Any, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        return criterion(forward(batch[0]).float(), batch[1])

    def check(value: float, when: str) -> None:
        check_finite(value, "balanced-finetuning loss", when, key="strategy.balanced_finetuning.lr_scale")

    try:
        return engine.fit(model, batches, opt, epochs=epochs, loss=loss, check=check, desc=desc,
                          lr_factor=lambda iteration, steps: lr_factor(schedule_cfg, iteration=iteration,
                                                                       iters_per_epoch=steps, epochs=epochs))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
