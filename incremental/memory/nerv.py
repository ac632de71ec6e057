"""NeRV (Chen et al. 2021, "NeRV: Neural Representations for Videos"): a network that takes a
frame index and returns the frame; here the "video" is one class's exemplars, in herding order.

The architecture follows the reference ``model_nerv.py``: a positional encoding of t = i / n
(``sin``/``cos`` of 1.25^l * pi * t), an MLP stem to a ``fc x fc x width`` feature map, then
NeRV blocks (3x3 conv to ``out * s^2`` channels, PixelShuffle(s), GELU) up to the image size,
halving the width at each block down to a floor, and a 1x1 conv head with (tanh + 1) / 2.
The weights are stored as the reference quantises them by default (``quantization:
per_channel``): asymmetric 8-bit codes with a minimum and a step per output channel, over the
entries pruning kept.

Departures from the reference code (haochen-rye/NeRV, ``train_nerv.py``), each chosen for
exemplar memories of small images fitted on a CPU:
- the width floor is 4 (``LOWER_WIDTH``), where ``--lower-width`` defaults to 32: a 32-px
  digit's last blocks at 32 channels would cost most of a class's byte share;
- Adam at lr 0.02 with a cosine schedule and no warmup, where the reference runs lr 1e-3 with
  20% of the epochs as a linear warmup from a tenth; beta1 is the reference's 0.5. Measured in
  experiments/bench/methods.md (issue 33): 200 + 50 steps this way reach a higher PSNR than
  400 + 100 at 0.005 and beta1 0.9;
- pruning once, globally by magnitude, then ``finetune_steps`` at lr / 10 with the mask fixed,
  where the reference prunes at scheduled epochs while training continues;
- the quantisation step is (max - min) / 255, so that codes fit a byte (the reference divides
  by 256 and maps a channel's maximum to 256);
- MSE loss (the memory reports PSNR; the code's default ``L2`` too) where the paper's best
  results mix L1 and SSIM, and no Huffman coding of the quantized weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..models.compress import magnitude_prune, pack_int8, pack_uint8_per_channel, packed_bytes, unpack_int8

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
                   max_width: int, per_channel: bool = True) -> int | None:
    """The widest ladder width whose pruned, 8-bit network fits ``budget`` bytes, or None."""
    best = None
    with torch.random.fork_rng(devices=[]):  # sizing draws initial weights it throws away
        for width in WIDTH_LADDER:
            if width > max_width:
                break
            net = NeRV(width=width, image_size=image_size, channels=channels, levels=levels)
            if packed_bytes(net, prune, per_channel=per_channel) <= budget:
                best = width
    return best


def smallest_network_bytes(*, image_size: int, channels: int, levels: int, prune: float,
                           per_channel: bool = True) -> int:
    """The stored bytes of the narrowest network on the ladder: no smaller budget holds a frame."""
    with torch.random.fork_rng(devices=[]):
        net = NeRV(width=WIDTH_LADDER[0], image_size=image_size, channels=channels, levels=levels)
        return packed_bytes(net, prune, per_channel=per_channel)


@dataclass
class FitReport:
    """How one class's fit ended: the steps taken (fit and fine-tune) and the PSNR (dB) of the
    float network's frames at the last step, before 8-bit quantisation."""

    steps: int
    psnr_db: float


def _psnr_of_mse(mse: float) -> float:
    """PSNR in dB of a mean squared error over images in [0, 1]."""
    return 10 * math.log10(1 / max(mse, 1e-12))


