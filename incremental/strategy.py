"""What a strategy is: an Avalanche plugin built from its typed config and a run context.

A registered strategy is a callable ``Cls(config, context)`` returning a
:class:`avalanche.core.SupervisedPlugin` (or a list of them, to combine Avalanche's own
plugins). The runner builds one ``SupervisedTemplate`` and attaches the strategy's plugins
next to its own (optimizer, evaluation, progress), so a strategy only writes the hooks it
changes, as Avalanche's LwFPlugin does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from avalanche.core import SupervisedPlugin

from .config import RunConfig
from .training.optim import GroupHook
from .protocol import ClassSplit


@dataclass
class StrategyContext:
    """What a strategy may need beyond its own options."""

    config: RunConfig
    class_split: ClassSplit
    benchmark: Any  # the Avalanche CLScenario (train_stream, test_stream)
    device: Any
    # the dataset's DatasetSplits (transforms, normalisation, image shape): what memories that
    # store or generate images need to hand them back to training
    splits: Any = None
    # applied whenever the runner builds an optimizer (every experience)
    param_group_hooks: list[GroupHook] = field(default_factory=list)

    @property
    def total_classes(self) -> int:
        return sum(self.class_split.classes_per_experience)

    @property
    def memory_total(self) -> int | None:
        return self.config.protocol.memory.total

    @property
    def memory_per_class(self) -> int | None:
        return self.config.protocol.memory.per_class

    @property
    def memory_bytes(self) -> int | None:
        value = self.config.protocol.memory.bytes
        return None if value is None else int(value)

    def class_texts(self) -> list[str]:
        """The class names in label order, as a text encoder reads them (protocol.label_texts)."""
        from .protocol import label_texts

        return label_texts(self.splits.class_names, self.class_split.class_order)

    def text_embeddings(self, backbone: Any, labels: range, templates: list[str] | None = None) -> Any:
        """(len(labels), dim): the normalised text embeddings of these labels' class names, over
        ``templates`` (default: the protocol's, ensembled)."""
        names = self.class_texts()[labels.start:labels.stop]
        return backbone.text_embeddings(names, self.prompt_templates() if templates is None else templates)

    def prompt_templates(self) -> list[str]:
        """``protocol.templates``, open_clip's named sets expanded."""
        from .models.clip import prompt_templates

        return prompt_templates(self.config.protocol.templates)

    def require_text_tower(self, model: Any, strategy: str) -> Any:
        """The model's backbone, or an error unless it has a text tower (backbone: clip)."""
        from .errors import ConfigError
        from .models.clip import has_text_tower

        if not has_text_tower(model):
            raise ConfigError(f"strategy {strategy!r} writes classifiers from class names and needs a backbone "
                              f"with a text tower (backbone.name: clip), not {self.config.backbone.name!r}",
                              key="backbone.name")
        backbone = self.config.backbone
        if backbone.common.pretrained is None and not getattr(backbone.config, "random_weights", False):
            raise ConfigError(f"strategy {strategy!r} classifies by what a pre-trained CLIP knows of the class names, "
                              f"and no weights are named, so this CLIP is random: name an open_clip checkpoint, "
                              f"or set backbone.random_weights: true to run a random one on purpose",
                              key="backbone.pretrained")
        return model.backbone

    def train_dataset(self, experience: int) -> Any:
        return self.benchmark.train_stream[experience].dataset

    def require_stored_images(self, what: str) -> None:
        """An error naming ``what`` unless the dataset holds its images as uint8 tensors (digits,
        synthetic, CIFAR): checked when the strategy is built, before any training."""
        from .data.base import TensorImageDataset
        from .errors import ConfigError

        if self.splits is not None and not isinstance(self.splits.train, TensorImageDataset):
            raise ConfigError(f"{what} stores or generates the dataset's uint8 images; dataset "
                              f"{self.config.dataset.name!r} reads image files", key="dataset.name")

    def train_images(self, experience: int, indices: list[int]) -> Any:
        """uint8 pixels of these samples of an experience's training set, as the dataset stores
        them (what a byte-budgeted memory encodes)."""
        from .data.device import stored_images
        from .errors import ConfigError

        images = stored_images(self.train_dataset(experience).subset(indices))
        if images is None:
            raise ConfigError(f"a memory in bytes stores the dataset's uint8 images; dataset "
                              f"{self.config.dataset.name!r} reads image files", key="protocol.memory.bytes")
        return images

    def images_dataset(self, images: Any, labels: Any) -> Any:
        """uint8 images (decoded exemplars) as an Avalanche dataset with the run's train/eval
        transforms, like the experiences' own (task label 0)."""
        from .data.base import TensorImageDataset
        from .protocol import classification_dataset

        base = TensorImageDataset(images, [int(y) for y in labels])
        return classification_dataset(base, self.splits).train()

    def require_memory(self, strategy: str) -> int:
        """The total exemplar budget, or an error naming the missing protocol key."""
        from .errors import ConfigError

        if self.memory_bytes is not None:
            raise ConfigError(f"strategy {strategy!r} counts its memory in exemplars; a budget in bytes works "
                              f"with replay and gan_replay: set protocol.memory.total or per_class",
                              key="protocol.memory.bytes")
        total = self.memory_total or (self.memory_per_class or 0) * self.total_classes
        if not total:
            raise ConfigError(f"strategy {strategy!r} needs exemplars: set protocol.memory.total "
                              f"or protocol.memory.per_class", key="protocol.memory")
        return total


class StrategyPlugin(SupervisedPlugin, supports_distributed=True):
    """Base class for registered strategies (any SupervisedPlugin subclass works too)."""

    def __init_subclass__(cls, supports_distributed: bool = True, **kwargs: Any) -> None:
        # Under torchrun every rank runs the strategy on the same model, data and random
        # state (incremental.distributed), so strategies work there unless they say otherwise;
        # Avalanche's own default would flag every subclass.
        super().__init_subclass__(supports_distributed=supports_distributed, **kwargs)

    def __init__(self, config: Any, context: StrategyContext):
        super().__init__()
        self.config = config
        self.context = context

    def prepare_model(self, model: Any) -> None:
        """Adapt the model once, when the run builds it and before any weights are loaded into
        it (a checkpoint, on resume): attach adapters or prompts, freeze a pre-trained backbone.
        The run builds the same model again on resume, so it must not depend on training."""

    def state_dict(self) -> dict[str, Any]:
        """What the plugin carries from one experience to the next, as plain data (ints, floats,
        strings, lists, dicts, tensors), for the checkpoint written after every experience.
        A plugin with such state must override this and :meth:`load_state_dict`, or a resumed
        run will differ from an uninterrupted one."""
        return {}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        """Restore :meth:`state_dict`'s output; ``model`` already holds the checkpoint's weights
        (teachers that are copies of the previous model are rebuilt from it)."""


def build_strategy(context: StrategyContext, model: Any) -> list[Any]:
    """The run's strategy plugins, each given the chance to adapt ``model`` (``prepare_model``):
    a run builds them this way, and so does whatever rebuilds a saved model (`incremental probe`)."""
    from .registry import STRATEGIES

    cfg = context.config
    plugins = STRATEGIES.get(cfg.strategy.name).obj(cfg.strategy.config, context)
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    for plugin in plugins:  # adapters, prompts, a frozen backbone: before any weights are loaded
        prepare = getattr(plugin, "prepare_model", None)
        if callable(prepare):
            prepare(model)
    return plugins
