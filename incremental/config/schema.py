"""The run config's schema: RunConfig and its sections (protocol, training, output), and
``incremental pretrain-mae``'s PretrainConfig."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal, Union

from ..errors import ConfigError
from .fields import MAX_BATCH, MAX_COUNT, MAX_DEPTH, MAX_EPOCHS, MAX_WIDTH, SEED_MAX, Component, component, component_list, opt


@dataclass
class MemoryConfig:
    """Exemplar memory budget: a fixed total (iCaRL: 2000), a fixed number per class
    (PODNet: 20), or a number of ``bytes``. Neither set means no memory.

    A byte budget counts every byte the memory keeps (pixels, codec weights, generator weights);
    ``codec`` decides how exemplars are stored under it (``incremental list codecs``), and so
    how many fit. Each class gets an equal share of the bytes, as ``total`` gives each an equal
    share of the exemplars."""

    total: int | None = opt(None, ge=0, le=MAX_COUNT)
    per_class: int | None = opt(None, ge=0, le=MAX_COUNT)
    bytes: float | None = opt(None, ge=1, le=1e12)  # a float, so YAML's 2.0e6 reads as written
    codec: Component = component("codecs", "raw")

    # Alternatives: a file that sets one (an extends: child) replaces the others.
    ALTERNATIVES: typing.ClassVar[tuple[str, ...]] = ("total", "per_class", "bytes")

    def validate(self) -> None:
        chosen = [k for k in self.ALTERNATIVES if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ConfigError(f"set one of total, per_class and bytes, not {' and '.join(chosen)}", key=chosen[-1])
        if self.codec is not None and self.codec.name != "raw" and self.bytes is None:
            raise ConfigError(f"codec {self.codec.name!r} stores exemplars under a byte budget: set "
                              f"protocol.memory.bytes", key="codec")


# named prompt-template sets, usable as entries of protocol.templates: open_clip's two, and the
# 18 CIFAR templates of OpenAI's CLIP (its prompt notebook; PROOF's utils/templates.json for
# cifar224 lists the same 18 in the same order), which open_clip does not ship
TEMPLATE_SETS = ("openai_imagenet", "simple_imagenet", "openai_cifar")
OPENAI_CIFAR_TEMPLATES = tuple(f"{prefix} {{}}." for prefix in (
    "a photo of a", "a blurry photo of a", "a black and white photo of a", "a low contrast photo of a",
    "a high contrast photo of a", "a bad photo of a", "a good photo of a", "a photo of a small",
    "a photo of a big", "a photo of the", "a blurry photo of the", "a black and white photo of the",
    "a low contrast photo of the", "a high contrast photo of the", "a bad photo of the", "a good photo of the",
    "a photo of the small", "a photo of the big"))


@dataclass
class LongTailConfig:
    """Long-tailed training data (imbalanced class-incremental learning: Liu et al. 2022's LT-CIL,
    the protocols of DGR, He 2024): the class at rank r of C keeps ``n_max x imbalance_ratio ^ (r /
    (C - 1))`` of its training images, floored (Cao et al. 2019's long-tailed CIFAR; n_max the
    largest class's count), a seeded random choice; the test set stays balanced. 1 keeps every
    image."""

    imbalance_ratio: float = opt(1.0, gt=0, le=1)  # the tail class's share of the head's (LT-CIL: 0.01)
    # ordered: the ranks follow the class order, so the first experiences hold the head classes
    # (Ordered LT-CIL); shuffled: the ranks are a random permutation from the order seed (Shuffled LT-CIL)
    order: Literal["ordered", "shuffled"] = "ordered"


@dataclass
class ProtocolConfig:
    """How the dataset's classes are split into experiences.

    ``initial_classes: 0`` is the B0 protocol (every experience has ``increment`` classes);
    ``initial_classes: 50`` is B50 (50 classes first, then ``increment`` per experience).
    ``increment`` may be a list for uneven steps; then it lists every experience after the
    initial one (or every experience, for B0) and must add up to the class count.

    ``class_order`` is ``random`` (a permutation drawn from ``order_seed``, as PyCIL does
    with numpy), ``sorted``, a named order (``incremental list protocols`` shows them), or
    an explicit list of class ids.
    """

    initial_classes: int = opt(0, ge=0, le=MAX_COUNT)
    increment: Union[int, list[int]] = opt(10, ge=1, le=MAX_COUNT)
    class_order: Union[str, list[int]] = opt("random", ge=0, le=MAX_COUNT)
    order_seed: int | None = opt(None, ge=0, le=SEED_MAX)
    memory: MemoryConfig = opt(factory=MemoryConfig)
    long_tail: LongTailConfig = opt(factory=LongTailConfig)
    # What a text encoder reads for each class (backbone: clip): "{}" is the class name (its
    # underscores read as spaces). Several templates are an ensemble (CLIP's prompt ensembling:
    # the mean of the normalised embeddings); openai_imagenet (80) and simple_imagenet (7) are
    # open_clip's sets, openai_cifar (18) CLIP's CIFAR set.
    templates: list[str] = opt(factory=lambda: ["a photo of a {}."])

    def validate(self) -> None:
        if self.increment == []:
            raise ConfigError("must not be empty", key="increment")
        if not self.templates:
            raise ConfigError("must list at least one template, e.g. 'a photo of a {}.'", key="templates")
        for i, template in enumerate(self.templates):
            if template not in TEMPLATE_SETS and template.count("{}") != 1:
                from ..errors import did_you_mean

                hint = did_you_mean(template, list(TEMPLATE_SETS)) or f"; or one of {', '.join(TEMPLATE_SETS)}"
                raise ConfigError(f"{template!r} needs one '{{}}' where the class name goes{hint}",
                                  key=f"templates.{i}")


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = opt(1e-3, gt=0, le=100)
    # LR for the first experience only (PyCIL's init_lr); None means ``lr``.
    initial_lr: float | None = opt(None, gt=0, le=100)
    weight_decay: float = opt(0.05, ge=0, le=10)
    # weight decay for the first experience only (PyCIL's init_weight_decay); None means ``weight_decay``
    initial_weight_decay: float | None = opt(None, ge=0, le=10)
    momentum: float = opt(0.9, ge=0, lt=1)  # SGD only
    # weights: timm's two groups, no decay on biases, norms and the tokens the model names in
    # no_weight_decay(); all: every parameter decays, as an optimizer built over
    # model.parameters() does (PyCIL's and PILOT's learners)
    weight_decay_on: Literal["weights", "all"] = "weights"


@dataclass
class SchedulerConfig:
    """Learning-rate schedule, restarted at every experience and stepped every iteration."""

    # epoch_quarter_cosine: the LR times cos(99 pi e / (200 (E - 1))) through epoch e of E, set once
    # an epoch (CODA-Prompt's and InfLoRA's CosineSchedule, which PILOT's coda_prompt runs too);
    # epoch_cosine: the half cosine 0.5 (1 + cos(pi e / E)) set once an epoch (torch's
    # CosineAnnealingLR stepped per epoch, as PILOT's learners step it); cosine: per iteration
    name: Literal["constant", "cosine", "step", "epoch_quarter_cosine", "epoch_cosine"] = "cosine"
    warmup_epochs: int = opt(0, ge=0, le=MAX_EPOCHS)
    milestones: list[int] = opt(factory=list, ge=0, le=MAX_EPOCHS)  # epochs, for ``step``
    gamma: float = opt(0.1, gt=0, le=1)
    min_lr_ratio: float = opt(0.0, ge=0, le=1)  # cosine floor, as a fraction of the LR


@dataclass
class TrainingConfig:
    epochs: int = opt(10, ge=1, le=MAX_EPOCHS)
    # Epochs of the first experience (PyCIL's init_epoch); None means ``epochs``.
    initial_epochs: int | None = opt(None, ge=1, le=MAX_EPOCHS)
    batch_size: int = opt(64, ge=1, le=MAX_BATCH)
    eval_batch_size: int = opt(256, ge=1, le=MAX_BATCH)
    label_smoothing: float = opt(0.0, ge=0, lt=1)
    optimizer: OptimizerConfig = opt(factory=OptimizerConfig)
    scheduler: SchedulerConfig = opt(factory=SchedulerConfig)
    # DataLoader worker processes (image folders: on the device data path they only read bytes);
    # auto: this machine's CPU cores per GPU (per local rank under torchrun), less one for the
    # training process
    num_workers: Union[int, Literal["auto"]] = opt(0, ge=0, le=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch's intra-op CPU threads for the run (None: torch's default, one per core). On a machine
    # shared with other jobs, fewer threads than cores avoids threads spinning against each other
    threads: int | None = opt(None, ge=1, le=1024)
    # fp32, or autocast to bf16 / fp16 (fp16 adds loss scaling); the forward pass only
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False  # NHWC model and inputs: faster convolutions on GPUs (conv models)
    # torch.compile of the backbone's training forward (a GPU option: no speed-up on CPUs):
    # true or "default"; "reduce-overhead" adds CUDA graphs; "max-autotune" searches kernels.
    # The head and evaluation stay eager, and training drops each epoch's last partial batch,
    # so neither a growing head nor a short batch recompiles.
    compile: Union[bool, Literal["default", "reduce-overhead", "max-autotune"]] = False
    # device: in-memory datasets (digits, synthetic, CIFAR) held on the device as uint8 and
    # augmented there in batches, and image folders read as bytes, decoded (nvJPEG) and augmented
    # there; loader: a DataLoader with per-sample transforms; auto: device on CUDA, loader on the CPU
    data_path: Literal["auto", "device", "loader"] = "auto"
    persistent_workers: bool = True  # with num_workers > 0: keep the workers between epochs
    prefetch_factor: int | None = opt(None, ge=1, le=1024)  # batches each worker loads ahead (None: torch's 2)
    # torch.use_deterministic_algorithms: bit-identical GPU runs at some speed cost (CPU runs
    # are bit-identical without it); an op with no deterministic kernel then raises an error.
    deterministic: bool = False
    # Pooled features of fixed image sets (each experience's test data, a strategy's feature
    # pass) reused while the network under the head is unchanged: a frozen backbone encodes each
    # image once per run. At most this many MB are held (least recently used dropped); 0: off.
    feature_cache_mb: int = opt(1024, ge=0, le=1 << 20)

    def validate(self) -> None:
        shortest = min(self.epochs, self.initial_epochs or self.epochs)
        if self.scheduler.warmup_epochs > shortest:
            which = "training.initial_epochs" if shortest != self.epochs else "training.epochs"
            raise ConfigError(f"{self.scheduler.warmup_epochs} warmup epochs exceed {which} ({shortest}): the LR "
                              f"would never finish warming up", key="scheduler.warmup_epochs")


@dataclass
class OutputConfig:
    root: str = "runs"  # run directories go here unless --out names one
    tensorboard: bool = True
    save_model: bool = True  # model.safetensors after each experience (for `incremental probe`)
    # checkpoint.pt after each experience, for --resume; all: also checkpoints/experience_XXX.pt
    checkpoint: Literal["last", "all", "off"] = "last"
    # Where each experience's figures go besides metrics.json: tensorboard (also switched by
    # `tensorboard` above), csv (metrics.csv, a row per experience), wandb (Weights & Biases:
    # pip install "incremental-vit[wandb]"; W&B's own settings, e.g. WANDB_MODE=offline), mlflow
    # (pip install "incremental-vit[mlflow]"; MLflow's own MLFLOW_TRACKING_URI: a server, a database,
    # or a file store with MLFLOW_ALLOW_FILE_STORE=true)
    loggers: list[Literal["tensorboard", "csv", "wandb", "mlflow"]] = opt(factory=lambda: ["tensorboard"])
    project: str = "incremental-vit"  # the W&B project, the MLflow experiment
    # W&B's run group, MLflow's parent run: `incremental sweep` sets it to the sweep's name
    group: str | None = None

    def validate(self) -> None:
        for i, logger in enumerate(self.loggers):
            if logger in self.loggers[:i]:
                raise ConfigError(f"{logger!r} is listed twice", key=f"loggers.{i}")
        for key in ("project", "group"):  # W&B's limit on project and group names
            value = getattr(self, key)
            if value is not None and not 1 <= len(value) <= 128:
                raise ConfigError(f"{len(value)} characters; a name of 1 to 128", key=key)


@dataclass
class RunConfig:
    name: str | None = None  # defaults to the config file's stem
    description: str = ""
    # Python files or modules imported before the rest is validated: they register their
    # own strategies, backbones, probes, datasets (see incremental/extensions.py)
    plugins: list[str] = opt(factory=list)
    seed: int = opt(0, ge=0, le=SEED_MAX)
    dataset: Component = component("datasets", "digits")
    protocol: ProtocolConfig = opt(factory=ProtocolConfig)
    backbone: Component = component("backbones", "vit")
    strategy: Component = component("strategies", "finetune")
    training: TrainingConfig = opt(factory=TrainingConfig)
    probes: list[Component] = component_list("probes")
    output: OutputConfig = opt(factory=OutputConfig)

    def validate(self) -> None:
        probe_labels(self.probes)


def probe_labels(specs: typing.Sequence[Component]) -> list[str]:
    """Results keys of the probes listed in ``probes:`` (``label``, else the name); a
    repeated key is an error."""
    labels: list[str] = []
    for i, spec in enumerate(specs):
        label = spec.common.label if spec.common is not None and spec.common.label else spec.name
        if label in labels:
            raise ConfigError(f"{label!r} is listed twice; give one a distinct 'label'", key=f"probes.{i}.label")
        labels.append(label)
    return labels


# ----------------------------------------------------------------------------- incremental pretrain-mae


@dataclass
class MAEOptions:
    """MAE's recipe; the decoder defaults are scaled down for small encoders
    (MAE's ViT-B decoder: 512 wide, 8 blocks, 16 heads)."""

    mask_ratio: float = opt(0.75, gt=0, lt=1)
    decoder_embed_dim: int = opt(128, ge=1, le=MAX_WIDTH)
    decoder_depth: int = opt(2, ge=1, le=MAX_DEPTH)
    decoder_num_heads: int = opt(4, ge=1, le=MAX_DEPTH)
    norm_pix_loss: bool = True
    epochs: int = opt(100, ge=1, le=MAX_EPOCHS)
    warmup_epochs: int = opt(5, ge=0, le=MAX_EPOCHS)
    batch_size: int = opt(64, ge=1, le=MAX_BATCH)
    base_lr: float = opt(1.5e-4, gt=0, le=100)  # lr = base_lr * batch_size / 256, as MAE
    weight_decay: float = opt(0.05, ge=0, le=10)
    classes: Literal["base", "all"] = "base"  # base: the protocol's first experience only

    def validate(self) -> None:
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ConfigError(f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                              f"decoder_num_heads {self.decoder_num_heads}", key="decoder_num_heads")


@dataclass
class PretrainConfig(RunConfig):
    """A run config plus ``mae:``; the strategy and probe sections are not used."""

    mae: MAEOptions = opt(factory=MAEOptions)