class NetworkBatch:
    """K networks of one architecture trained as one: their parameters stacked along a first
    dimension and the forward pass vectorised over it (``torch.func.vmap``), so a step costs one
    pass of batched convolutions instead of K small ones. The loss is the sum of each network's
    own mean squared error over its own frames, so each gets exactly its own gradient, and Adam
    (elementwise) updates each as it would alone; classes with fewer frames are padded with
    frames of weight 0."""

    def __init__(self, nets: list[NeRV], targets: list[torch.Tensor]):
        from torch.func import functional_call, stack_module_state, vmap

        self.template = copy.deepcopy(nets[0]).to("meta")
        params, self.buffers = stack_module_state(nets)
        self.params = {name: p.detach().clone().requires_grad_(True) for name, p in params.items()}
        longest = max(len(t) for t in targets)
        shape = targets[0].shape[1:]
        self.positions = torch.zeros(len(nets), longest)
        self.targets = torch.zeros(len(nets), longest, *shape)
        self.weights = torch.zeros(len(nets), longest, 1, 1, 1)
        for k, frames in enumerate(targets):
            n = len(frames)
            self.positions[k, :n] = frame_positions(n)
            self.targets[k, :n] = frames
            self.weights[k, :n] = 1.0 / (n * frames[0].numel())

        def squared_error(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], t: torch.Tensor,
                          target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return ((functional_call(self.template, (params, buffers), (t,)) - target) ** 2 * weight).sum()

        self.mse = vmap(squared_error)

    def fit(self, steps: int, lr: float, beta1: float, masks: dict[str, torch.Tensor] | None,
            target_psnr: float | None, tick: Callable[[int], Any]) -> list[tuple[int, float]]:
        """Adam with a cosine LR for ``steps`` steps (the pruned weights held at zero after each),
        each network stopping once its MSE reaches ``target_psnr`` dB (kept at that step's
        weights); per network, the steps it took and its last PSNR."""
        optimizer = torch.optim.Adam(self.params.values(), lr=lr, betas=(beta1, 0.999))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        count = len(self.positions)
        taken, psnr = [steps] * count, [float("nan")] * count
        kept: dict[int, dict[str, torch.Tensor]] = {}
        for step in range(steps):
            errors = self.mse(self.params, self.buffers, self.positions, self.targets, self.weights)
            if target_psnr is not None:
                for k, error in enumerate(errors.detach().tolist()):
                    psnr[k] = _psnr_of_mse(error)
                    if k not in kept and psnr[k] >= target_psnr:
                        kept[k] = {name: p[k].detach().clone() for name, p in self.params.items()}
                        taken[k] = step
                if len(kept) == count:
                    break
            optimizer.zero_grad(set_to_none=True)
            errors.sum().backward()
            optimizer.step()
            schedule.step()
            if masks is not None:
                with torch.no_grad():
                    for name, mask in masks.items():
                        self.params[name].mul_(mask)
            tick(1)
        with torch.no_grad():
            for k, params in kept.items():
                for name, value in params.items():
                    self.params[name][k] = value
            if target_psnr is None or len(kept) < count:
                errors = self.mse(self.params, self.buffers, self.positions, self.targets, self.weights)
                psnr = [_psnr_of_mse(e) if k not in kept else psnr[k]
                        for k, e in enumerate(errors.tolist())]
        return list(zip(taken, psnr))

    def unstack(self, nets: list[NeRV]) -> None:
        """Copy network k's parameters back into ``nets[k]``."""
        with torch.no_grad():
            for k, net in enumerate(nets):
                for name, p in net.named_parameters():
                    p.copy_(self.params[name][k])


def encode_many(classes: list[torch.Tensor], seeds: list[int], *, width: int, levels: int, steps: int, lr: float,
                prune: float, finetune_steps: int, beta1: float = 0.5, target_psnr: float | None = None,
                per_channel: bool = True) -> list[tuple[dict[str, torch.Tensor], FitReport]]:
    """Fit one NeRV per class of uint8 frames (n_k, C, H, W), all of width ``width``, as one
    batch; prune each, fine-tune them (again as a batch) with the masks fixed, quantize: each
    class's stored tensors (the 8-bit weights, their scales and masks, and the frame count and
    width as int32) and its :class:`FitReport`. Network k starts from ``seeds[k]``'s weights,
    so it is the network that class would get fitted alone."""
    from ..progress import bar

    channels, size = classes[0].shape[1], classes[0].shape[-1]
    targets = [images.float() / 255.0 for images in classes]
    with torch.random.fork_rng(devices=[]):  # the run's random stream stays as it was
        nets = []
        for seed in seeds:
            torch.manual_seed(seed)
            nets.append(NeRV(width=width, image_size=size, channels=channels, levels=levels))
    label = f"NeRV fit ({len(classes)} classes, {sum(len(c) for c in classes)} frames)"
    with bar(steps + finetune_steps, label, "step") as progress:
        batch = NetworkBatch(nets, targets)
        fitted = batch.fit(steps, lr, beta1, None, target_psnr, progress.update) if steps > 0 else []
        batch.unstack(nets)
        masks = [magnitude_prune(net, prune) for net in nets]
        tuned = []
        if finetune_steps > 0:
            batch = NetworkBatch(nets, targets)
            stacked = {name: torch.stack([m[name] for m in masks]) for name in masks[0]} if masks[0] else None
            tuned = batch.fit(finetune_steps, lr * 0.1, beta1, stacked, None, progress.update)
            batch.unstack(nets)
    results = []
    for k, net in enumerate(nets):
        pack = pack_uint8_per_channel if per_channel else pack_int8
        payload = {**pack(net, masks[k]), "frames": torch.tensor([len(classes[k])], dtype=torch.int32),
                   "shape": torch.tensor([width, channels, size, levels], dtype=torch.int32)}
        steps_taken = (fitted[k][0] if fitted else 0) + (tuned[k][0] if tuned else 0)
        last = tuned[k][1] if tuned else (fitted[k][1] if fitted else float("nan"))
        results.append((payload, FitReport(steps_taken, round(last, 3))))
    return results


@torch.no_grad()
def decode_frames(payload: dict[str, torch.Tensor]) -> torch.Tensor:
    """The uint8 frames a stored NeRV holds."""
    width, channels, size, levels = (int(v) for v in payload["shape"])
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: draw none from the run
        net = NeRV(width=width, image_size=size, channels=channels, levels=levels)
    unpack_int8(net, payload)
    images = net(frame_positions(int(payload["frames"][0])))
    return (images * 255.0).round().clamp(0, 255).to(torch.uint8)
