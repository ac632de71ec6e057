"""The built-in probes: their options, where each probe lives, and the options every probe
takes (``num_samples``, ``batch_size``, ``every``, ``label``).

Declared here, apart from the probes, so that listing and validating a config never imports
torch: the registry imports a probe's module only when a run builds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..config.fields import MAX_BATCH, MAX_COUNT, Component, opt
from ..errors import ConfigError, did_you_mean
from ..registry import PROBES


@dataclass
class ProbeOptions:
    """Options every probe takes, next to its own."""

    num_samples: int | None = opt(None, ge=1, le=MAX_COUNT)  # seen-class test images per step; None: the probe's default
    batch_size: int = opt(250, ge=1, le=MAX_BATCH)
    every: int = opt(1, ge=1, le=MAX_COUNT)  # probe after every k-th experience; the last one is always probed
    label: str | None = None  # the results key (default: the probe's name); needed to list a probe twice


# ----------------------------------------------------------------------------- the built-ins

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
ParameterSet = Literal["auto", "imagenet", "tiny", "cifar"]
Score = Literal["msp", "max_logit", "energy"]
MAX_STEPS = 100_000  # attack iterations


@dataclass
class CorruptionsConfig:
    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTIONS))
    severities: list[int] = opt(factory=lambda: list(SEVERITIES), ge=1, le=5)
    parameters: ParameterSet = "auto"  # severity tables: ImageNet-C, Tiny-ImageNet-C, CIFAR-10-C, or by image size
    # A finished run (its directory or metrics.json) with the same corruptions probe: its
    # errors at the same step are the denominators of the corruption errors (mCE).
    reference: str | None = None

    def validate(self) -> None:
        for i, name in enumerate(self.corruptions):
            if name not in CORRUPTIONS:
                raise ConfigError(f"unknown corruption {name!r}{did_you_mean(name, CORRUPTIONS)}; known: "
                                  f"{', '.join(CORRUPTIONS)}", key=f"corruptions.{i}")
        if not self.corruptions or not self.severities:
            raise ConfigError("must list at least one corruption and one severity", key="corruptions")


@dataclass
class MaskingConfig:
    fractions: list[float] = opt(factory=lambda: [0.05, 0.1, 0.2, 0.5], gt=0, lt=1)
    patch_drop: bool = True  # also drop that fraction of token-grid patches (token models only)
    fill: Literal["zero", "mean"] = "zero"  # masked pixels: black, or each image's mean


@dataclass
class FourierConfig:
    # L2 norm of the perturbation of each channel; None: 4.0 up to 64 px (Yin et al.'s
    # CIFAR-10 value), 15.7 above (their ImageNet value).
    eps: float | None = opt(None, gt=0, le=1000)
    stride: int = opt(1, ge=1, le=1024)  # probe every stride-th frequency along each axis (large images)


@dataclass
class AdversarialConfig:
    # budgets in [0, 1] pixel units: 1/255, 2/255, 4/255, 8/255 for L-inf
    linf_eps: list[float] = opt(factory=lambda: [1 / 255, 2 / 255, 4 / 255, 8 / 255], gt=0, le=1)
    l2_eps: list[float] = opt(factory=lambda: [0.125, 0.25, 0.5], gt=0, le=1000)
    steps: int = opt(10, ge=1, le=MAX_STEPS)
    step_size: float | None = opt(None, gt=0, le=1000)  # None: 2.5 eps / steps (Madry et al.)
    random_start: bool = True

    def validate(self) -> None:
        if not self.linf_eps and not self.l2_eps:
            raise ConfigError("list at least one budget in linf_eps or l2_eps", key="linf_eps")


@dataclass
class DctSpectrumConfig:
    attacks: list[Literal["pgd", "deepfool"]] = field(default_factory=lambda: ["pgd", "deepfool"])
    norm: Literal["linf", "l2"] = "linf"  # PGD's budget
    eps: float = opt(4 / 255, gt=0, le=1000)
    steps: int = opt(10, ge=1, le=MAX_STEPS)
    deepfool_candidates: int = opt(10, ge=2, le=100_000)  # classes DeepFool considers (the top ones)
    deepfool_iterations: int = opt(50, ge=1, le=MAX_STEPS)


@dataclass
class OodConfig:
    """OOD detection, and its worst case. The default attack (L-inf 4/255, PGD-10, one start)
    is this toolkit's cheap choice for every step; it is much weaker than the references', so
    its worst-case AUROC is an optimistic upper bound. ``preset: at_ebm`` is the adversarial-
    training OOD evaluation: APGD with the cross-entropy loss (torchattacks' APGD), L2, eps 1.0
    at 32 px, 100 iterations, 5 restarts."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "at_ebm": {"worst_case": True, "attack": "apgd_ce", "norm": "l2", "eps": 1.0, "steps": 100, "restarts": 5},
    }

    preset: Literal["at_ebm"] | None = None
    source: Literal["future", "dataset"] = "future"
    # for source: dataset, a dataset section ({name: cifar100, root: ...}); its test images
    # are resized and converted to the run's size and channels
    dataset: Component | None = field(default=None, metadata={"registry": "datasets", "default_name": None})
    scores: list[Score] = field(default_factory=lambda: ["msp", "max_logit", "energy"])
    # logits: the run's classifier; text (backbone: clip): the cosine similarity to the seen
    # classes' text embeddings (the protocol's templates) over ``temperature``, as MCM (Ming et
    # al. 2022) scores OOD with a vision-language model; msp on these is MCM's score
    head: Literal["logits", "text"] = "logits"
    # head: text only. MCM's softmax(cos / T) uses T = 1 (its detection_util); CLIP's own logit
    # scale (about 100) would be T = 0.01, which makes MSP nearly 1 on everything
    temperature: float = opt(1.0, gt=0, le=1000)
    worst_case: bool = False
    # pgd: the toolkit's (Madry et al.); apgd_ce: torchattacks' APGD (Croce and Hein 2020) on the
    # cross-entropy of [0, score], which rises with the score: `pip install --no-deps torchattacks`
    attack: Literal["pgd", "apgd_ce"] = "pgd"
    norm: Literal["linf", "l2"] = "linf"
    eps: float = opt(4 / 255, gt=0, le=1000)
    steps: int = opt(10, ge=1, le=MAX_STEPS)
    restarts: int = opt(1, ge=1, le=100)  # random starts; each image keeps its highest score

    def validate(self) -> None:
        if self.source == "dataset" and self.dataset is None:
            raise ConfigError("source: dataset needs a 'dataset' section", key="dataset")
        if self.source == "future" and self.dataset is not None:
            raise ConfigError("'dataset' is only read with source: dataset", key="dataset")
        if not self.scores:
            raise ConfigError("list at least one score", key="scores")
        if self.head != "text" and self.temperature != 1.0:
            raise ConfigError("the temperature divides the text head's cosine similarities; "
                              "it needs head: text", key="temperature")


