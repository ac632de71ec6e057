"""The exemplar codecs' options, declared without importing torch (see incremental.registry).

A codec decides how a byte-budgeted memory (``protocol.memory.bytes``) stores each class's
exemplars, and so how many it can keep: ``raw`` uint8 pixels, ``jpeg`` (Wang et al. 2022,
"Memory Replay with Data Compression"), or ``nerv``, one small network per class that maps a
frame index to an image (Chen et al. 2021), pruned and quantized to 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config.fields import MAX_SIZE, MAX_WIDTH, opt
from ..registry import CODECS


@dataclass
class RawCodecConfig:
    # Store each exemplar at size x size pixels, fitted so that resizing it back to the dataset's
    # size (bilinear) when replayed is nearest the original in least squares: downsampled replay.
    # None: the pixels as the dataset stores them. On digits 8 is the native resolution (the
    # dataset upsamples scikit-learn's 8 x 8 images), so a 32-px exemplar costs 64 bytes, not 1,024
    size: int | None = opt(None, ge=1, le=MAX_SIZE)


@dataclass
class JPEGCodecConfig:
    # Pillow's quality scale; Wang et al. 2022 pick it per dataset (50-90 on ImageNet subsets)
    quality: int = opt(50, ge=1, le=95)


@dataclass
class NeRVCodecConfig:
    """NeRV (Chen et al. 2021): positional encoding of the frame index (base 1.25, ``levels``
    frequencies), an MLP to a small feature map, then 3x3 conv + PixelShuffle(2) blocks with
    GELU, a 1x1 conv head and (tanh + 1) / 2. Fitted per class on its herding-ordered exemplars
    with Adam and a cosine LR, then magnitude-pruned, fine-tuned with the mask fixed, and stored
    as 8-bit weights (the paper's pipeline, without its Huffman coding).

    A class's network is the widest of the width ladder that fits its share of the budget once
    compressed; it holds ``expansion`` times as many exemplars as raw pixels would fit in that
    share (all of the class when fewer). When a later experience shrinks the share, a narrower
    network is fitted to the first frames the old one decodes (as many as a new class gets):
    the memory never goes back to the original images."""

    expansion: float = opt(4.0, ge=1.0, le=1000.0)
    # Adam steps, each over every frame of the class. 200 + 50 at lr 0.02 and beta1 0.5 (the
    # reference's beta1) fitted digits classes to a higher PSNR than the earlier 400 + 100 at
    # 0.005 and beta1 0.9 at widths 24, 32 and 64, in half the steps
    steps: int = opt(200, ge=1, le=1_000_000)
    lr: float = opt(2e-2, gt=0, le=1.0)
    beta1: float = opt(0.5, ge=0.0, lt=1.0)  # Adam's first-moment decay (beta2 0.999)
    prune: float = opt(0.4, ge=0.0, le=0.95)  # NeRV prunes 40% with little loss (their Fig. 5)
    finetune_steps: int = opt(50, ge=0, le=1_000_000)  # after pruning, mask fixed, at lr / 10
    levels: int = opt(40, ge=1, le=128)  # NeRV's embedding 1.25_40 for short videos
    max_width: int = opt(64, ge=2, le=MAX_WIDTH)
    # Stop a class's fit once its frames reach this PSNR (dB, float network before 8-bit
    # quantisation); the steps taken and the PSNR are reported per class. None: all ``steps``.
    target_psnr: float | None = opt(None, gt=0, le=100)
    # per_channel: asymmetric 8-bit codes with a minimum and a step per output channel, as NeRV's
    # reference quantises (quant_axis 0); per_tensor: symmetric codes with one step per tensor,
    # 22% fewer bytes at the same PSNR on digits (experiments/memory/nerv_quantisation.md)
    quantization: Literal["per_channel", "per_tensor"] = "per_channel"


CODECS.declare("raw", "incremental.memory.codecs:RawCodec", config=RawCodecConfig,
               summary="uint8 pixels, as stored by the dataset or resized to `size` (downsampled replay)")
CODECS.declare("jpeg", "incremental.memory.codecs:JPEGCodec", config=JPEGCodecConfig,
               summary="each exemplar JPEG-encoded by Pillow at a quality (Wang et al. 2022)")
CODECS.declare("nerv", "incremental.memory.codecs:NeRVCodec", config=NeRVCodecConfig,
               summary="one NeRV network per class (frame index -> image), pruned and 8-bit (Chen et al. 2021)")
