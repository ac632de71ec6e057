"""InfLoRA as its authors' code runs it (liangyanshuo/InfLoRA), for reference.py's side-by-side
row. The reference's learner (``methods/inflora.py``) and network (``models/sinet_inflora.py``)
are imported from the checkout and run through every task as its ``trainer.py`` runs them;
its accuracy is ``eval_task``'s top-1 after each task.

What the harness changes, written into reference.md:

- ``models.sinet_inflora._create_vision_transformer``, which downloads ViT-B/16, builds the
  module's own ``ViT_lora_co`` at the shared ViT's size (its constructor, 1 input channel,
  32 px, 4-px patches) and loads the shared weights into it (its LoRA branches start as its
  ``init_param`` leaves them);
- ``ipdb``, which ``methods/inflora.py`` imports for a commented-out breakpoint, is an empty
  module;
- ``update_DualGPM`` gets its input covariances as numpy arrays instead of torch tensors: with
  this machine's numpy and torch, ``np.linalg.svd`` of a torch tensor hands back torch tensors
  (wrapped through ``__array_wrap__``), on which the method's numpy-style ``.transpose()`` fails;
- the training values are configs/cifar100_inflora.json's with the ViT's width and heads, the
  protocol's 5 tasks of 2 classes, 0 loader workers, and the epochs written in reference.py.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import torch


def shared_inflora_vit(module: Any, vit_path: Path, **kwargs: Any) -> torch.nn.Module:
    """The reference's ViT_lora_co at the shared ViT's size, holding its weights."""
    from safetensors.torch import load_file

    from pilot_models import SHARED_VITS, shared_kind

    spec = SHARED_VITS[shared_kind(vit_path)]
    kwargs.update(img_size=32, patch_size=4, in_chans=1, num_classes=0, global_pool="token",
                  embed_dim=spec["embed_dim"], depth=spec["depth"], num_heads=spec["num_heads"])
    model = module.ViT_lora_co(**kwargs)  # SiNet's own kwargs (ViT-B/16's) replaced by the shared ViT's
    missing, unexpected = model.load_state_dict(load_file(str(vit_path)), strict=False)
    # its LoRA branches, and cls_token_grow / pos_embed_grow, which its forward never reads
    if unexpected or any("lora" not in key and not key.endswith("_grow") for key in missing):
        raise RuntimeError(f"the shared ViT does not fit InfLoRA's: missing {missing}, unexpected {unexpected}")
    model.out_dim = spec["embed_dim"]
    return model


def inflora_args(root: Path, manager: Any, vit_path: Path, seed: int, changes: dict[str, Any]) -> dict[str, Any]:
    from pilot_models import SHARED_VITS, shared_kind

    spec = SHARED_VITS[shared_kind(vit_path)]
    args = json.loads((root / "configs" / "cifar100_inflora.json").read_text())
    args.update(embd_dim=spec["embed_dim"], num_heads=spec["num_heads"], total_sessions=manager.nb_tasks,
                init_cls=manager.get_task_size(0), increment=manager.get_task_size(1), num_workers=0,
                device=[torch.device("cpu")], seed=seed, dataset="digits", **changes)
    return args


class ToolkitCosine:
    """In place of the reference's ``CosineSchedule(optimizer, K)`` (a quarter cosine stepped
    once an epoch): the toolkit's half-cosine over the task's iterations, set after every
    optimizer step; the reference's once-an-epoch ``step`` does nothing."""

    def __init__(self, learner: Any, optimizer: torch.optim.Optimizer, K: int):
        from pilot_models import follow_toolkit_cosine

        follow_toolkit_cosine(optimizer, len(learner.train_loader), K)

    def step(self) -> None:
        pass


def run_inflora(root: Path, seed: int, vit_path: Path, manager: Any, changes: dict[str, Any]) -> list[float]:
    """The reference's InfLoRA through every task on ``manager``'s digits; its top-1 after each.
    ``changes`` may hold ``toolkit_schedule``: the reference trained with the toolkit's LR
    schedule (:class:`ToolkitCosine`)."""
    from clip_references import use_checkout

    use_checkout(root)
    sys.modules.setdefault("ipdb", types.ModuleType("ipdb"))
    import methods.inflora as inflora
    import models.sinet_inflora as sinet

    sinet._create_vision_transformer = lambda variant, pretrained=False, **kwargs: shared_inflora_vit(
        sinet, vit_path, **kwargs)
    changes = dict(changes)
    if changes.pop("toolkit_schedule", False):
        inflora.CosineSchedule = lambda optimizer, K: ToolkitCosine(learner, optimizer, K)
    torch.manual_seed(seed)
    learner = inflora.InfLoRA(inflora_args(root, manager, vit_path, seed, changes))
    update = learner.update_DualGPM  # given numpy arrays: numpy's SVD of torch tensors returns torch tensors here
    learner.update_DualGPM = lambda matrices: update([m.numpy() for m in matrices])
    curve = []
    for _ in range(manager.nb_tasks):
        learner.incremental_train(manager)
        curve.append(float(learner.eval_task()[0]["top1"]))
        learner.after_task()
    return curve
