"""Vision Transformer from timm, sized for small images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..config import opt
from ..errors import ConfigError
from ..registry import BACKBONES


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

    def validate(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}",
                              key="num_heads")


@BACKBONES.register("vit", config=ViTConfig)
def build_vit(cfg: ViTConfig, *, in_chans: int, img_size: int) -> nn.Module:
    """timm VisionTransformer with a patchify stem, any size (default: DyTox's CIFAR ViT)."""
    from timm.models.vision_transformer import VisionTransformer

    size = cfg.img_size or img_size
    if size % cfg.patch_size:
        raise ConfigError(f"image size {size} is not divisible by patch_size {cfg.patch_size}",
                          key="patch_size")
    return VisionTransformer(
        img_size=size, patch_size=cfg.patch_size, in_chans=in_chans, num_classes=0,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate,
        global_pool=cfg.global_pool,
    )
