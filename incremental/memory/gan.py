"""A class-conditional GAN for generative replay, with the choices the GAN literature found to
train stably on small data.

- Generator: DCGAN-style (Radford et al. 2016): the noise and a one-hot class go through a
  linear layer to a 4x4 map of 2 * width channels, then nearest 2x upsampling + 3x3 conv +
  BatchNorm + ReLU (width channels) to the image size, and a 3x3 conv with tanh. Narrower than
  DCGAN's halving widths, since its weights are all the memory keeps.
- Discriminator: spectrally normalised convolutions (Miyato et al. 2018) with a projection
  head for the class (Miyato & Koyama 2018): D(x, y) = psi(h) + <embed(y), h>.
- Losses: hinge (SNGAN, BigGAN) or WGAN-GP (Gulrajani et al. 2017, lambda 10).
- DiffAugment (Zhao et al. 2020, policy color,translation,cutout) on every image the
  discriminator sees, real or generated, so that it cannot memorise a small training set.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import spectral_norm

WIDTH_LADDER = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def upsamplings(image_size: int) -> int:
    """2x upsamplings from 4x4 to ``image_size`` (a power of two of at least 8)."""
    steps = int(round(math.log2(image_size / 4))) if image_size >= 8 else 0
    if image_size < 8 or 4 * 2 ** steps != image_size:
        raise ValueError(f"the GAN generates images of 4 * 2^k pixels (8, 16, 32, 64, ...), not {image_size}")
    return steps


class Generator(nn.Module):
    def __init__(self, *, num_classes: int, channels: int, image_size: int, width: int, z_dim: int):
        super().__init__()
        self.num_classes, self.z_dim = num_classes, z_dim
        levels = upsamplings(image_size)
        # 2w on the 4x4 map, then w: the projection from the noise dominates a small generator's
        # bytes, and a memory's budget is what limits it
        widths = [2 * width] + [width] * levels
        self.project = nn.Linear(z_dim + num_classes, widths[0] * 16)
        self.start = nn.Sequential(nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1),
                       nn.BatchNorm2d(c_out), nn.ReLU()]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(widths[-1], channels, 3, padding=1)
        self.first_width = widths[0]

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] of the given classes."""
        x = self.project(torch.cat([z, F.one_hot(labels, self.num_classes).float()], dim=1))
        x = self.start(x.view(len(z), self.first_width, 4, 4))
        return torch.tanh(self.out(self.blocks(x)))


class ProjectionDiscriminator(nn.Module):
    def __init__(self, *, num_classes: int, channels: int, image_size: int, width: int):
        super().__init__()
        layers, c_in = [], channels
        for i in range(upsamplings(image_size)):
            c_out = width * 2 ** i
            # one strided 4x4 conv per level (DCGAN's D): SNGAN's extra 3x3 convs cost 20x the
            # compute, and a CPU must be able to train this once per experience
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.1)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.linear = spectral_norm(nn.Linear(c_in, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, c_in))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.features(x).sum(dim=(2, 3))  # global sum pooling, as SNGAN's ResNet D
        return self.linear(h).squeeze(1) + (self.embed(labels) * h).sum(dim=1)


