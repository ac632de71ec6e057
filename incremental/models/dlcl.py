"""A deep pre-norm ViT with dynamic linear combination of layers (DLCL).

Wang et al. 2019, "Learning Deep Transformer Models for Machine Translation": in a pre-norm
network the input of block l+1 is a learned combination of the embedding and of every
earlier block's output, x_{l+1} = sum_{k<=l} W[l, k] * LN_k(y_k), with y_0 the embedding
(not normalised) and W lower-triangular, each row initialised to 1/(l+1) (the "avg"
initialisation of the authors' fairseq code). The last row combines all L+1 outputs into
the encoder output, followed by the final norm. Each block keeps its own residual, as in
the paper's pre-norm layers; this is what lets 30-layer-deep models train.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch import nn

from .options import ViTDLCLConfig
from ..errors import ConfigError
from .vit import make_conv_stem_class


@cache  # one class, so isinstance and copies agree; built lazily to keep timm's import out of start-up
def _dlcl_vit_class() -> type:
    from timm.models.vision_transformer import VisionTransformer

    class DLCLVisionTransformer(VisionTransformer):
        """timm's VisionTransformer (so its checkpoint filter, param names and contract
        apply) with the DLCL history between blocks."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            depth = len(self.blocks)
            # LN_k for k = 1..L; the embedding y_0 enters the combinations as is.
            self.history_norms = nn.ModuleList(nn.LayerNorm(self.embed_dim, eps=1e-6) for _ in range(depth))
            rows = torch.arange(depth + 1, dtype=torch.float32).unsqueeze(1)
            weights = torch.tril(torch.ones(depth + 1, depth + 1)) / (rows + 1)
            self.layer_weights = nn.Parameter(weights)
            self.register_buffer("layer_mask", torch.tril(torch.ones(depth + 1, depth + 1)), persistent=False)

        def combination_weights(self) -> torch.Tensor:
            """W with the upper triangle held at zero (the mask also zeroes its gradient)."""
            return self.layer_weights * self.layer_mask

        def forward_features(self, x: torch.Tensor, **_: Any) -> torch.Tensor:
            x = self.patch_embed(x)
            x = self._pos_embed(x)
            x = self.patch_drop(x)
            x = self.norm_pre(x)
            return self.norm(self.forward_blocks(x))

        def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
            """The blocks with the DLCL history, from embedded tokens to the pre-norm output
            (MAE pretraining calls this on the kept tokens)."""
            weights = self.combination_weights()
            history = [x]
            for layer, block in enumerate(self.blocks):
                combined = sum(weights[layer, k] * h for k, h in enumerate(history))
                history.append(self.history_norms[layer](block(combined)))
            return sum(weights[-1, k] * h for k, h in enumerate(history))

        def no_weight_decay(self) -> set[str]:
            # The combination weights are a mixing matrix, not a feature map: decaying them
            # pulls every layer's input toward zero.
            return {*super().no_weight_decay(), "layer_weights"}

    return DLCLVisionTransformer


def build_vit_dlcl(cfg: ViTDLCLConfig, *, in_chans: int, img_size: int) -> nn.Module:
    """Deep pre-norm ViT with dynamic linear combination of layers (Wang et al. 2019); slow on CPUs: its default is 729 MMACs per 32-px image, 13x the digits ViT (depth 8, width 128: 2x).

    The cost, stated in `incremental list backbones` and recomputed by tests/test_backbones.py: the
    default's 24 blocks of 192 against the digits protocol's ViT (4 blocks of 128), both at 32 px."""
    size = cfg.img_size or img_size
    if size % cfg.patch_size:
        raise ConfigError(f"image size {size} is not divisible by patch_size {cfg.patch_size}", key="patch_size")
    extra: dict[str, Any] = {}
    if cfg.stem == "conv":
        extra["embed_layer"] = make_conv_stem_class(None)
    return _dlcl_vit_class()(
        img_size=size, patch_size=cfg.patch_size, in_chans=in_chans, num_classes=0, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, drop_path_rate=cfg.drop_path_rate,
        global_pool=cfg.global_pool, **extra,
    )
