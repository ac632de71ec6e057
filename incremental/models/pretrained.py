"""Load pretrained backbone weights from a local file (a name is resolved to one by
incremental.models.hub).

Reads safetensors files and torch/timm checkpoints (with ``weights_only=True``: no pickled
objects), unwraps the usual containers (``model``, ``state_dict``, ``module.`` prefixes,
this toolkit's ``backbone.`` prefix), and adapts the weights to the backbone as timm's
own checkpoint filters do: position embeddings resampled to the new grid, patch
embeddings resized to the new patch size, Swin's relative-position tables resized to the
new windows. Classifier heads and MAE decoder weights are dropped. Anything else that does
not fit is an error naming the file and the first keys that differ.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UserError, first_line

KEY = "backbone.pretrained"
# Weights a headless backbone never has: classifiers, and MAE's decoder.
DROPPED_PREFIXES = ("head.", "fc.", "head_dist.", "decoder", "mask_token")
CONTAINER_KEYS = ("model", "state_dict", "model_ema", "module", "encoder")


def read_checkpoint(path: str | Path, key: str = KEY) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or torch checkpoint file, unwrapped to one flat dict."""
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "do not exist"
        raise ConfigError(f"pretrained weights {path} {what}", key=key)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(file), device="cpu")
        except Exception as exc:  # corrupt or truncated (safetensors raises its own error types)
            reason = first_line(exc, type(exc).__name__)
            raise ConfigError(f"cannot read {path} as weights: {reason[:200]}", key=key, detail=str(exc)) from None
    else:
        from ..files import load_weights_only

        try:
            state = load_weights_only(file, key=key)
        except UserError as exc:
            raise ConfigError(exc.message, key=key, detail=exc.detail) from None
    for container in CONTAINER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(container), dict):
            state = state[container]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} holds no state dict of tensors", key=key)
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state) and all(k.startswith(("backbone.", "head.")) for k in state):
        # a whole IncrementalNet of this toolkit: its backbone, without the incremental head
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def check_pretrained_files(spec: Any, key: str = "backbone") -> None:
    """Fail early (at ``incremental check``) on a ``pretrained`` path that is not a file, for the
    backbone and for a distillation teacher."""
    from .hub import check_weights_name, weights_kind

    options = getattr(spec, "common", None)
    if options is None:
        return
    if options.pretrained and weights_kind(options.pretrained, spec.name) is not None:
        check_weights_name(options.pretrained, spec.name, key=f"{key}.pretrained")
    elif options.pretrained and not Path(options.pretrained).expanduser().is_file():
        raise ConfigError(f"pretrained weights {options.pretrained} do not exist", key=f"{key}.pretrained")
    if options.compress.distill is not None:
        check_pretrained_files(options.compress.distill.teacher, f"{key}.compress.distill.teacher")


def adapt_state_dict(state: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """timm's checkpoint filter for the backbone's family (resizing embeddings and tables), or the
    backbone's own ``checkpoint_filter_fn`` (the CLIP wrapper's, which uses open_clip's)."""
    own_filter = getattr(backbone, "checkpoint_filter_fn", None)
    if callable(own_filter):
        return own_filter(state)
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm reports each resize; the summary says what changed
        if isinstance(backbone, VisionTransformer):
            from timm.models.vision_transformer import checkpoint_filter_fn

            return checkpoint_filter_fn(state, backbone)
        if isinstance(backbone, SwinTransformer):
            from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter

            return swin_filter(state, backbone)
    return state


def adapt_input_channels(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> list[str]:
    """RGB first-layer weights into a grayscale model (or the reverse), in place, as timm's
    ``load_pretrained`` does with ``adapt_input_conv`` (grayscale: the sum over RGB)."""
    from timm.models._manipulate import adapt_input_conv

    adapted = []
    for key, weight in state.items():
        target = own.get(key)
        if target is None or weight.ndim != 4 or target.ndim != 4 or weight.shape == target.shape:
            continue
        if weight.shape[0] == target.shape[0] and weight.shape[2:] == target.shape[2:] and weight.shape[1] == 3:
            state[key] = adapt_input_conv(int(target.shape[1]), weight)
            adapted.append(key)
    return adapted


def load_pretrained(backbone: nn.Module, path: str | Path, key: str = KEY) -> dict[str, Any]:
    """Load ``path`` into ``backbone`` in place; returns a summary for the run's records."""
    state = read_checkpoint(path, key)
    prefix = getattr(backbone, "checkpoint_prefix", "")
    if prefix:  # a wrapper of another library's model (CLIP's ``model.``): its checkpoints lack the prefix
        state = {k if k.startswith(prefix) else prefix + k: v for k, v in state.items()}
    own = backbone.state_dict()
    dropped = sorted(k for k in state if k.startswith(DROPPED_PREFIXES) and k not in own)
    state = {k: v for k, v in state.items() if k not in dropped}
    original_shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        state = adapt_state_dict(state, backbone)
    except Exception as exc:  # timm's filters assume their own key layout
        raise ConfigError(f"{path} does not fit backbone {type(backbone).__name__}: {exc}", key=key) from None
    adapted = adapt_input_channels(state, own)
    renamed = []
    if "fc_norm.weight" in own and "norm.weight" not in own and "norm.weight" in state \
            and "fc_norm.weight" not in state:
        # An encoder pretrained with the token's final norm (MAE, timm's *.mae) finetuned with
        # average pooling: the final norm becomes the pooled features' norm, as in MAE's
        # finetuning code, which keeps the encoder's statistics instead of a fresh LayerNorm.
        for suffix in ("weight", "bias"):
            if f"norm.{suffix}" in state:
                state[f"fc_norm.{suffix}"] = state.pop(f"norm.{suffix}")
                renamed.append(f"norm.{suffix} -> fc_norm.{suffix}")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise ConfigError(f"{path} is not a checkpoint of this {type(backbone).__name__}: "
                          f"{'; '.join(parts)}", key=key)
    resized = sorted(k for k, shape in original_shapes.items() if k in state and tuple(state[k].shape) != shape)
    resized = [f"{k} (incl. input channels)" if k in adapted else k for k in resized]
    backbone.load_state_dict(state, strict=True)
    return {"path": str(path), "sha256": file_sha256(Path(path).expanduser()), "tensors": len(state),
            "dropped": dropped, "resized": resized, "renamed": renamed}


def file_sha256(path: Path) -> str:
    """The weight file's SHA-256, recorded with the run: which weights a number came from."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

