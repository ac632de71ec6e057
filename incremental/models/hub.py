"""Pre-trained weights by name, resolved to a local file by timm, open_clip and huggingface_hub.

``backbone.pretrained`` is a local file, or a name as timm and open_clip users write it:

- timm backbones (vit, timm_vit, swin, s3_*): ``timm/<architecture>.<tag>`` (timm's pretrained
  registry gives the Hub repository and the weights' mean and std) or ``hf-hub:<org>/<repo>[@revision]``
  (a timm repository: ``model.safetensors`` or ``pytorch_model.bin``, and ``config.json``);
- clip: an open_clip tag of ``backbone.model`` (``laion400m_e32``, ``openai``; open_clip's
  pretrained config gives the repository, QuickGELU and the mean and std), or
  ``hf-hub:<org>/<repo>`` (an open_clip repository: ``open_clip_config.json`` holds the
  architecture and the preprocessing, beside the weights).

The file comes from the Hugging Face cache, downloaded by huggingface_hub when online; offline
(``HF_HUB_OFFLINE=1``) only the cache is read. The run records the name, the repository, the
snapshot's commit and the file's SHA-256. Nothing here imports torch: the libraries that
resolve open_clip tags and timm names do, when a name needs them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, did_you_mean, first_line

KEY = "backbone.pretrained"
HF_HUB_PREFIX = "hf-hub:"
TIMM_PREFIX = "timm/"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".tar", ".npz")
# timm's weight files in a Hub repository, in the order timm itself tries them
TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class NamedWeights:
    """Where a name resolved to, and what its library's config says about the weights."""

    name: str
    library: str  # timm or open_clip
    repo_id: str
    path: Path
    revision: str | None = None  # the cache snapshot's commit
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    quick_gelu: bool | None = None  # open_clip weights: the activation they were trained with
    model_cfg: dict[str, Any] | None = field(default=None, repr=False)  # open_clip hf-hub: the architecture

    def statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The weights' input mean and std (``dataset.normalize: auto``), when their config gives them."""
        return (self.mean, self.std) if self.mean and self.std else None

    def record(self) -> dict[str, Any]:
        """What the run's records keep of the resolution (the SHA-256 is the loader's)."""
        return {"name": self.name, "library": self.library, "repo_id": self.repo_id, "revision": self.revision,
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None}


def weights_kind(value: str, backbone: str) -> str | None:
    """``hf-hub``, ``timm`` or ``open_clip`` when ``value`` is a name; None for a local path.
    An existing file always wins, so a relative path that looks like a name still loads."""
    if not value or Path(value).expanduser().exists():
        return None
    if value.startswith(HF_HUB_PREFIX):
        return "hf-hub"
    if value.startswith(TIMM_PREFIX) and backbone != "clip":
        return "timm"
    if backbone == "clip" and "/" not in value and os.sep not in value \
            and not value.lower().endswith(WEIGHT_SUFFIXES):
        return "open_clip"
    return None


def check_weights_name(value: str, backbone: str, key: str) -> None:
    """The checks a name gets without importing a library (``incremental check``)."""
    kind = weights_kind(value, backbone)
    if kind == "hf-hub" and not value[len(HF_HUB_PREFIX):].partition("@")[0].count("/") == 1:
        raise ConfigError(f"{value!r} is not a Hub repository: write hf-hub:<org>/<name>[@revision]", key=key)
    if kind == "timm" and "." not in value[len(TIMM_PREFIX):]:
        raise ConfigError(f"{value!r} names no weights: write timm/<architecture>.<tag> "
                          f"(e.g. timm/vit_base_patch16_224.augreg_in21k)", key=key)


def hub_cache() -> str:
    """The Hugging Face cache folder huggingface_hub reads now (HF_HUB_CACHE, HF_HOME)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def fetch_error(name: str, repo_id: str, reason: str) -> ConfigError:
    """The one line a missing file gives: the cache folder looked in and the command that fills it."""
    from huggingface_hub import constants

    offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else f": {reason[:160]}"
    return ConfigError(f"{name} is not in the Hugging Face cache {hub_cache()} and cannot be downloaded{offline}; "
                       f"fetch it with: hf download {repo_id}", key=KEY)


def snapshot_revision(path: str | Path) -> str | None:
    """The commit of the cache snapshot holding ``path`` (``.../snapshots/<commit>/file``)."""
    parent = Path(path).parent
    return parent.name if parent.parent.name == "snapshots" else None


def download(repo_id: str, filenames: tuple[str, ...], name: str, revision: str | None = None) -> Path:
    """The first of ``filenames`` the repository has, from the cache or downloaded."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    reason = "no weights file"
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision))
        except LocalEntryNotFoundError as exc:  # offline, or the Hub unreachable, and not cached
            reason = first_line(exc, "not cached")
        except EntryNotFoundError:  # the repository lacks this file: try the next
            continue
        except Exception as exc:  # unknown repository or revision, gated, HTTP errors
            raise ConfigError(f"{name}: the Hub refused {repo_id}: {first_line(exc)[:200]}",
                              key=KEY) from None
    raise fetch_error(name, repo_id, reason)


