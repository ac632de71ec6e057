"""Vision Transformer from timm, sized for small images, with a patchify or a convolutional stem."""

from __future__ import annotations

from typing import Any

from torch import nn

from .options import TimmViTConfig, ViTConfig
from ..errors import ConfigError


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
