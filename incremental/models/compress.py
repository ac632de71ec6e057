"""Compressed backbones: structured pruning, SVD low-rank, int8 dynamic quantization, and
feature distillation from a larger teacher; with the size/speed profile before and after.

Pruning and low-rank factorization change the backbone once, when it is built (after any
``pretrained:`` weights are loaded), so every strategy trains the smaller network. They
touch only what lies inside the backbone's blocks: residual widths and ``num_features``
stay, and the incremental head keeps growing as before. Quantization applies to a copy
used for evaluation; distillation adds a loss during training (both are plugins).
"""

from __future__ import annotations

import copy
import io
import math
import statistics
import time
import warnings
from typing import Any

import torch
from torch import nn

from .options import CompressConfig, LowRankConfig, PruneConfig


def pooled_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's contract: unpooled features, then the pooled ``num_features`` vector."""
    return backbone.forward_head(backbone.forward_features(x), pre_logits=True)


class _PooledFeatures(nn.Module):
    """A backbone as a module whose output is its pooled features (what tracing needs)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.backbone, x)


def _attention_modules(backbone: nn.Module) -> list[nn.Module]:
    """timm attention layers (ViT's Attention, Swin's WindowAttention): a fused qkv Linear."""
    return [m for m in backbone.modules() if isinstance(getattr(m, "qkv", None), nn.Linear)
            and hasattr(m, "num_heads")]


def prune_backbone(backbone: nn.Module, cfg: PruneConfig, example: torch.Tensor) -> dict[str, int]:
    """Remove ``cfg.ratio`` of the channels of every prunable group inside the blocks.

    torch-pruning traces the dependency graph and prunes coupled layers together. A group
    that cuts the output of more than one Conv/Linear layer is a residual stream (block
    outputs added together); it is left whole, so residual widths and the pooled features
    keep their size. Attention keeps its head count and loses head dimensions.
    """
    try:
        import torch_pruning as tp
    except ImportError:
        from ..errors import ConfigError

        raise ConfigError("pruning needs torch-pruning: pip install torch-pruning "
                          "(or the toolkit's [compress] extra)", key="backbone.compress.prune") from None
    importance = {"l2": tp.importance.GroupMagnitudeImportance(p=2),
                  "l1": tp.importance.GroupMagnitudeImportance(p=1),
                  "random": tp.importance.RandomImportance()}[cfg.importance]
    attention = _attention_modules(backbone)
    was_training = backbone.training
    backbone.eval()
    wrapped = _PooledFeatures(backbone)
    width = pooled_features(backbone, example).shape[-1]
    # Raw parameters (tokens, position tables, Swin's relative-position tables, DLCL's layer
    # weights) stay whole: torch-pruning would guess a dimension for them (the last
    # non-singleton one, which for a one-head Swin table is the table itself).
    standard = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
    raw = [p for m in backbone.modules() if not isinstance(m, standard) for p in m.parameters(recurse=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning explains its guesses about raw parameters
        pruner = tp.pruner.MetaPruner(
            wrapped, example, importance=importance, pruning_ratio=cfg.ratio, round_to=cfg.round_to,
            ignored_layers=raw,
            num_heads={m.qkv: m.num_heads for m in attention}, prune_num_heads=False, prune_head_dims=True)
        pruned = skipped = 0
        for group in pruner.step(interactive=True):
            outputs = [dep for dep, _ in group if pruner.DG.is_out_channel_pruning_fn(dep.handler)
                       and isinstance(dep.target.module, (nn.Conv2d, nn.Linear))]
            if len(outputs) > 1:
                skipped += 1
                continue
            group.prune()
            pruned += 1
    for m in attention:
        # timm reshapes q, k, v with these; keep them true to the pruned qkv layer
        m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        if hasattr(m, "attn_dim"):
            m.attn_dim = m.head_dim * m.num_heads
        if hasattr(m, "scale"):
            m.scale = m.head_dim ** -0.5
    after = pooled_features(backbone, example).shape[-1]  # still in eval mode
    backbone.train(was_training)
    if after != width:  # pragma: no cover - the residual rule above should prevent it
        raise RuntimeError(f"pruning changed the feature width {width} -> {after}")
    return {"groups_pruned": pruned, "residual_groups_kept": skipped}


class LowRankLinear(nn.Sequential):
    """W (out x in) as B @ A with A: in -> rank (no bias) and B: rank -> out."""

    def __init__(self, linear: nn.Linear, rank: int):
        down = nn.Linear(linear.in_features, rank, bias=False)
        up = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(linear.weight.float(), full_matrices=False)
            root = s[:rank].sqrt()
            down.weight.copy_((root[:, None] * vh[:rank]).to(linear.weight.dtype))
            up.weight.copy_((u[:, :rank] * root[None, :]).to(linear.weight.dtype))
            if linear.bias is not None:
                up.bias.copy_(linear.bias)
        super().__init__(down, up)
        self.in_features, self.out_features, self.rank = linear.in_features, linear.out_features, rank


def low_rank_rank(weight: torch.Tensor, cfg: LowRankConfig) -> int:
    full = min(weight.shape)
    if cfg.energy is None:
        return max(1, math.ceil(cfg.rank_ratio * full))
    s = torch.linalg.svdvals(weight.float())
    cumulative = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    return int(torch.searchsorted(cumulative, torch.tensor(cfg.energy)).item()) + 1


@torch.no_grad()
def low_rank_backbone(backbone: nn.Module, cfg: LowRankConfig) -> dict[str, int]:
    """Replace each Linear whose factorization is smaller by :class:`LowRankLinear`."""
    replaced = kept = 0
    for parent in list(backbone.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or isinstance(parent, LowRankLinear):
                continue
            if min(child.in_features, child.out_features) < cfg.min_features:
                kept += 1
                continue
            rank = low_rank_rank(child.weight, cfg)
            if rank * (child.in_features + child.out_features) >= child.in_features * child.out_features:
                kept += 1  # factorizing would not save parameters
                continue
            setattr(parent, name, LowRankLinear(child, rank))
            replaced += 1
    return {"linear_factorized": replaced, "linear_kept": kept}


def quantize_int8(module: nn.Module) -> nn.Module:
    """A CPU copy with int8 dynamic quantization of every Linear (weights int8, activations
    quantized per batch), as torch's eager dynamic quantization does."""
    from torch.ao.quantization import quantize_dynamic

    clone = copy.deepcopy(module).cpu().eval()
    with warnings.catch_warnings():
        # torch >= 2.9 marks torch.ao.quantization deprecated in favour of torchao; it still works.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.ao.quantization")
        warnings.filterwarnings("ignore", category=UserWarning, message=".*quantize_per_tensor")
        return quantize_dynamic(clone, {nn.Linear}, dtype=torch.qint8)


