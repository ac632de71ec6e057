"""What a probe is and the data it sees.

A registered probe is a class ``Cls(config, options)`` with ``run(batch) -> ProbeResult``.
After every experience (after the runner's evaluation), :class:`~.suite.ProbeSuite` draws a fixed
subsample of the test images of the classes seen so far, undoes the dataset's
normalisation so the probe works on images in [0, 1], and calls each probe in eval mode.
The model, its train/eval modes, its ``requires_grad`` flags and every random number
stream (torch CPU and CUDA, numpy, Python) are restored afterwards: probing never changes
training. Probes draw their own random numbers from a generator seeded by (run seed,
experience, probe position).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .options import ProbeOptions


class PixelModel(nn.Module):
    """The model on images in [0, 1]: normalises, then calls it. Probes perturb and clip in
    pixel space, where corruption severities and attack budgets are defined."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1), persistent=False)

    # called once per forward pass: the probe suite's progress bar counts the batches
    progress: Callable[[], None] | None = None

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` in [0, 1] normalised as the model expects (one forward pass counted)."""
        if self.progress is not None:
            self.progress()
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from ..models.net import classify

        return classify(self.model, self.inputs(images))  # the run's classifier


@dataclass
class ProbeBatch:
    """What a probe runs on: the subsampled seen-class test images and the model."""

    images: torch.Tensor  # (N, C, H, W) in [0, 1], on the model's device
    labels: torch.Tensor  # (N,) remapped labels (positions in the class order)
    model: PixelModel
    generator: torch.Generator  # CPU; the probe's own random stream
    batch_size: int
    step: int  # experience index just trained
    num_seen_classes: int
    patch_grid: tuple[int, int] | None  # token grid of a patch-token backbone, else None
    future_images: torch.Tensor | None = None  # unseen classes' test images, for OOD probes

    @property
    def device(self) -> torch.device:
        return self.images.device

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits over the seen classes, computed in batches without gradients."""
        with torch.no_grad():
            return torch.cat([self.model(chunk)[:, : self.num_seen_classes]
                              for chunk in images.split(self.batch_size)])

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> float:
        labels = self.labels if labels is None else labels
        return 100.0 * float((self.logits(images).argmax(1) == labels).float().mean())

    def chunks(self, count: int | None = None) -> int:
        """Batches in one pass over ``count`` images (default: the probe's images)."""
        return -(-(len(self.images) if count is None else count) // self.batch_size)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from zip(self.images.split(self.batch_size), self.labels.split(self.batch_size))


@dataclass
class ProbeResult:
    """``scalars``: flat numbers for TensorBoard (tag suffix -> value) and the summary;
    ``details``: everything else, JSON-ready; ``images``: heat maps, HxWx3 uint8."""

    scalars: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.scalars, **self.details}


class Probe:
    """Base class of registered probes: ``run`` must only read the model."""

    default_samples = 500  # test images per step when ``num_samples`` is not set
    uses_future_images = False  # whether ``run`` reads ``batch.future_images`` (unseen classes)

    @property
    def needs_input_gradients(self) -> bool:
        """Whether the probe differentiates the network (attacks): an int8 copy has no backward."""
        return False

    def forward_passes(self, batch: "ProbeBatch") -> int:
        """How many batches the probe will run through the network (its progress bar's total):
        exact for the built-in probes, an upper bound where an attack may stop early. The default,
        one pass over the images, is for users' probes that do not say."""
        return batch.chunks()

    def __init__(self, config: Any, options: ProbeOptions):
        self.config = config
        self.options = options

    @property
    def num_samples(self) -> int:
        return self.options.num_samples or self.default_samples

    def prepare(self, context: "ProbeData") -> None:
        """Called once before the first step (load reference runs, extra datasets)."""

    def parameters(self, batch: "ProbeBatch") -> dict[str, Any]:
        """The exact settings this probe ran with, recorded in metrics.json next to its results:
        its options, with what ``auto`` or ``null`` resolved to on these images."""
        from ..config import to_dict

        return {**to_dict(self.config), **self.resolved(batch)}

    def resolved(self, batch: "ProbeBatch") -> dict[str, Any]:
        """Options whose value depends on the images (a budget chosen by size): override."""
        return {}

    def run(self, batch: ProbeBatch) -> ProbeResult:  # pragma: no cover - abstract
        raise NotImplementedError


def build_probes(specs: Sequence[Any], data: "ProbeData") -> list[Probe]:
    """The probes of a ``probes:`` list, each prepared (reference runs read, OOD datasets
    loaded); errors name ``probes.I.KEY``."""
    from ..errors import UserError
    from ..registry import PROBES

    probes = []
    for i, spec in enumerate(specs):
        probe = PROBES.get(spec.name).obj(spec.config, spec.common or ProbeOptions())
        try:
            probe.prepare(data)
        except UserError as exc:
            exc.key = f"probes.{i}.{exc.key}" if exc.key else f"probes.{i}"
            raise
        probes.append(probe)
    return probes


# --------------------------------------------------------------------------- state


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run the body on ``model`` in eval mode, without gradients into its parameters, and
    restore its modes, ``requires_grad`` flags and all random number streams afterwards."""
    from ..checkpoint import rng_state, set_rng_state

    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    random_state = rng_state()
    try:
        model.eval()
        for param, _ in flags:
            param.requires_grad_(False)  # attacks differentiate the input only
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        for param, flag in flags:
            param.requires_grad_(flag)
        set_rng_state(random_state)


def patch_grid(model: nn.Module) -> tuple[int, int] | None:
    """The token grid of a patch-token backbone (ViT, Swin, DLCL), None for CNNs."""
    backbone = getattr(model, "backbone", model)
    embed = getattr(backbone, "patch_embed", None)
    grid = getattr(embed, "grid_size", None)
    return (int(grid[0]), int(grid[1])) if grid is not None else None


# --------------------------------------------------------------------------- data


class ProbeData:
    """The test images a probe sees: a fixed random order of the test set, from which each
    step takes the first ``num_samples`` images of seen (or unseen) classes, so steps
    share images and runs with the same seed probe the same images."""

    def __init__(self, splits: Any, class_order: Sequence[int], classes_per_experience: Sequence[int], seed: int,
                 templates: Sequence[str] = ("a photo of a {}.",)):
        from ..protocol import OrderedClassSubset, label_texts

        self.splits = splits
        # what a text tower reads for each class (label order), for probes that score with text
        self.class_texts = label_texts(splits.class_names, class_order)
        self.templates = list(templates)
        self.test = OrderedClassSubset(splits.test, list(class_order))
        self.bounds = np.cumsum(list(classes_per_experience)).tolist()
        self.targets = np.asarray(self.test.targets)
        self.order = np.random.default_rng(seed).permutation(len(self.test))
        self.mean, self.std = tuple(splits.mean), tuple(splits.std)
        self.seed = seed
        self.image_size, self.channels = splits.image_size, splits.channels

    def seen_classes(self, step: int) -> int:
        return int(self.bounds[step])

    def indices(self, step: int, limit: int, *, future: bool = False) -> np.ndarray:
        seen = self.seen_classes(step)
        labels = self.targets[self.order]
        return self.order[(labels >= seen) if future else (labels < seen)][:limit]

    def load(self, indices: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] (the eval transform, un-normalised) and their remapped labels."""
        if len(indices) == 0:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        transform = self.splits.eval_transform
        images = torch.stack([transform(self.test[int(i)][0]) for i in indices])
        images = unnormalise(images, self.mean, self.std)
        labels = torch.as_tensor(self.targets[indices], dtype=torch.long)
        return images.to(device), labels.to(device)


def unnormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(list(mean)).view(1, -1, 1, 1)
    s = torch.tensor(list(std)).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


def luma(images: torch.Tensor) -> torch.Tensor:
    """Grey level as OpenCV's RGB2GRAY computes it, (N, 1, H, W); grey images unchanged."""
    if images.shape[1] == 1:
        return images
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)