def resolve_timm(value: str) -> NamedWeights:
    """``timm/<architecture>.<tag>`` through timm's pretrained registry."""
    from timm.models import get_pretrained_cfg, list_pretrained

    name = value[len(TIMM_PREFIX):]
    architecture = name.partition(".")[0]
    try:
        pretrained_cfg = get_pretrained_cfg(name)
    except RuntimeError:
        pretrained_cfg = None
    if pretrained_cfg is None or not pretrained_cfg.hf_hub_id:
        known = list_pretrained(f"{architecture}.*") or list_pretrained()
        raise ConfigError(f"unknown timm weights {value!r}{did_you_mean(name, known)}", key=KEY)
    repo_id = pretrained_cfg.hf_hub_id
    files = (pretrained_cfg.hf_hub_filename,) if pretrained_cfg.hf_hub_filename else TIMM_WEIGHT_FILES
    path = download(repo_id, files, value)
    return NamedWeights(value, "timm", repo_id, path, snapshot_revision(path),
                        tuple(pretrained_cfg.mean), tuple(pretrained_cfg.std))


def split_hub_name(value: str) -> tuple[str, str | None]:
    """``hf-hub:org/repo@revision`` -> (``org/repo``, ``revision``)."""
    repo_id, _, revision = value[len(HF_HUB_PREFIX):].partition("@")
    return repo_id, revision or None


def resolve_timm_hub(value: str) -> NamedWeights:
    """``hf-hub:<org>/<repo>`` holding timm weights, with its config.json's mean and std."""
    repo_id, revision = split_hub_name(value)
    path = download(repo_id, TIMM_WEIGHT_FILES, value, revision)
    try:  # optional: the loader needs only the weights
        config: Path | None = download(repo_id, ("config.json",), value, revision)
    except ConfigError:
        config = None
    mean = std = None
    if config is not None:
        pretrained_cfg = read_json(config, value).get("pretrained_cfg", {})
        mean, std = pretrained_cfg.get("mean"), pretrained_cfg.get("std")
    return NamedWeights(value, "timm", repo_id, path, snapshot_revision(path),
                        tuple(mean) if mean else None, tuple(std) if std else None)


def read_json(path: Path, name: str) -> dict[str, Any]:
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read {path} as JSON: {first_line(exc)[:160]}", key=KEY) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{name}: {path} is not a JSON object", key=KEY)
    return loaded


def open_clip_download(download: Any, name: str, repo_id: str) -> Path:
    """open_clip's own download call; its errors (it wraps huggingface_hub's) as one line."""
    try:
        path = download()
    except (FileNotFoundError, OSError, RuntimeError) as exc:
        raise fetch_error(name, repo_id, first_line(exc)) from None
    if not path:
        raise ConfigError(f"{name}: open_clip's pretrained config gives no download", key=KEY)
    return Path(path)


def resolve_open_clip_tag(tag: str, architecture: str) -> NamedWeights:
    """An open_clip tag (``laion400m_e32``, or ``ViT-B-32.laion400m_e32``) of ``architecture``."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    named, _, name = tag.rpartition(".")
    architecture = named or architecture
    pretrained_cfg = open_clip.get_pretrained_cfg(architecture, name)
    if not pretrained_cfg:
        tags = open_clip.list_pretrained_tags_by_model(architecture)
        known = f"; its tags: {', '.join(tags)}" if tags else f"; open_clip has no weights for {architecture}"
        raise ConfigError(f"unknown open_clip weights {tag!r} for {architecture}{did_you_mean(name, tags)}{known}",
                          key=KEY)
    repo_id = os.path.split(pretrained_cfg.get("hf_hub", ""))[0]  # org/name/[file], as open_clip splits it
    path = open_clip_download(lambda: download_pretrained(pretrained_cfg), tag, repo_id or pretrained_cfg.get("url", ""))
    return NamedWeights(tag, "open_clip", repo_id, path, snapshot_revision(path),
                        tuple(pretrained_cfg["mean"]) if pretrained_cfg.get("mean") else None,
                        tuple(pretrained_cfg["std"]) if pretrained_cfg.get("std") else None,
                        quick_gelu=bool(pretrained_cfg.get("quick_gelu", False)))


def resolve_open_clip_hub(value: str) -> NamedWeights:
    """``hf-hub:<org>/<repo>`` holding open_clip weights and their ``open_clip_config.json``."""
    from open_clip.pretrained import download_pretrained_from_hf

    repo_id, revision = split_hub_name(value)
    config_path = open_clip_download(
        lambda: download_pretrained_from_hf(repo_id, filename="open_clip_config.json", revision=revision),
        value, repo_id)
    config = read_json(config_path, value)
    model_cfg = config.get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise ConfigError(f"{value}: {config_path} has no model_cfg (not an open_clip repository)", key=KEY)
    preprocess = config.get("preprocess_cfg", {})
    path = open_clip_download(lambda: download_pretrained_from_hf(repo_id, revision=revision), value, repo_id)
    return NamedWeights(value, "open_clip", repo_id, path, snapshot_revision(path),
                        tuple(preprocess["mean"]) if preprocess.get("mean") else None,
                        tuple(preprocess["std"]) if preprocess.get("std") else None,
                        quick_gelu=bool(model_cfg.get("quick_gelu", False)), model_cfg=model_cfg)


def resolve_weights(value: str | None, backbone: str, config: Any, key: str = KEY) -> NamedWeights | None:
    """The file a name stands for (from the cache, or downloaded); None for a local path."""
    kind = weights_kind(value or "", backbone)
    if kind is None:
        return None
    try:
        check_weights_name(value, backbone, KEY)
        if backbone == "clip":
            from .clip import require_open_clip

            require_open_clip()
            if kind == "hf-hub":
                return resolve_open_clip_hub(value)
            return resolve_open_clip_tag(value, getattr(config, "model", ""))
        return resolve_timm_hub(value) if kind == "hf-hub" else resolve_timm(value)
    except ConfigError as exc:
        if exc.key == KEY:
            exc.key = key
        raise
