"""CLIP-style image-text dual encoders from open_clip, with the image tower behind timm's contract.

The image tower is what every strategy and probe sees: ``forward_features`` is open_clip's
``encode_image`` (the projected embedding), ``forward_head(pre_logits=True)`` L2-normalises it,
so a linear head whose rows are ``scale * t_c`` (``t_c`` the normalised text embedding of class
c, ``scale`` the model's ``logit_scale.exp()``) gives exactly CLIP's zero-shot logits. The text
tower is available to strategies through :meth:`CLIPBackbone.text_embeddings`.

Architectures come from open_clip's bundled configs, a config file, or the ``open_clip_config.json``
of an ``hf-hub:`` repository; weights from ``backbone.pretrained``, a file or a name that
incremental.models.hub resolves through open_clip and huggingface_hub; the tokenizer is open_clip's
BPE ``SimpleTokenizer``, whose vocabulary ships inside the open_clip package. Towers that need a Hugging Face model or
tokenizer (``hf_model_name``, ``hf_tokenizer_name``) are refused, since those are fetched.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..config.schema import OPENAI_CIFAR_TEMPLATES, TEMPLATE_SETS
from ..errors import ConfigError
from .options import CLIPConfig

# A small architecture of the toolkit's own, for demonstrations on the digits and for tests:
# a 2-block ViT over 8-px patches and a 2-block text transformer (about 3.4M parameters, most of
# them the 49,408-token embedding table). Random weights: its zero-shot accuracy is chance.
TOOLKIT_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "clip-tiny": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}


def architecture_names() -> list[str]:
    """Every architecture ``backbone.model`` accepts: the toolkit's own and open_clip's."""
    import open_clip

    return sorted(TOOLKIT_ARCHITECTURES) + list(open_clip.list_models())


def model_config(cfg: CLIPConfig, weights: Any = None) -> dict[str, Any]:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg) of ``cfg``: the one an
    ``hf-hub:`` repository of ``weights`` carries, its config file, the toolkit's architecture
    or open_clip's bundled one; checked for what needs a download."""
    if weights is not None and weights.model_cfg is not None:
        model_cfg, where, key = weights.model_cfg, weights.name, "pretrained"
    elif cfg.config_file:
        path = Path(cfg.config_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"{cfg.config_file} does not exist; expected an open_clip model config (JSON)",
                              key="config_file")
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {cfg.config_file} as JSON: {str(exc).splitlines()[0][:200]}",
                              key="config_file") from None
        # open_clip's files for local models wrap the config in ``model_cfg``
        model_cfg = loaded.get("model_cfg", loaded) if isinstance(loaded, dict) else None
        where, key = str(cfg.config_file), "config_file"
    elif cfg.model in TOOLKIT_ARCHITECTURES:
        model_cfg, where, key = copy.deepcopy(TOOLKIT_ARCHITECTURES[cfg.model]), cfg.model, "model"
    else:
        import open_clip

        model_cfg, where, key = open_clip.get_model_config(cfg.model), cfg.model, "model"
        if model_cfg is None:
            from ..errors import did_you_mean

            raise ConfigError(f"unknown open_clip architecture {cfg.model!r}"
                              f"{did_you_mean(cfg.model, architecture_names())}", key="model")
    if not isinstance(model_cfg, dict) or not all(isinstance(model_cfg.get(k), (dict, int))
                                                  for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ConfigError(f"{where} is not an open_clip model config: it needs embed_dim, vision_cfg and "
                          f"text_cfg", key=key)
    text = model_cfg["text_cfg"]
    if text.get("hf_model_name") or text.get("hf_tokenizer_name"):
        raise ConfigError(f"{where}'s text tower needs a Hugging Face model or tokenizer, which would be "
                          f"downloaded; use an architecture with open_clip's own text transformer", key=key)
    if "multimodal_cfg" in model_cfg:
        raise ConfigError(f"{where} is a captioning model (CoCa); use a contrastive dual encoder", key=key)
    return copy.deepcopy(model_cfg)


class CLIPBackbone(nn.Module):
    """An open_clip dual encoder whose image tower follows timm's contract (see the module
    docstring); ``in_chans: 1`` images are repeated to RGB, as PIL's ``convert("RGB")`` does."""

    def __init__(self, model: nn.Module, *, embed_dim: int, context_length: int, in_chans: int):
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer

        self.model = model
        self.in_chans = in_chans
        self.num_features = int(embed_dim)
        self.tokenizer = SimpleTokenizer(context_length=context_length)

    # ------------------------------------------------------------------ image tower (timm's contract)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_chans == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.model.encode_image(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return F.normalize(x, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ text tower

    def logit_scale(self) -> torch.Tensor:
        """CLIP's temperature as a factor: ``exp(logit_scale)``, capped at 100 as CLIP trains it."""
        return self.model.logit_scale.exp().clamp(max=100.0)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.model.logit_scale.device)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)

    @torch.no_grad()
    def text_embeddings(self, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """(classes, dim): each name in every template, encoded and L2-normalised, averaged over the
        templates and normalised again (open_clip's ``build_zero_shot_classifier``, as CLIP's
        prompt ensembling). Computed in eval mode, which is restored afterwards."""
        from open_clip import build_zero_shot_classifier

        training = self.model.training
        self.model.eval()
        try:
            weights = build_zero_shot_classifier(self.model, self.tokenizer, list(names), list(templates),
                                                 num_classes_per_batch=32, device=self.model.logit_scale.device)
        finally:
            self.model.train(training)
        return weights.T.float().contiguous()

    # ------------------------------------------------------------------ weights

    # open_clip checkpoints (``visual.*``, ``transformer.*``, ...) load under this prefix
    checkpoint_prefix = "model."

    def checkpoint_filter_fn(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Position embeddings resized to this image grid and context length by open_clip's own
        functions (which read the keys without the ``model.`` prefix)."""
        from open_clip.model import resize_pos_embed, resize_text_pos_embed

        state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
        resize_pos_embed(state, self.model)
        resize_text_pos_embed(state, self.model)
        return {f"model.{k}": v for k, v in state.items()}


def require_open_clip() -> None:
    """An error naming the missing library rather than an ImportError traceback."""
    if importlib.util.find_spec("open_clip") is None:
        raise ConfigError("backbone 'clip' is built with open_clip, which is not installed: "
                          "pip install \"incremental-vit[clip]\" (or open_clip_torch)", key="name")


def trained_quick_gelu(architecture: str, tag: str | None) -> bool | None:
    """Whether open_clip's pretrained config for ``tag`` ("openai", or "ViT-B-16.openai" naming
    the architecture too) says QuickGELU; None when the tag is not one of open_clip's."""
    if not tag:
        return None
    import open_clip

    named, _, name = tag.rpartition(".")
    pretrained = open_clip.get_pretrained_cfg(named or architecture, name)
    return bool(pretrained.get("quick_gelu", False)) if pretrained else None


def quick_gelu(cfg: CLIPConfig, model_cfg: dict[str, Any], tag: str | None, weights: Any = None) -> bool:
    """The activation the weights need: ``cfg.quick_gelu`` if set (refused when the tag's
    weights were trained with the other), else the named weights' or the tag's, else the
    architecture config's."""
    if weights is not None:
        trained, tag = weights.quick_gelu, weights.name
    else:
        trained = trained_quick_gelu(cfg.model, tag)
    if cfg.quick_gelu is None:
        return trained if trained is not None else bool(model_cfg.get("quick_gelu", False))
    if trained is not None and cfg.quick_gelu != trained:
        activation = "QuickGELU" if trained else "GELU"
        raise ConfigError(f"pretrained_tag {tag!r} names weights trained with {activation} (open_clip's pretrained "
                          f"config); quick_gelu: {str(cfg.quick_gelu).lower()} would run them with the other "
                          f"activation", key="quick_gelu")
    return cfg.quick_gelu


def build_clip(cfg: CLIPConfig, *, in_chans: int, img_size: int, pretrained_tag: str | None = None,
               weights: Any = None) -> nn.Module:
    """open_clip image-text dual encoder (any architecture, weights from a file or by name); a class-name text head.

    Named ``weights`` (an open_clip tag, an ``hf-hub:`` repository) set the activation, and a
    repository the architecture; else ``pretrained_tag`` (backbone.pretrained_tag) decides the
    activation where open_clip knows it."""
    require_open_clip()
    import open_clip

    model_cfg = model_config(cfg, weights)
    model_cfg["quick_gelu"] = quick_gelu(cfg, model_cfg, pretrained_tag, weights)
    model_cfg["vision_cfg"]["image_size"] = cfg.img_size or img_size
    text_cfg = model_cfg["text_cfg"]
    custom_text = model_cfg.pop("custom_text", False)
    model_cfg.pop("tokenizer_kwargs", None)
    try:
        model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
        model = model_class(**model_cfg)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        key = "config_file" if cfg.config_file else "model"
        raise ConfigError(f"open_clip cannot build this architecture at {model_cfg['vision_cfg']['image_size']} px: "
                          f"{str(exc).splitlines()[0][:200]}", key=key) from None
    return CLIPBackbone(model, embed_dim=int(model_cfg["embed_dim"]), context_length=int(text_cfg.get("context_length", 77)), in_chans=in_chans)


def prompt_templates(templates: Sequence[str]) -> list[str]:
    """``protocol.templates`` with open_clip's named sets expanded into their format strings.
    open_clip is imported only when a named set is used: plain format strings need no extra."""
    if "openai_cifar" in templates:  # the toolkit's own set: no open_clip needed
        templates = [t for name in templates for t in (OPENAI_CIFAR_TEMPLATES if name == "openai_cifar" else [name])]
    if not any(t in TEMPLATE_SETS for t in templates):
        return list(templates)
    if importlib.util.find_spec("open_clip") is None:
        raise ConfigError("the named template sets ship with open_clip, which is not installed: "
                          "pip install \"incremental-vit[clip]\" (or write the templates out)",
                          key="protocol.templates")
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    sets = {"openai_imagenet": OPENAI_IMAGENET_TEMPLATES, "simple_imagenet": SIMPLE_IMAGENET_TEMPLATES}
    expanded: list[str] = []
    for template in templates:
        if template in sets:
            expanded.extend(t("{}") for t in sets[template])  # open_clip keeps them as callables
        else:
            expanded.append(template)
    return expanded


def has_text_tower(model: nn.Module) -> bool:
    """Whether ``model`` (an IncrementalNet or a backbone) has a text tower to write heads from."""
    backbone = getattr(model, "backbone", model)
    return callable(getattr(backbone, "text_embeddings", None))


@torch.no_grad()
def set_text_rows(model: nn.Module, labels: range, text: torch.Tensor) -> None:
    """Rows ``labels`` of the linear head set to ``scale * t_c`` with a zero bias: CLIP's zero-shot
    classifier for those classes (``text``: their normalised text embeddings, in order)."""
    classifier = model.head.classifier
    rows = text * model.backbone.logit_scale()
    classifier.weight[labels.start:labels.stop] = rows.to(classifier.weight)
    if classifier.bias is not None:
        classifier.bias[labels.start:labels.stop] = 0.0


def pretrain_contrastive(model: nn.Module, images: torch.Tensor, captions: Sequence[str], labels: torch.Tensor, *,
                         steps: int, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.1,
                         seed: int = 0) -> list[float]:
    """Train an open_clip model with CLIP's contrastive loss (open_clip's ``ClipLoss``) on
    ``images`` (normalised, 3 channels) captioned by ``captions[labels[i]]``: how the demonstrations
    and tests get a CLIP whose zero-shot classifier works, where no real weights can be fetched.
    AdamW, constant LR, batches drawn with replacement from a generator seeded by ``seed``;
    returns the loss of every step."""
    from open_clip.loss import ClipLoss
    from open_clip.tokenizer import SimpleTokenizer

    context_length = int(model.positional_embedding.shape[0])
    tokens = SimpleTokenizer(context_length=context_length)(list(captions))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn, losses = ClipLoss(), []
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(images), (batch_size,), generator=generator)
        image_features = model.encode_image(images[batch], normalize=True)
        text_features = model.encode_text(tokens[labels[batch]], normalize=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
