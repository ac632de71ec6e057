"""NeRV (Chen et al. 2021, "NeRV: Neural Representations for Videos"): a network that takes a
frame index and returns the frame; here the "video" is one class's exemplars, in herding order.

The architecture follows the reference ``model_nerv.py``: a positional encoding of t = i / n
(``sin``/``cos`` of 1.25^l * pi * t), an MLP stem to a ``fc x fc x width`` feature map, then
NeRV blocks (3x3 conv to ``out * s^2`` channels, PixelShuffle(s), GELU) up to the image size,
halving the width at each block down to a floor, and a 1x1 conv head with (tanh + 1) / 2.
The departures: MSE loss (the memory reports PSNR) where the paper mixes L1 and SSIM, and no
Huffman coding of the quantized weights.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ..models.compress import apply_masks, magnitude_prune, pack_int8, packed_bytes, unpack_int8

LOWER_WIDTH = 4  # the reference's --lower-width: block widths never halve below it
WIDTH_LADDER = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def upsampling_plan(image_size: int) -> tuple[int, list[int]]:
    """The stem's feature-map size and the blocks' strides: halve while even and above 4."""
    size, strides = image_size, []
    while size % 2 == 0 and size > 4:
        size //= 2
        strides.append(2)
    return size, strides


class NeRV(nn.Module):
    def __init__(self, *, width: int, image_size: int, channels: int, levels: int):
        super().__init__()
        self.fc, strides = upsampling_plan(image_size)
        self.width = width
        self.register_buffer("bases", (1.25 ** torch.arange(levels)) * math.pi, persistent=False)
        self.stem = nn.Sequential(nn.Linear(2 * levels, 2 * width), nn.GELU(),
                                  nn.Linear(2 * width, width * self.fc * self.fc), nn.GELU())
        blocks, ngf = [], width
        for stride in strides:
            out = max(ngf // 2, min(LOWER_WIDTH, ngf))
            blocks += [nn.Conv2d(ngf, out * stride * stride, 3, padding=1), nn.PixelShuffle(stride), nn.GELU()]
            ngf = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(ngf, channels, 1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Frame positions t in [0, 1) -> images in [0, 1], (n, C, H, W)."""
        angles = t[:, None] * self.bases[None, :]
        x = self.stem(torch.cat([torch.sin(angles), torch.cos(angles)], dim=1))
        x = self.blocks(x.view(len(t), self.width, self.fc, self.fc))
        return (torch.tanh(self.head(x)) + 1) * 0.5


def frame_positions(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) / n


def widest_fitting(budget: int, *, image_size: int, channels: int, levels: int, prune: float,
                   max_width: int) -> int | None:
    """The widest ladder width whose pruned, 8-bit network fits ``budget`` bytes, or None."""
    best = None
    with torch.random.fork_rng(devices=[]):  # sizing draws initial weights it throws away
        for width in WIDTH_LADDER:
            if width > max_width:
                break
            net = NeRV(width=width, image_size=image_size, channels=channels, levels=levels)
            if packed_bytes(net, prune) <= budget:
                best = width
    return best


def smallest_network_bytes(*, image_size: int, channels: int, levels: int, prune: float) -> int:
    """The stored bytes of the narrowest network on the ladder: no smaller budget holds a frame."""
    with torch.random.fork_rng(devices=[]):
        net = NeRV(width=WIDTH_LADDER[0], image_size=image_size, channels=channels, levels=levels)
        return packed_bytes(net, prune)


def _fit(net: NeRV, targets: torch.Tensor, steps: int, lr: float, masks: dict[str, torch.Tensor] | None,
         tick: Callable[[int], Any] = lambda n: None) -> None:
    """Adam with a cosine LR on the MSE over every frame (one batch: a class's exemplars)."""
    if steps <= 0:
        return
    t = frame_positions(len(targets))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(net(t), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if masks is not None:
            apply_masks(net, masks)
        tick(1)


def encode_frames(images: torch.Tensor, *, width: int, levels: int, steps: int, lr: float, prune: float,
                  finetune_steps: int, seed: int) -> dict[str, torch.Tensor]:
    """Fit a NeRV on uint8 frames (n, C, H, W), prune, fine-tune, quantize: the stored tensors
    (the 8-bit weights, their scales and masks, and the frame count and width as int32)."""
    from ..progress import bar

    n, channels, size = len(images), images.shape[1], images.shape[-1]
    targets = images.float() / 255.0
    with torch.random.fork_rng(devices=[]), bar(steps + finetune_steps, f"NeRV fit ({n} frames)", "step") as progress:
        torch.manual_seed(seed)  # the run's random stream stays as it was (fork_rng)
        net = NeRV(width=width, image_size=size, channels=channels, levels=levels)
        _fit(net, targets, steps, lr, None, progress.update)
        masks = magnitude_prune(net, prune)
        _fit(net, targets, finetune_steps, lr * 0.1, masks, progress.update)
    return {**pack_int8(net, masks), "frames": torch.tensor([n], dtype=torch.int32),
            "shape": torch.tensor([width, channels, size, levels], dtype=torch.int32)}


@torch.no_grad()
def decode_frames(payload: dict[str, torch.Tensor]) -> torch.Tensor:
    """The uint8 frames a stored NeRV holds."""
    width, channels, size, levels = (int(v) for v in payload["shape"])
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: draw none from the run
        net = NeRV(width=width, image_size=size, channels=channels, levels=levels)
    unpack_int8(net, payload)
    images = net(frame_positions(int(payload["frames"][0])))
    return (images * 255.0).round().clamp(0, 255).to(torch.uint8)
