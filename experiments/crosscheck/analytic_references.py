"""ACIL and DS-AL as their authors' code runs them (ZHUANGHP/Analytic-continual-learning), for
reference.py's side-by-side rows. The reference's ``analytic.ACIL`` and ``analytic.DSAL`` modules
are imported from the checkout and driven as its ``main.py`` drives them in the incremental
phases: per phase, the phase's training images in shuffled batches of ``--IL-batch-size`` into
``fit`` (with ``increase_size``, the phase's classes), ``update``, then the top-1 accuracy of
``model(X)`` over the test images of every class seen.

What the harness changes, written into reference.md:

- the backbone is the shared ViT (pilot_models.load_vit) where main.py loads a ResNet; the
  B0 protocol has no base training (main.py trains a base backbone only when ``--base-ratio`` > 0,
  and otherwise loads a pre-trained one, as here);
- the random buffer's weights are the ones the toolkit's run drew (read from its checkpoint),
  copied into the reference's ``RandomBuffer`` after its own draw, so both sides expand alike;
- the accuracy is the reference's definition (sklearn's accuracy_score of the argmax) computed
  here: its ``validate`` also takes the top-5, which fails with the 2 classes of the first step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

# the toolkit's option -> the reference's argument (config.py), with the README's CIFAR-100 values
ANALYTIC_DEFAULTS = {"expansion_size": 8192, "gamma": 0.1, "gamma_comp": 0.1, "compensation_ratio": 0.6,
                     "rls_batch_size": 4096}


def expansion_of(run_dir: Path) -> torch.Tensor:
    """The random buffer's weights (M x d) of the toolkit's ACIL or DS-AL run in ``run_dir``."""
    plugins = torch.load(run_dir / "checkpoint.pt", weights_only=True)["plugins"]
    return next(state["expansion"] for state in plugins if isinstance(state, dict) and "expansion" in state)


def reference_model(method: str, backbone: torch.nn.Module, width: int, options: dict[str, Any]) -> torch.nn.Module:
    """The reference's ACIL or DSAL module over ``backbone``, as its learners' ``make_model`` builds them."""
    from analytic import ACIL, DSAL, RecursiveLinear

    if method == "dsal":
        return DSAL(width, backbone, options["expansion_size"], options["gamma"], options["gamma_comp"],
                    options["compensation_ratio"], device="cpu", dtype=torch.double, linear=RecursiveLinear)
    return ACIL(width, backbone, options["expansion_size"], options["gamma"], device="cpu", dtype=torch.double,
                linear=RecursiveLinear)


def run_analytic(root: Path, method: str, seed: int, vit_path: Path, manager: Any, expansion: torch.Tensor,
                 options: dict[str, Any]) -> list[float]:
    """The reference's ``method`` (acil, dsal) through every step with ``expansion`` as its buffer;
    its accuracy on the seen classes after each step."""
    from clip_references import use_checkout
    from pilot_models import load_vit

    use_checkout(root)
    torch.manual_seed(seed)
    vit = load_vit(vit_path)
    model = reference_model(method.split("_")[0], vit, vit.num_features, {**ANALYTIC_DEFAULTS, **options})
    with torch.no_grad():
        model.buffer.weight.copy_(expansion)
    curve, seen = [], 0
    for task in range(manager.nb_tasks):
        size = manager.get_task_size(task)
        train = manager.get_dataset(np.arange(seen, seen + size), source="train", mode="test")
        loader = torch.utils.data.DataLoader(train, batch_size=options.get("rls_batch_size", 4096), shuffle=True)
        for _, images, labels in loader:
            model.fit(images, labels, increase_size=size)
        model.update()
        seen += size
        test = manager.get_dataset(np.arange(seen), source="test", mode="test")
        predictions, truth = [], []
        for _, images, labels in torch.utils.data.DataLoader(test, batch_size=256):
            predictions.append(model(images).argmax(dim=1))
            truth.append(labels)
        curve.append(100.0 * float((torch.cat(predictions) == torch.cat(truth)).double().mean()))
    return curve
