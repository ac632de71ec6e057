"""The network every strategy trains: a registered backbone plus a growing classifier.

Backbones follow timm's contract: ``forward_features(x)`` returns the unpooled features,
``forward_head(x, pre_logits=True)`` pools them into ``num_features`` values. The head is
Avalanche's :class:`IncrementalClassifier`, which adds output units when an experience
brings new classes; Avalanche's model adaptation grows it before each experience.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..config import Component
from ..errors import ConfigError
from ..registry import BACKBONES


class IncrementalNet(nn.Module):
    """backbone -> pooled features -> IncrementalClassifier, with timm's method names."""

    def __init__(self, backbone: nn.Module, initial_classes: int):
        from avalanche.models import IncrementalClassifier

        super().__init__()
        self.backbone = backbone
        self.num_features: int = int(backbone.num_features)
        self.head = IncrementalClassifier(self.num_features, initial_out_features=initial_classes)
        self.build_report: dict[str, Any] = {}  # pretrained weights loaded, compression applied
        self.output_adapter: nn.Module | None = None  # see classify()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.backbone.forward_head(x, pre_logits=True)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The linear head's logits: what training (and every teacher) uses."""
        return self.forward_head(self.forward_features(x))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The run's classifier: the logits, passed through the strategy's ``output_adapter``
        when it has one (iCaRL's nearest class means, BiC's bias correction). Evaluation, the
        probes and `incremental probe` all classify with this, and the adapter's tensors are
        part of the state dict, so the saved model is the one behind the accuracy matrix."""
        return self.classify_pooled(self.pooled(x))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features the head and the output adapter act on."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def classify_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """:meth:`classify` from pooled features (cached ones, when the network is unchanged)."""
        logits = self.head(pooled)
        return logits if self.output_adapter is None else self.output_adapter(pooled, logits)

    @property
    def num_classes(self) -> int:
        return int(self.head.classifier.out_features)

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{name}" for name in (inner() if callable(inner) else ())}


class NearestMeanOutput(nn.Module):
    """iCaRL's nearest-mean-of-exemplars classifier: minus the Euclidean distance of the
    L2-normalised pooled features to each class mean, as Avalanche's NCMClassifier computes it."""

    def __init__(self, means: torch.Tensor):
        super().__init__()
        self.register_buffer("means", means)

    def forward(self, pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        features = pooled / pooled.norm(dim=1, keepdim=True)
        return -torch.cdist(self.means.to(features.dtype), features).T


class BiasCorrectionOutput(nn.Module):
    """BiC's bias layer (Wu et al. 2019): ``alpha * logit + beta`` on the classes of the latest
    corrected experience, as Avalanche's BiasLayer computes it."""

    def __init__(self, classes: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):
        super().__init__()
        self.register_buffer("classes", classes.long())
        self.register_buffer("alpha", alpha.detach().clone().reshape(1))
        self.register_buffer("beta", beta.detach().clone().reshape(1))

    def forward(self, pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        alpha, beta = torch.ones_like(logits), torch.zeros_like(logits)
        alpha[:, self.classes] = self.alpha.to(logits.dtype)
        beta[:, self.classes] = self.beta.to(logits.dtype)
        return alpha * logits + beta


class PrototypeOutput(nn.Module):
    """A class-prototype classifier over the pooled features (SimpleCIL, APER, EASE): cosine
    similarity to each prototype times ``scale`` (PILOT's CosineLinear, sigma 1), or minus the
    Euclidean distance. A prototype of zeros (a class not seen yet) scores 0 under cosine."""

    def __init__(self, prototypes: torch.Tensor, metric: str = "cosine", scale: float = 1.0):
        super().__init__()
        self.register_buffer("prototypes", prototypes)
        self.register_buffer("euclidean", torch.tensor(metric == "euclidean"))
        self.register_buffer("scale", torch.tensor(float(scale)))

    @property
    def metric(self) -> str:
        return "euclidean" if bool(self.euclidean) else "cosine"

    def forward(self, pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        prototypes = self.prototypes.to(pooled.dtype)
        if bool(self.euclidean):
            return -torch.cdist(pooled, prototypes)
        return F.linear(F.normalize(pooled, dim=1), F.normalize(prototypes, dim=1)) * self.scale


class RandomProjectionOutput(nn.Module):
    """RanPAC's classifier (McDonnell et al. 2023) over ``h = ReLU(f W_rand)``, with W from the
    ridge regression of :class:`incremental.strategies.ranpac.RanPAC`: ``cos(h, W_c)`` (``cosine``,
    the CosineLinear that RanPAC's and PILOT's code put the ridge weights in) or ``h W^T``; fp32."""

    def __init__(self, projection: torch.Tensor, weights: torch.Tensor, cosine: bool = False):
        super().__init__()
        self.register_buffer("projection", projection)
        self.register_buffer("weights", weights)
        self.register_buffer("cosine", torch.tensor(bool(cosine)))

    def forward(self, pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(pooled.float() @ self.projection.float())
        if bool(self.cosine):
            return F.linear(F.normalize(hidden, dim=1), F.normalize(self.weights.float(), dim=1))
        return hidden @ self.weights.float().T


class AnalyticOutput(nn.Module):
    """The analytic-learning classifiers (ACIL, DS-AL) over the random expansion
    ``z = f expansion^T``: ``ReLU(z) main^T``, plus ``ratio tanh(z) compensation^T`` (DS-AL's
    second stream) when given. fp64 as the references compute it; logits in fp32."""

    def __init__(self, expansion: torch.Tensor, main: torch.Tensor, compensation: torch.Tensor | None = None,
                 compensation_ratio: float = 0.0):
        super().__init__()
        self.register_buffer("expansion", expansion)
        self.register_buffer("main", main)
        if compensation is not None:
            self.register_buffer("compensation", compensation)
            self.register_buffer("compensation_ratio", torch.tensor(float(compensation_ratio), dtype=torch.float64))

    def forward(self, pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        expanded = pooled.to(self.expansion.dtype) @ self.expansion.T
        out = torch.relu(expanded) @ self.main.T
        if hasattr(self, "compensation"):
            out = out + self.compensation_ratio * (torch.tanh(expanded) @ self.compensation.T)
        return out.float()


class MahalanobisOutput(nn.Module):
    """FeCAM's classifier (PILOT's ``_mahalanobis``): class c scores minus
    ``(f^ - mu^_c) precisions_c (f^ - mu^_c)^T``, f^ and mu^_c the L2-normalised pooled feature
    (``f ** tukey_power`` first, when set) and class mean."""

    def __init__(self, class_means: torch.Tensor, precisions: torch.Tensor, tukey_power: float | None = None):
        super().__init__()
        self.register_buffer("class_means", class_means)
        self.register_buffer("precisions", precisions)
        # 0 for none (a power must be positive): a NaN would make equal models compare unequal
        self.register_buffer("tukey_power", torch.tensor(0.0 if tukey_power is None else float(tukey_power)))

    def forward(self, pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        features = pooled.float()
        if float(self.tukey_power) > 0:
            features = features.clamp_min(0).pow(self.tukey_power)
        difference = F.normalize(features, dim=1)[:, None, :] - F.normalize(self.class_means.float(), dim=1)[None]
        return -torch.einsum("ncd,cde,nce->nc", difference, self.precisions.float(), difference)


class SubspaceReweightOutput(nn.Module):
    """EASE's test-time classifier (PILOT's ``forward_reweight``): the pooled feature and each
    prototype cut into subspaces of ``dim`` values; class c scores
    ``sum_s class_weights[c, s] cos(x_s, p_c,s)``. (PILOT multiplies by its head's sigma too,
    one positive number for every class, which no argmax sees.)"""

    def __init__(self, prototypes: torch.Tensor, class_weights: torch.Tensor, dim: int):
        super().__init__()
        self.register_buffer("prototypes", prototypes)
        self.register_buffer("class_weights", class_weights)
        self.register_buffer("dim", torch.tensor(int(dim)))

    def forward(self, pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        sets, dim = self.class_weights.shape[1], int(self.dim)
        features = F.normalize(pooled.view(len(pooled), sets, dim), dim=2)
        prototypes = F.normalize(self.prototypes.to(pooled.dtype).view(len(self.prototypes), sets, dim), dim=2)
        cosines = torch.einsum("bsd,csd->bcs", features, prototypes)
        return (cosines * self.class_weights.to(cosines.dtype)).sum(dim=2)


class MaxSoftmaxOutput(nn.Module):
    """LAE's test-time ensemble: the logits hold ``members`` blocks of class scores (one shared
    head on each member's features, :class:`~incremental.strategies.pretrained.SharedHeadClassifier`);
    a class scores ``log max_m softmax(logits_m)``, floored at the smallest positive float so that
    no score is -inf."""

    def __init__(self, members: int):
        super().__init__()
        self.register_buffer("members", torch.tensor(int(members)))

    def forward(self, pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        probabilities = logits.view(len(logits), int(self.members), -1).float().softmax(dim=-1).amax(dim=1)
        return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log().to(logits.dtype)


class AdapterRetrievalOutput(nn.Module):
    """MOS's test-time classifier (PILOT's ``_eval_cnn``). The pooled features hold one block of
    ``d`` per adapter set (set 0 first) and the logits one block of class scores per set (the
    shared head on each). The cosine to the class prototypes (set 0's features) picks a class,
    whose experience names the set to read; the head's prediction on that set's features names
    the next, for at most ``rounds`` reads or until the set stays the same (self-refined
    retrieval). With ``ensemble`` a class scores ``log((softmax(l) + softmax((t + 1) cos)) / 2)``,
    ``l`` the last read's logits and ``t + 1`` the experiences seen; else ``l``. Classes not seen
    yet score the floor."""

    def __init__(self, prototypes: torch.Tensor, class_tasks: torch.Tensor, rounds: int = 4, ensemble: bool = True):
        super().__init__()
        self.register_buffer("prototypes", prototypes)
        self.register_buffer("class_tasks", class_tasks.long())
        self.register_buffer("rounds", torch.tensor(int(rounds)))
        self.register_buffer("ensemble", torch.tensor(bool(ensemble)))

    def retrieve(self, set_logits: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """The logits of the last set read per image, starting from set ``first`` (B,)."""
        rows = torch.arange(len(first), device=first.device)
        current, final = first.clone(), set_logits[rows, first]
        active = torch.ones_like(first, dtype=torch.bool)
        for read in range(1, int(self.rounds) + 1):
            logits = set_logits[rows, current]
            final = torch.where(active.unsqueeze(1), logits, final)
            proposed = self.class_tasks[logits.argmax(dim=1)]
            active &= (proposed != current) & (read < int(self.rounds))
            current = torch.where(active, proposed, current)
        return final

    def forward(self, pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        seen, width = len(self.class_tasks), self.prototypes.shape[1]
        sets = pooled.shape[1] // width
        set_logits = logits.view(len(logits), sets, -1)[:, :, :seen].float()
        cosine = F.normalize(pooled[:, :width].float(), dim=1) @ F.normalize(self.prototypes.float(), dim=1).T
        final = self.retrieve(set_logits, self.class_tasks[cosine.argmax(dim=1)])
        if bool(self.ensemble):
            tasks = int(self.class_tasks.max()) + 1
            final = ((final.softmax(dim=1) + (cosine * tasks).softmax(dim=1)) / 2).clamp_min(
                torch.finfo(final.dtype).tiny).log()
        floor = min(float(final.min()) - 1.0, math.log(torch.finfo(final.dtype).tiny))  # below every seen class
        out = torch.full((len(logits), logits.shape[1] // sets), floor, dtype=final.dtype, device=final.device)
        out[:, :seen] = final
        return out.to(logits.dtype)


# Output adapters by the buffers they hold: a saved state dict names its adapter this way.
OUTPUT_ADAPTERS: dict[frozenset[str], Any] = {
    frozenset({"means"}): lambda t: NearestMeanOutput(t["means"]),
    frozenset({"classes", "alpha", "beta"}): lambda t: BiasCorrectionOutput(t["classes"], t["alpha"], t["beta"]),
    frozenset({"prototypes", "euclidean", "scale"}): lambda t: PrototypeOutput(
        t["prototypes"], "euclidean" if bool(t["euclidean"]) else "cosine", float(t["scale"])),
    # saved before RanPAC had a cosine classifier: linear
    frozenset({"projection", "weights"}): lambda t: RandomProjectionOutput(t["projection"], t["weights"]),
    frozenset({"projection", "weights", "cosine"}): lambda t: RandomProjectionOutput(
        t["projection"], t["weights"], bool(t["cosine"])),
    frozenset({"expansion", "main"}): lambda t: AnalyticOutput(t["expansion"], t["main"]),
    frozenset({"expansion", "main", "compensation", "compensation_ratio"}): lambda t: AnalyticOutput(
        t["expansion"], t["main"], t["compensation"], float(t["compensation_ratio"])),
    frozenset({"class_means", "precisions", "tukey_power"}): lambda t: MahalanobisOutput(
        t["class_means"], t["precisions"], float(t["tukey_power"]) or None),
    frozenset({"prototypes", "class_weights", "dim"}): lambda t: SubspaceReweightOutput(
        t["prototypes"], t["class_weights"], int(t["dim"])),
    frozenset({"members"}): lambda t: MaxSoftmaxOutput(int(t["members"])),
    frozenset({"prototypes", "class_tasks", "rounds", "ensemble"}): lambda t: AdapterRetrievalOutput(
        t["prototypes"], t["class_tasks"], int(t["rounds"]), bool(t["ensemble"])),
}


def load_trained_state(model: IncrementalNet, state: dict[str, torch.Tensor], num_classes: int) -> None:
    """Load a saved state dict (model.safetensors, a checkpoint) into a freshly built model:
    the head grown to ``num_classes``, the output adapter rebuilt from its tensors, then a
    strict load (a RuntimeError when the state is of another model)."""
    grow_head(model, num_classes)
    prefix = "output_adapter."
    tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    model.output_adapter = None
    if tensors:
        build = OUTPUT_ADAPTERS.get(frozenset(tensors))
        if build is None and "batch_fusion" in tensors:  # PROOF's, whose tensors grow per experience
            from .proof import ProofOutput

            build = ProofOutput.from_state
        if build is None:
            raise RuntimeError(f"Unexpected output adapter tensors:\n{sorted(tensors)}")
        model.output_adapter = build(tensors).to(next(model.parameters()).device)
    model.load_state_dict(state, strict=True)


def classify(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model.classify(x)`` where the model has the run's classifier, else ``model(x)``."""
    method = getattr(model, "classify", None)
    return method(x) if callable(method) else model(x)


def grow_head(model: IncrementalNet, num_classes: int) -> None:
    """Give the classifier ``num_classes`` outputs, as Avalanche's adaptation would after
    the experiences that brought them (used before loading a saved model's weights)."""
    head = model.head
    if head.classifier.out_features == num_classes:
        return
    head.classifier = nn.Linear(head.classifier.in_features, num_classes).to(head.classifier.weight.device)
    if hasattr(head, "active_units"):
        head.register_buffer("active_units", torch.zeros(num_classes, dtype=torch.int8))


def frozen(module: nn.Module) -> nn.Module:
    """``module`` as a teacher: eval mode (fixed BatchNorm statistics, no dropout or drop
    path) and no gradients. Returns the same module."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@torch.no_grad()
def head_norm_ratio(model: nn.Module, label_ranges: list[range], step: int) -> float | None:
    """Mean L2 norm of the classifier rows of experience ``step``'s classes over that of the
    older classes: ViTIL's (and BiC's, WA's) measure of the bias toward new classes."""
    head = getattr(getattr(model, "head", None), "classifier", None)
    if step == 0 or not isinstance(head, nn.Linear):
        return None
    norms = head.weight.norm(dim=1)
    new = norms[label_ranges[step].start:label_ranges[step].stop]
    old = norms[:label_ranges[step].start]
    return float(new.mean() / old.mean()) if len(new) and len(old) else None


def resolve_backbone_weights(spec: Component, key: str = "backbone") -> Any:
    """The :class:`~.hub.NamedWeights` that ``spec``'s ``pretrained`` names (from the Hugging
    Face cache, or downloaded); None for a local file or no weights."""
    options = spec.common
    if options is None or not options.pretrained:
        return None
    from .hub import resolve_weights, weights_kind

    if options.pretrained_tag and weights_kind(options.pretrained, spec.name):
        raise ConfigError(f"pretrained_tag describes a local weights file; {options.pretrained!r} is a name that "
                          f"carries its own", key=f"{key}.pretrained_tag")
    return resolve_weights(options.pretrained, spec.name, spec.config, key=f"{key}.pretrained")


def build_backbone(spec: Component, *, in_chans: int, img_size: int, key: str = "backbone",
                   report: dict[str, Any] | None = None, weights: Any = None) -> nn.Module:
    """The registered backbone ``spec`` with its ``pretrained`` weights loaded and its
    structural compression applied; ``key`` is its place in the config, for errors, and
    ``report`` (if given) receives what loading and compressing did. ``weights``: the
    resolved name, when the caller resolved it already."""
    entry = BACKBONES.get(spec.name)
    options = spec.common
    weights = weights or resolve_backbone_weights(spec, key)
    extra: dict[str, Any] = {}
    parameters = inspect.signature(entry.obj).parameters
    if options is not None and "pretrained_tag" in parameters:
        extra["pretrained_tag"] = options.pretrained_tag  # a builder that reads the tag (clip: the activation)
    if "weights" in parameters:
        extra["weights"] = weights  # a builder whose architecture or activation a name sets (clip)
    try:
        backbone = entry.obj(spec.config, in_chans=in_chans, img_size=img_size, **extra)
    except ConfigError as exc:
        if exc.key and not exc.key.startswith(key + "."):
            exc.key = f"{key}.{exc.key}"
        raise
    for attr in ("forward_features", "forward_head", "num_features"):
        if not hasattr(backbone, attr):
            raise TypeError(f"backbone {spec.name!r} lacks {attr!r} (timm's contract)")
    if options is None:
        return backbone
    if options.pretrained:
        from .pretrained import load_pretrained

        loaded = load_pretrained(backbone, weights.path if weights else options.pretrained, key=f"{key}.pretrained")
        if report is not None:
            report["pretrained"] = {**loaded, "tag": options.pretrained_tag,
                                    **({"named": weights.record()} if weights else {})}
    compress = options.compress
    if compress.structural or compress.quantize != "none":
        from .compress import compress_backbone

        size = getattr(spec.config, "img_size", None) or img_size
        example = torch.randn(1, in_chans, size, size)
        compressed = compress_backbone(backbone, compress, example)
        if report is not None:
            report["compression"] = compressed
    return backbone


def build_model(spec: Component, *, in_chans: int, img_size: int, initial_classes: int,
                weights: Any = None) -> IncrementalNet:
    """The backbone plus the growing head; ``model.build_report`` says what was loaded and
    how the backbone was compressed."""
    report: dict[str, Any] = {}
    backbone = build_backbone(spec, in_chans=in_chans, img_size=img_size, report=report, weights=weights)
    report["params"] = count_parameters(backbone)
    model = IncrementalNet(backbone, initial_classes)
    model.build_report = report
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(model: Any) -> str:
    return f"{type(model.backbone).__name__}, {count_parameters(model) / 1e6:.2f}M parameters"


def describe_build(report: dict[str, Any]) -> list[str]:
    """Lines saying which weights were loaded and what compression did (sizes before/after)."""
    lines = []
    loaded = report.get("pretrained")
    if loaded:
        resized = f", resized {', '.join(loaded['resized'])}" if loaded["resized"] else ""
        renamed = f", {', '.join(loaded['renamed'])}" if loaded.get("renamed") else ""
        named = loaded.get("named")
        tag = f" ({loaded['tag']})" if loaded.get("tag") else ""
        if named:  # the name, and the repository snapshot it resolved to
            tag = f" ({named['name']}: {named['repo_id']}@{(named['revision'] or '?')[:12]})"
        lines.append(f"pretrained: {loaded['tensors']} tensors from {loaded['path']}{tag}, sha256 "
                     f"{loaded['sha256'][:12]}...{resized}{renamed}")
    compression = report.get("compression")
    if compression:
        for label in ("before", "after", "int8"):
            if label in compression:
                p = compression[label]
                lines.append(f"backbone {label:>6}: {p['params'] / 1e6:.3f}M params, {p['macs'] / 1e6:.1f}M MACs, "
                             f"{p['size_bytes'] / 2 ** 20:.2f} MiB, {p.get('cpu_latency_ms', float('nan')):.2f} ms/image (CPU)")
    return lines