def count_macs(backbone: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass to the pooled features (torch's FLOP counter
    counts matmuls and convolutions, 2 FLOPs per MAC; as fvcore, which the papers used)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = backbone.training
    backbone.eval()
    # The counter does not see inside CPU fused attention; timm's unfused path is the same
    # arithmetic as explicit matmuls, which the papers' counts include.
    fused = [m for m in backbone.modules() if getattr(m, "fused_attn", False)]
    for m in fused:
        m.fused_attn = False
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            pooled_features(backbone, example)
    finally:
        for m in fused:
            m.fused_attn = True
        backbone.train(was_training)
    return counter.get_total_flops() // 2 // example.shape[0]


def state_dict_bytes(module: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()


@torch.no_grad()
def cpu_latency_ms(module: nn.Module, example: torch.Tensor, runs: int = 20) -> float:
    """Median wall time of one forward pass at batch size 1 on the CPU (after 3 warm-ups)."""
    was_training = module.training
    module.eval()
    single = example[:1].cpu()
    for _ in range(3):
        pooled_features(module, single)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        pooled_features(module, single)
        times.append(time.perf_counter() - start)
    module.train(was_training)
    return 1000 * statistics.median(times)


def profile_backbone(backbone: nn.Module, example: torch.Tensor, *, latency: bool = True,
                     macs: int | None = None) -> dict[str, Any]:
    """Parameters, MACs per image, serialized size and CPU latency of ``backbone``."""
    params = sum(p.numel() for p in backbone.parameters())
    # quantized Linear layers keep their weights in packed params, not parameters()
    packed = sum(m.weight().numel() + (m.bias().numel() if m.bias() is not None else 0)
                 for m in backbone.modules()
                 if type(m).__name__ == "Linear" and type(m).__module__.startswith("torch.ao.nn.quantized"))
    device = next(iter(backbone.parameters()), torch.empty(0)).device
    cpu_model = backbone if device.type == "cpu" else copy.deepcopy(backbone).cpu()
    profile = {
        "params": params + packed,
        "macs": macs if macs is not None else count_macs(cpu_model, example.cpu()),
        "size_bytes": state_dict_bytes(cpu_model),
    }
    if latency:
        profile["cpu_latency_ms"] = round(cpu_latency_ms(cpu_model, example), 3)
    return profile


def compress_backbone(backbone: nn.Module, cfg: CompressConfig, example: torch.Tensor) -> dict[str, Any]:
    """Apply the structural compressions in place (prune, then low-rank); returns the report
    with the profile before and after, and of the int8 copy when quantization is on."""
    report: dict[str, Any] = {"before": profile_backbone(backbone, example)}
    if cfg.prune is not None:
        report["prune"] = prune_backbone(backbone, cfg.prune, example)
    if cfg.low_rank is not None:
        report["low_rank"] = low_rank_backbone(backbone, cfg.low_rank)
    if cfg.structural:
        report["after"] = profile_backbone(backbone, example)
    if cfg.quantize == "int8_dynamic":
        macs = report.get("after", report["before"])["macs"]  # int8 MACs: the same count
        report["int8"] = profile_backbone(quantize_int8(backbone), example, macs=macs)
    return report


# ----------------------------------------------------------------------------- plugins

from avalanche.core import SupervisedPlugin  # noqa: E402  (after the pure-torch helpers)


def evaluates_int8(spec: Any) -> bool:
    """Whether backbone ``spec`` is evaluated as an int8 copy (``compress.quantize: int8_dynamic``)."""
    compress = spec.common.compress if spec.common is not None else None
    return compress is not None and compress.quantize == "int8_dynamic"


def int8_copy(model: nn.Module) -> nn.Module:
    """The network an int8 run evaluates and probes: a CPU copy of ``model`` whose backbone is
    int8 dynamic-quantized. Deterministic in the fp32 weights, so model.safetensors (which holds
    them) gives back exactly this network. The head stays fp32: Avalanche adapts it at every
    evaluation, and it is tiny."""
    evaluated = copy.deepcopy(model).cpu()
    evaluated.backbone = quantize_int8(evaluated.backbone)
    return evaluated


class QuantizedEvaluationPlugin(SupervisedPlugin, supports_distributed=True):
    """Evaluate a copy whose backbone is int8 dynamic-quantized; training stays in fp32.

    The copy is made at each evaluation, so it reflects the weights just trained and the
    head as grown so far. Read-only toward training: the fp32 model is put back after.
    """

    def __init__(self) -> None:
        super().__init__()
        self._fp32: nn.Module | None = None

    def before_eval(self, strategy: Any, **kwargs: Any) -> None:
        self._fp32 = strategy.model
        strategy.model = int8_copy(strategy.model)

    def after_eval(self, strategy: Any, **kwargs: Any) -> None:
        if self._fp32 is not None:
            strategy.model = self._fp32
            self._fp32 = None

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing carries over: the int8 copy is made afresh at every evaluation

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        pass


class FeatureDistillationPlugin(SupervisedPlugin, supports_distributed=True):
    """Knowledge distillation from a frozen teacher backbone into the student's features.

    The teacher has no classifier for the incremental classes, so the student is taught
    its representation: ``weight * d(P s, t)`` with s, t the pooled features of the same
    batch, P a learned linear projection (student width -> teacher width), and d the
    cosine distance (or MSE). The projection trains with the model (a param-group hook
    adds it to each experience's optimizer).
    """

    def __init__(self, teacher: nn.Module, student_width: int, weight: float, loss: str):
        super().__init__()
        from .net import frozen

        self.teacher = frozen(teacher)
        self.projection = nn.Linear(student_width, int(teacher.num_features))
        self.weight = weight
        self.loss_name = loss
        self._student_features: torch.Tensor | None = None
        self._hook: Any = None
        self.last_loss: float | None = None

    def state_dict(self) -> dict[str, Any]:
        # The teacher is rebuilt from its config and weights file; the projection is trained.
        return {"projection": {k: v.detach().cpu() for k, v in self.projection.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        self.projection.load_state_dict(state["projection"])

    def add_projection_group(self, model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A GroupHook: the projection trains at the base LR without weight decay."""
        return [*groups, {"params": list(self.projection.parameters()), "weight_decay": 0.0,
                          "name": "distill_projection"}]

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        self.teacher.to(strategy.device)
        self.projection.to(strategy.device)
        if self._hook is None:
            # The head's input is the student's pooled features: capture them on the way.
            self._hook = strategy.model.head.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._student_features = inputs[0] if module.training else None

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        student = self._student_features
        if student is None:
            return
        with torch.no_grad():
            target = pooled_features(self.teacher, strategy.mb_x).float()
        projected = self.projection(student.float())
        if self.loss_name == "cosine":
            loss = (1 - nn.functional.cosine_similarity(projected, target, dim=1)).mean()
        else:
            loss = nn.functional.mse_loss(projected, target)
        self.last_loss = float(loss.detach())
        strategy.loss = strategy.loss + self.weight * loss
        self._student_features = None

    def after_training(self, strategy: Any, **kwargs: Any) -> None:
        self._student_features = None


def compression_plugins(spec: Any, model: nn.Module, *, in_chans: int, img_size: int, device: Any,
                        key: str = "backbone") -> tuple[list[SupervisedPlugin], list[Any]]:
    """The plugins (and optimizer param-group hooks) that backbone ``spec``'s ``compress``
    options need during the run: int8 evaluation, and distillation from the teacher."""
    from ..errors import ConfigError
    from .net import build_backbone

    compress = spec.common.compress if spec.common is not None else None
    plugins: list[SupervisedPlugin] = []
    hooks: list[Any] = []
    if compress is None:
        return plugins, hooks
    if evaluates_int8(spec):
        if getattr(device, "type", str(device)) != "cpu":
            raise ConfigError("int8 dynamic quantization evaluates on the CPU; set training.device: cpu",
                              key=f"{key}.compress.quantize")
        plugins.append(QuantizedEvaluationPlugin())
    if compress.distill is not None:
        teacher_key = f"{key}.compress.distill.teacher"
        teacher = build_backbone(compress.distill.teacher, in_chans=in_chans, img_size=img_size, key=teacher_key)
        distill = FeatureDistillationPlugin(teacher, int(model.num_features), compress.distill.weight,
                                            compress.distill.loss)
        plugins.append(distill)
        hooks.append(distill.add_projection_group)
    return plugins, hooks


# ------------------------------------------------------------- weights as stored bytes
#
# What NeRV does to turn a fitted network into a small file (Chen et al. 2021, Sec. 3.3):
# global magnitude pruning, then 8-bit uniform quantization of every weight. Kept here, beside
# the backbones' compression, so a neural-representation memory compresses with the same code.


def magnitude_prune(module: nn.Module, amount: float) -> dict[str, torch.Tensor]:
    """Zero the smallest-magnitude ``amount`` of all weight matrices and kernels together
    (torch's global L1-unstructured pruning; biases are kept); returns ``{name: keep mask}``,
    which :func:`apply_masks` re-applies after fine-tuning steps. The pruning is made
    permanent (no reparametrisation left on the module)."""
    from torch.nn.utils import prune

    weights = [(m, "weight") for m in module.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)
               and m.weight.dim() > 1]
    names = {id(m): name for name, m in module.named_modules()}
    if not weights:
        return {}
    prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=float(amount))
    masks = {}
    for m, name in weights:  # the masks pruning chose (exactly the requested count), not p != 0
        masks[f"{names[id(m)]}.weight" if names[id(m)] else "weight"] = m.weight_mask.bool().clone()
        prune.remove(m, name)
    return masks


@torch.no_grad()
def apply_masks(module: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Keep pruned weights at zero (after an optimizer step)."""
    for name, p in module.named_parameters():
        if name in masks:
            p.mul_(masks[name])


def pack_int8(module: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every parameter as symmetric per-tensor 8-bit integers: ``NAME.q`` (int8; only the kept
    entries of a pruned tensor), ``NAME.scale`` (float32) and, for pruned tensors, ``NAME.mask``
    (the keep mask, 1 bit per weight, packed into uint8). These tensors are all that is stored:
    their ``nbytes`` is the size of the network."""
    import numpy as np

    packed: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        values = p.detach().float().cpu()
        mask = masks.get(name)
        kept = values[mask.cpu()] if mask is not None else values.flatten()
        scale = kept.abs().max().clamp_min(1e-12) / 127.0 if kept.numel() else torch.tensor(1.0)
        packed[f"{name}.q"] = (kept / scale).round().clamp(-127, 127).to(torch.int8)
        packed[f"{name}.scale"] = scale.reshape(1).float()
        if mask is not None:
            packed[f"{name}.mask"] = torch.from_numpy(np.packbits(mask.cpu().flatten().numpy()))
    return packed


def _channels(p: torch.Tensor) -> int:
    """The output channels a per-channel scale runs over: dim 0 of a weight, one for a bias."""
    return p.shape[0] if p.dim() > 1 else 1


def pack_uint8_per_channel(module: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every parameter as asymmetric 8-bit integers per output channel, as NeRV's reference
    quantises (``quantize_per_tensor`` with its default ``quant_axis`` 0: each channel's min and
    max over its kept, non-pruned entries): ``NAME.q`` (uint8, ``round((w - min_c) / scale_c)``,
    kept entries only), ``NAME.min`` and ``NAME.scale`` (float32 per channel), ``NAME.mask`` as
    :func:`pack_int8`'s. The step is (max - min) / 255, so the maximum is 255 and fits a byte
    (the reference divides by 256, which maps the maximum to 256)."""
    import numpy as np

    packed: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        values = p.detach().float().cpu().reshape(_channels(p), -1)
        mask = masks.get(name)
        keep = mask.cpu().reshape(values.shape) if mask is not None else torch.ones_like(values, dtype=torch.bool)
        low = torch.where(keep, values, torch.inf).amin(dim=1)
        high = torch.where(keep, values, -torch.inf).amax(dim=1)
        empty = ~keep.any(dim=1)  # a channel pruned whole: nothing to scale
        low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)
        scale = ((high - low) / 255.0).clamp_min(1e-12)
        codes = ((values - low[:, None]) / scale[:, None]).round().clamp(0, 255)
        packed[f"{name}.q"] = codes[keep].to(torch.uint8)
        packed[f"{name}.min"], packed[f"{name}.scale"] = low.float(), scale.float()
        if mask is not None:
            packed[f"{name}.mask"] = torch.from_numpy(np.packbits(mask.cpu().flatten().numpy()))
    return packed


@torch.no_grad()
def unpack_int8(module: nn.Module, packed: dict[str, torch.Tensor]) -> None:
    """Load :func:`pack_int8`'s or :func:`pack_uint8_per_channel`'s tensors into ``module`` (same
    architecture), dequantized."""
    import numpy as np

    for name, p in module.named_parameters():
        q = packed[f"{name}.q"].float()
        keep = torch.ones(p.numel(), dtype=torch.bool)
        if f"{name}.mask" in packed:
            keep = torch.from_numpy(np.unpackbits(packed[f"{name}.mask"].numpy(), count=p.numel()).astype(bool))
        if f"{name}.min" in packed:  # per channel: each kept entry's channel's min and step
            channel = torch.arange(_channels(p)).repeat_interleave(p.numel() // _channels(p))[keep]
            values = packed[f"{name}.min"][channel] + packed[f"{name}.scale"][channel] * q
        else:
            values = q * packed[f"{name}.scale"]
        full = torch.zeros(p.numel())
        full[keep] = values
        p.copy_(full.reshape(p.shape))


def packed_bytes(module: nn.Module, amount: float, *, per_channel: bool = False) -> int:
    """The size of :func:`pack_int8`'s output (``per_channel``: :func:`pack_uint8_per_channel`'s)
    after :func:`magnitude_prune` by ``amount``, known before fitting (global pruning removes
    ``round(amount * total)`` weights, as torch counts them): what a memory needs to choose a
    network that fits its budget."""
    params = [(p.numel(), name.endswith("weight") and p.dim() > 1, _channels(p))
              for name, p in module.named_parameters()]
    pruned_total = sum(n for n, pruned, _ in params if pruned)
    kept_total = pruned_total - round(pruned_total * amount)
    mask_bytes = sum((n + 7) // 8 for n, pruned, _ in params if pruned)
    plain = sum(n for n, pruned, _ in params if not pruned)
    # a float32 scale per tensor; per channel, a float32 minimum and scale per channel
    scales = sum(8 * channels for _, _, channels in params) if per_channel else 4 * len(params)
    return kept_total + plain + mask_bytes + scales
