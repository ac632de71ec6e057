"""Swin Transformer and the S3 (searched Swin) variants from timm, sized for 32, 64 or 224 px.

timm's Swin is built for 224 px (patch 4, window 7: stage grids 56, 28, 14, 7). For small
images the patch is 2 at <= 32 px, and every stage's window is the largest divisor of that
stage's grid not above the configured window (timm clamps a window to a grid smaller than
it, but pads a grid it does not divide, which changes what attention sees). The S3
entries keep their searched per-stage windows, embedding and depths ("Searching the
Search Space of Vision Transformer", Chen et al. 2021; timm's ``swin_s3_*``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .options import S3Config, SwinConfig
from ..errors import ConfigError

# embed_dim, depths, num_heads, per-stage windows at 224 px (Liu et al. 2021; Chen et al. 2021).
SWIN_VARIANTS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), (7, 7, 7, 7)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24), (7, 7, 7, 7)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32), (7, 7, 7, 7)),
    "s3_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), (7, 7, 14, 7)),
    "s3_small": (96, (2, 2, 18, 2), (3, 6, 12, 24), (14, 14, 14, 14)),
    "s3_base": (96, (2, 2, 30, 2), (3, 6, 12, 24), (7, 7, 14, 7)),
}


def default_patch_size(img_size: int) -> int:
    return 2 if img_size <= 32 else 4


def stage_grids(img_size: int, patch_size: int, stages: int) -> list[int]:
    """Token grid side of each stage: patch embedding, then patch merging halves it."""
    return [img_size // patch_size // 2 ** i for i in range(stages)]


def fit_windows(grids: list[int], windows: tuple[int, ...]) -> tuple[int, ...]:
    """Per stage, the largest divisor of the grid that is <= the wanted window."""
    fitted = []
    for grid, window in zip(grids, windows):
        fitted.append(max(d for d in range(1, min(grid, window) + 1) if grid % d == 0))
    return tuple(fitted)


def build_swin_transformer(variant: str, cfg: SwinConfig | S3Config, *, in_chans: int, img_size: int) -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    embed_dim, depths, num_heads, windows = SWIN_VARIANTS[variant]
    if isinstance(cfg, SwinConfig):
        embed_dim = cfg.embed_dim or embed_dim
        depths = tuple(cfg.depths) or depths
        num_heads = tuple(cfg.num_heads) or num_heads
        if len(depths) != len(num_heads):
            raise ConfigError(f"{len(num_heads)} num_heads for {len(depths)} stages", key="num_heads")
        windows = windows[:1] * len(depths) if len(windows) != len(depths) else windows
    size = cfg.img_size or img_size
    patch = cfg.patch_size or default_patch_size(size)
    stages = len(depths)
    if size % (patch * 2 ** (stages - 1)):
        raise ConfigError(f"image size {size} is not divisible by patch_size {patch} x 2^{stages - 1} "
                          f"(the {stages} stages halve the grid {stages - 1} times)", key="patch_size")
    grids = stage_grids(size, patch, stages)
    explicit = list(getattr(cfg, "window_size", []))
    if explicit:
        if len(explicit) == 1:
            explicit *= stages
        if len(explicit) != stages:
            raise ConfigError(f"{len(explicit)} windows for {stages} stages", key="window_size")
        fitted = tuple(min(w, g) for w, g in zip(explicit, grids))
        for i, (w, g) in enumerate(zip(fitted, grids)):
            if g % w:
                raise ConfigError(f"window {w} does not divide stage {i}'s {g}x{g} grid "
                                  f"(grids {grids})", key="window_size")
    else:
        fitted = fit_windows(grids, windows)
    for heads, dim in zip(num_heads, (embed_dim * 2 ** i for i in range(stages))):
        if dim % heads:
            raise ConfigError(f"stage width {dim} is not divisible by {heads} heads", key="num_heads")
    mlp_ratio = getattr(cfg, "mlp_ratio", 4.0)
    # A per-stage window tuple is how timm builds swin_s3_*; SwinTransformer accepts it.
    return SwinTransformer(
        img_size=size, patch_size=patch, in_chans=in_chans, num_classes=0, embed_dim=embed_dim,
        depths=depths, num_heads=num_heads, window_size=fitted, mlp_ratio=mlp_ratio,
        drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate,
    )


def build_swin(cfg: SwinConfig, *, in_chans: int, img_size: int) -> nn.Module:
    """timm Swin Transformer (tiny/small/base), windows fitted to 32, 64 or 224 px grids."""
    return build_swin_transformer(cfg.variant, cfg, in_chans=in_chans, img_size=img_size)


def _s3_builder(size: str) -> Any:
    def build(cfg: S3Config, *, in_chans: int, img_size: int) -> nn.Module:
        return build_swin_transformer(f"s3_{size}", cfg, in_chans=in_chans, img_size=img_size)

    build.__doc__ = f"S3-{size[0].upper()} (searched Swin, Chen et al. 2021; timm's swin_s3_{size}_224)."
    build.__name__ = f"build_s3_{size}"
    return build


build_s3_tiny, build_s3_small, build_s3_base = (_s3_builder(size) for size in ("tiny", "small", "base"))