def diff_augment(x: torch.Tensor) -> torch.Tensor:
    """DiffAugment's color, translation (1/8) and cutout (1/2) policy, differentiable in x."""
    n, on = len(x), {"device": x.device}  # every draw on x's device: no host round trip
    x = x + (torch.rand(n, 1, 1, 1, **on) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (torch.rand(n, 1, 1, 1, **on) * 2) + mean  # saturation (identity on grey images)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (torch.rand(n, 1, 1, 1, **on) + 0.5) + mean  # contrast
    h, w = x.shape[-2:]
    sh, sw = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
    dy = torch.randint(-sh, sh + 1, (n, 1, 1), **on)
    dx = torch.randint(-sw, sw + 1, (n, 1, 1), **on)
    rows = (torch.arange(h, **on)[None, :, None] + dy + 1).clamp(0, h + 1)
    cols = (torch.arange(w, **on)[None, None, :] + dx + 1).clamp(0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1))  # translation fills with zeros, as the reference
    x = padded[torch.arange(n, **on)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    oy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), **on)
    ox = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), **on)
    ys = (torch.arange(ch, **on)[None, :, None] + oy - ch // 2).clamp(0, h - 1)
    xs = (torch.arange(cw, **on)[None, None, :] + ox - cw // 2).clamp(0, w - 1)
    mask = torch.ones(n, h, w, **on)
    mask[torch.arange(n, **on)[:, None, None], ys, xs] = 0
    return x * mask[:, None]


def generator_bytes(generator: nn.Module, storage: str) -> int:
    """What the stored generator takes: every parameter and BatchNorm statistic, at the
    storage precision (the batch counter is not kept)."""
    per_value = 2 if storage == "float16" else 4
    values = sum(p.numel() for p in generator.parameters())
    values += sum(b.numel() for name, b in generator.named_buffers() if not name.endswith("num_batches_tracked"))
    return values * per_value


@torch.no_grad()
def round_to_storage(generator: nn.Module, storage: str) -> None:
    """The generator as the memory stores it: float16 rounds every value."""
    if storage == "float16":
        for tensor in [*generator.parameters(), *generator.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def widest_generator(budget: int, *, num_classes: int, channels: int, image_size: int, z_dim: int,
                     storage: str, max_width: int = WIDTH_LADDER[-1]) -> int | None:
    best = None
    for width in (w for w in WIDTH_LADDER if w <= max_width):
        g = Generator(num_classes=num_classes, channels=channels, image_size=image_size, width=width, z_dim=z_dim)
        if generator_bytes(g, storage) <= budget:
            best = width
    return best


@torch.no_grad()
def sample(generator: Generator, labels: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
    """Generated images in [0, 1] for these labels (the generator in eval mode)."""
    was_training = generator.training
    generator.eval()
    z = torch.randn(len(labels), generator.z_dim, generator=rng, device=labels.device)
    images = (generator(z, labels) + 1) * 0.5
    generator.train(was_training)
    return images


def train_gan(generator: Generator, discriminator: ProjectionDiscriminator, real: torch.Tensor,
              real_labels: torch.Tensor, *, previous: Generator | None, old_labels: list[int], steps: int,
              batch_size: int, lr: float, loss: str, d_steps: int, diffaugment: bool, gp_weight: float,
              device: torch.device | str = "cpu") -> list[float]:
    """Train on ``real`` (uint8, this experience's images) plus, as deep generative replay does
    (Shin et al. 2017), samples of the old classes from ``previous``, in each batch in
    proportion to the old classes' share of the classes seen. Returns the losses (D, G) of
    the last step. Draws from torch's global generator of ``device``: the caller seeds and forks it.

    On a GPU the networks and data move there, channels-last, with the forward passes in bf16
    (losses in fp32); everything a step needs is drawn on the device, and the losses are read
    once at the end, so no step waits for the host. On the CPU it runs fp32, as before."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    layout = torch.channels_last if gpu else torch.contiguous_format
    nets = [net for net in (generator, discriminator, previous) if net is not None]
    for net in nets:
        net.to(device=device, memory_format=layout)
    on = {"device": device}
    seen = sorted(set(real_labels.tolist()) | set(old_labels))
    old_share = len(old_labels) / len(seen) if previous is not None and old_labels else 0.0
    n_old = int(round(batch_size * old_share))
    old = torch.tensor(old_labels, dtype=torch.long, **on)
    seen_t = torch.tensor(seen, dtype=torch.long, **on)
    aug = diff_augment if diffaugment else (lambda x: x)
    g_opt = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.0, 0.9))
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.0, 0.9))
    real01 = (real.to(device).float() / 255.0).contiguous(memory_format=layout)
    real_labels = real_labels.to(device)
    d_loss = g_loss = torch.zeros((), **on)
    low_precision = torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu)

    def real_batch() -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(0, len(real01), (batch_size - n_old,), **on)
        x, y = real01[pick], real_labels[pick]
        if n_old:
            y_old = old[torch.randint(0, len(old), (n_old,), **on)]
            with low_precision:
                x, y = torch.cat([x, sample(previous, y_old).float()]), torch.cat([y, y_old])
        return x * 2 - 1, y

    from ..progress import bar

    progress = bar(steps, "GAN training", unit="step")
    for _ in range(steps):
        progress.update(1)
        for _ in range(d_steps):
            x, y = real_batch()
            y_fake = seen_t[torch.randint(0, len(seen_t), (batch_size,), **on)]
            with torch.no_grad(), low_precision:
                fake = generator(torch.randn(batch_size, generator.z_dim, **on), y_fake)
            d_loss = _discriminator_loss(discriminator, aug, (x, y), (fake.float(), y_fake), loss, gp_weight,
                                         low_precision)
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
        y_fake = seen_t[torch.randint(0, len(seen_t), (batch_size,), **on)]
        with low_precision:
            generated = generator(torch.randn(batch_size, generator.z_dim, **on), y_fake)
            g_loss = -discriminator(aug(generated.float()), y_fake).float().mean()
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
    progress.close()
    for net in nets:
        net.to(device="cpu", memory_format=torch.contiguous_format)
    return [float(d_loss.detach()), float(g_loss.detach())]


def _discriminator_loss(discriminator: nn.Module, aug: Any, real: tuple[torch.Tensor, torch.Tensor],
                        fake: tuple[torch.Tensor, torch.Tensor], loss: str, gp_weight: float,
                        low_precision: Any) -> torch.Tensor:
    """D's hinge or WGAN-GP loss on a real and a generated batch (images in [-1, 1], labels),
    its forward passes under ``low_precision`` and the loss in fp32."""
    (x, y), (generated, y_fake) = real, fake
    with low_precision:
        d_real, d_fake = discriminator(aug(x), y).float(), discriminator(aug(generated), y_fake).float()
    if loss == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    return d_fake.mean() - d_real.mean() + gp_weight * _gradient_penalty(discriminator, x, generated, y)


def _gradient_penalty(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's (||grad D(x_hat)|| - 1)^2 on random interpolates of real and fake images (the
    real image's label conditions both; Gulrajani et al. 2017 for a conditional critic)."""
    alpha = torch.rand(len(real), 1, 1, 1, device=real.device)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(mixed, labels).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (n, d), as FID defines it
    (Heusel et al. 2017): ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)). The trace of the
    root is taken as sum sqrt(eig(S_a^1/2 S_b S_a^1/2)), symmetric and stable when fewer samples
    than dimensions make the covariances singular (pytorch-fid's sqrtm warns there instead)."""
    import numpy as np

    a64, b64 = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a64.mean(axis=0), b64.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a64, rowvar=False)), np.atleast_2d(np.cov(b64, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    trace_root = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


class PooledPixels(nn.Module):
    """A fixed feature space behind timm's contract: the images average-pooled to ``size`` x
    ``size`` per channel and flattened. It has no weights, so it is the same space at every
    step of every run (for digits, 8 x 8 is their native resolution)."""

    def __init__(self, size: int = 8):
        super().__init__()
        self.size = size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x.float(), self.size)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.flatten(1)


def grid(images: torch.Tensor, rows: int) -> Any:
    """A (rows x cols) grid of [0, 1] images (n, C, H, W) as an HWC uint8 array."""
    from torchvision.utils import make_grid

    picture = make_grid(images, nrow=max(1, len(images) // rows), padding=1, pad_value=1.0)
    return (picture.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
