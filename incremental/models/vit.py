"""Vision Transformer from timm, sized for small images, with a patchify or a convolutional stem."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from ..config import opt
from ..errors import ConfigError
from ..registry import BACKBONES


def stem_strides(patch_size: int) -> list[int]:
    """Strides whose product is ``patch_size``: as many 2s as divide it, then the odd rest
    (patch 16 -> [2, 2, 2, 2] as in Xiao et al. 2021; patch 4 -> [2, 2]; patch 14 -> [2, 7])."""
    strides, rest = [], patch_size
    while rest % 2 == 0:
        strides.append(2)
        rest //= 2
    if rest > 1:
        strides.append(rest)
    return strides


def stem_channels(embed_dim: int, layers: int) -> list[int]:
    """Xiao et al. 2021 (Table 1) double the width at every stride-2 conv and end at the
    embedding width: ViT_C-1GF (d=192) uses 24-48-96-192, ViT_C-4GF (d=384) 48-96-192-384.
    Here: embed_dim / 2**(layers-1-i), at least 16 channels."""
    return [max(16, embed_dim // 2 ** (layers - 1 - i)) for i in range(layers)]


def make_conv_stem_class(channels: list[int] | None) -> type:
    """A timm ``PatchEmbed`` whose projection is a conv stem ("Early convolutions help
    transformers see better", Xiao et al. 2021): 3x3 conv-BN-ReLU layers whose strides
    multiply to the patch size, then a 1x1 conv to the embedding width. Subclassing
    PatchEmbed keeps timm's grid bookkeeping (grid_size, num_patches, feat_ratio)."""
    from timm.layers import PatchEmbed

    class ConvStemPatchEmbed(PatchEmbed):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            in_chans = self.proj.in_channels
            embed_dim = self.proj.out_channels
            strides = stem_strides(self.patch_size[0])
            widths = channels or stem_channels(embed_dim, len(strides))
            if len(widths) != len(strides):
                raise ConfigError(f"stem_channels has {len(widths)} entries but patch_size "
                                  f"{self.patch_size[0]} needs {len(strides)} strided convs {strides}",
                                  key="stem_channels")
            layers: list[nn.Module] = []
            for width, stride in zip(widths, strides):
                kernel = max(3, stride)  # an odd stride larger than 3 still sees every pixel
                layers += [nn.Conv2d(in_chans, width, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                in_chans = width
            layers.append(nn.Conv2d(in_chans, embed_dim, kernel_size=1))
            self.proj = nn.Sequential(*layers)

    return ConvStemPatchEmbed


@dataclass
class ViTConfig:
    """Defaults follow DyTox's CIFAR ViT (embed 384, depth 6, patch 4, 12 heads)."""

    img_size: int | None = opt(None, ge=1)  # None: the dataset's image size
    patch_size: int = opt(4, ge=1)
    embed_dim: int = opt(384, ge=1)
    depth: int = opt(6, ge=1)
    num_heads: int = opt(12, ge=1)
    mlp_ratio: float = opt(4.0, gt=0)
    qkv_bias: bool = True
    drop_rate: float = opt(0.0, ge=0, lt=1)
    drop_path_rate: float = opt(0.1, ge=0, lt=1)
    global_pool: Literal["token", "avg"] = "token"
    # patch: one strided conv (ViT); conv: ViTIL's convolutional stem (Xiao et al. 2021).
    # Xiao et al. also drop one transformer block to keep the FLOPs equal; set depth for that.
    stem: Literal["patch", "conv"] = "patch"
    stem_channels: list[int] = field(default_factory=list)  # empty: doubling up to embed_dim

    def validate(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}",
                              key="num_heads")
        if self.stem_channels and self.stem != "conv":
            raise ConfigError("stem_channels is only used with stem: conv", key="stem_channels")
        if any(c < 1 for c in self.stem_channels):
            raise ConfigError("stem_channels must be positive", key="stem_channels")


@BACKBONES.register("vit", config=ViTConfig)
def build_vit(cfg: ViTConfig, *, in_chans: int, img_size: int) -> nn.Module:
    """timm VisionTransformer, patchify or conv stem, any size (default: DyTox's CIFAR ViT)."""
    from timm.models.vision_transformer import VisionTransformer

    size = cfg.img_size or img_size
    if size % cfg.patch_size:
        raise ConfigError(f"image size {size} is not divisible by patch_size {cfg.patch_size}",
                          key="patch_size")
    extra: dict[str, Any] = {}
    if cfg.stem == "conv":
        extra["embed_layer"] = make_conv_stem_class(list(cfg.stem_channels) or None)
    return VisionTransformer(
        img_size=size, patch_size=cfg.patch_size, in_chans=in_chans, num_classes=0,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate,
        global_pool=cfg.global_pool, **extra,
    )


@dataclass
class TimmViTConfig:
    """Any timm VisionTransformer by name, at the dataset's image size and a chosen patch."""

    model: str = "vit_small_patch16_224"
    img_size: int | None = opt(None, ge=1)  # None: the dataset's image size
    patch_size: int | None = opt(None, ge=1)  # None: the model's own (16 for vit_*_patch16_*)
    drop_rate: float = opt(0.0, ge=0, lt=1)
    drop_path_rate: float = opt(0.1, ge=0, lt=1)
    global_pool: Literal["model", "token", "avg"] = "model"  # model: what the timm entry uses
    stem: Literal["patch", "conv"] = "patch"

    def validate(self) -> None:
        names = timm_vit_names()
        if self.model not in names:
            from ..errors import did_you_mean

            raise ConfigError(f"not a timm VisionTransformer: {self.model!r}{did_you_mean(self.model, names)}",
                              key="model")


def timm_vit_names() -> list[str]:
    import timm

    # timm registers the DeiT variants in their own module; both build VisionTransformer
    return sorted(timm.list_models(module="vision_transformer") + timm.list_models(module="deit"))


@BACKBONES.register("timm_vit", config=TimmViTConfig)
def build_timm_vit(cfg: TimmViTConfig, *, in_chans: int, img_size: int) -> nn.Module:
    """Any timm ViT by name (vit_*, deit*, ...), with image and patch size for small images."""
    import timm

    size = cfg.img_size or img_size
    extra: dict[str, Any] = {}
    if cfg.patch_size:
        extra["patch_size"] = cfg.patch_size
    if cfg.global_pool != "model":
        extra["global_pool"] = cfg.global_pool
    if cfg.stem == "conv":
        extra["embed_layer"] = make_conv_stem_class(None)
    try:
        model = timm.create_model(cfg.model, pretrained=False, num_classes=0, in_chans=in_chans, img_size=size,
                                  drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate, **extra)
    except (AssertionError, ValueError) as exc:  # timm asserts on sizes it cannot tile
        raise ConfigError(f"timm cannot build {cfg.model} at {size} px: {exc}", key="model") from None
    patch = model.patch_embed.patch_size[0]
    if size % patch:
        raise ConfigError(f"image size {size} is not divisible by patch_size {patch}", key="patch_size")
    return model