# What `incremental probe` runs when neither the run nor --set names probes, and what
# protocols/digits_b0_5steps_probes.yaml lists.
DEFAULT_SUITE = ("corruptions", "masking", "ood")

PROBES.declare("corruptions", "incremental.probes.corruptions:CorruptionsProbe", config=CorruptionsConfig,
               summary="Accuracy under the 15 ImageNet-C corruptions at 5 severities; mCE against a reference run.")
PROBES.declare("masking", "incremental.probes.masking:MaskingProbe", config=MaskingConfig,
               summary="Accuracy with a CutOut hole of each area fraction, and with randomly dropped patches.")
PROBES.declare("fourier", "incremental.probes.fourier:FourierProbe", config=FourierConfig,
               summary="Error rate under Fourier-basis noise at each frequency (a heat map), and per band.")
PROBES.declare("adversarial", "incremental.probes.adversarial:AdversarialProbe", config=AdversarialConfig,
               summary="Accuracy under PGD attacks (L-inf and L2) at each budget.")
PROBES.declare("dct_spectrum", "incremental.probes.adversarial:DctSpectrumProbe", config=DctSpectrumConfig,
               summary="DCT energy of PGD and DeepFool perturbations: heat maps and the share per frequency band.")
PROBES.declare("ood", "incremental.probes.ood:OodProbe", config=OodConfig,
               summary="OOD detection: AUROC and FPR at 95% TPR of MSP, max-logit and energy scores.")
