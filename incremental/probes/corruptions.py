"""The 15 ImageNet-C corruptions (Hendrycks and Dietterich, 2019), batched in torch.

:func:`corrupt` takes float images in [0, 1] of shape (N, C, H, W) on any device and
returns corrupted images of the same shape, following the reference code:

- ``parameters="imagenet"``: the severity tables of ImageNet-C as packaged, for any image
  size, by ``imagecorruptions`` (Michaelis et al. 2019), whose size-aware elastic transform
  and Wand-free motion blur are used here too;
- ``parameters="cifar"``: the tables of ``make_cifar_c.py`` (CIFAR-10-C), for 32 px images;
- ``parameters="tiny"``: the tables of ``make_tinyimagenet_c.py`` (Tiny-ImageNet-C), for 64 px;
- ``"auto"``: CIFAR's up to 32 px, Tiny-ImageNet's up to 64 px, ImageNet's above.

Random draws come from a CPU ``torch.Generator`` and are moved to the images' device, so a
seed gives the same corruption on CPU and GPU. Frost: the reference crops photographs of
frost, which are not redistributed here; textures are generated instead (a plasma fractal
plus oriented ice needles), with the per-channel mean and spread measured on the five
ImageNet-C frost photographs that the reference samples from.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, did_you_mean
from ..tensorboard import render_heat_map
from .base import Probe, ProbeBatch, ProbeResult, luma
from .options import CORRUPTIONS, SEVERITIES, ParameterSet

# Severity 1..5 parameters, copied from the three reference implementations.
IMAGENET_C: dict[str, list] = {
    "gaussian_noise": [.08, .12, 0.18, 0.26, 0.38],
    "shot_noise": [60, 25, 12, 5, 3],
    "impulse_noise": [.03, .06, .09, 0.17, 0.27],
    "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
    "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],  # sigma, max delta, iterations
    "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],  # radius, sigma
    "zoom_blur": [(1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03)],
    # loc, scale, zoom, threshold, motion radius, motion sigma, blend
    "snow": [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
             (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)],
    "frost": [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],
    "fog": [(1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)],
    "brightness": [.1, .2, .3, .4, .5],
    "contrast": [0.4, .3, .2, .1, .05],
    # imagecorruptions' elastic: alpha; sigma = 1% and max displacement 0.5% of the size
    "elastic_transform": [250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12],
    "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
    "jpeg_compression": [25, 18, 15, 10, 7],
}
CIFAR_C: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, .08, .09, .10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [.01, .02, .03, .05, .07],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    "zoom_blur": [(1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01), (1, 1.26, 0.01)],
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
    "fog": [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "brightness": [.05, .1, .15, .2, .3],
    "contrast": [.75, .5, .4, .3, 0.15],
    # alpha, sigma, affine jitter, as fractions of the image size (make_cifar_c.py)
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    "jpeg_compression": [80, 65, 58, 50, 40],
}
# Per-channel (R, G, B) mean and standard deviation of the five frost photographs the
# reference samples from (frost1.png .. frost5.jpg), measured once.
FROST_PLATES = (((0.305, 0.585, 0.650), 0.077), ((0.787, 0.805, 0.841), 0.087), ((0.787, 0.805, 0.841), 0.087),
                ((0.540, 0.599, 0.648), 0.114), ((0.441, 0.484, 0.528), 0.169))


TINY_IMAGENET_C: dict[str, list] = {
    "gaussian_noise": [0.04, 0.08, .12, .15, .18],
    "shot_noise": [250, 100, 50, 30, 15],
    "impulse_noise": [.01, .02, .05, .08, .14],
    "defocus_blur": [(0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)],
    "glass_blur": [(0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)],
    "motion_blur": [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)],
    "zoom_blur": [(1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01), (1, 1.26, 0.01)],
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.8), (0.1, 0.2, 1, 0.5, 10, 4, 0.8), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.7),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.65), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.6)],
    "frost": [(1, 0.3), (0.9, 0.4), (0.8, 0.45), (0.75, 0.5), (0.7, 0.55)],
    "fog": [(.4, 3), (.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)],
    "brightness": [.1, .2, .3, .4, .5],
    "contrast": [.4, .3, .2, .1, 0.05],
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.3, 0.06), (0.1, 0.08, 0.06), (0.1, 0.03, 0.03), (0.16, 0.03, 0.02)],
    "pixelate": [0.9, 0.8, 0.7, 0.6, 0.5],
    "jpeg_compression": [65, 58, 50, 40, 25],
}
TABLES = {"cifar": CIFAR_C, "tiny": TINY_IMAGENET_C, "imagenet": IMAGENET_C}
# The fog's plasma fractal is made at this size and cropped (make_cifar_c.py: 32;
# make_tinyimagenet_c.py: 64); ImageNet's follows imagecorruptions: the next power of two.
FOG_MAPSIZE = {"cifar": 32, "tiny": 64}


def table_name(image_size: int, parameters: ParameterSet = "auto") -> str:
    """Which severity tables apply: ``auto`` picks CIFAR-10-C's up to 32 px, Tiny-ImageNet-C's
    up to 64 px, ImageNet-C's above."""
    if parameters != "auto":
        return parameters
    return "cifar" if image_size <= 32 else "tiny" if image_size <= 64 else "imagenet"


def parameter_set(image_size: int, parameters: ParameterSet = "auto") -> dict[str, list]:
    return TABLES[table_name(image_size, parameters)]


def corrupt(images: torch.Tensor, name: str, severity: int, *, generator: torch.Generator | None = None,
            parameters: ParameterSet = "auto") -> torch.Tensor:
    """``images`` (N, C, H, W) float in [0, 1], C = 1 or 3 -> the corrupted images, in [0, 1]."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}{did_you_mean(name, CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 1..5, got {severity}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    which = table_name(images.shape[-1], parameters)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    x = images.float().clamp(0, 1)
    out = _FUNCTIONS[name](x, TABLES[which][name][severity - 1], gen, which)
    return out.clamp(0, 1)


# ----------------------------------------------------------------------------- helpers


def _rand(gen: torch.Generator, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=gen).to(like.device)


def _randn(gen: torch.Generator, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(like.device)


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> list[float]:
    return (low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)).tolist()


@lru_cache(maxsize=64)
def _blur_matrix(size: int, sigma: float, mode: str, truncate: float) -> torch.Tensor:
    """A 1-D Gaussian filter as a (size, size) matrix, with scipy.ndimage's boundary modes
    ('reflect' = half-sample symmetric, 'nearest' = edge). A matrix handles kernels longer
    than the image, which elastic's sigma of 0.7 x size needs."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    matrix = np.zeros((size, size))
    for i in range(size):
        j = i + offsets
        if mode == "nearest":
            j = np.clip(j, 0, size - 1)
        else:
            j = np.mod(j, 2 * size)
            j = np.where(j >= size, 2 * size - 1 - j, j)
        np.add.at(matrix[i], j, weights)
    return torch.from_numpy(matrix).float()


def gaussian_filter(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """skimage.filters.gaussian on the last two dimensions (each channel separately)."""
    if sigma <= 0:
        return x
    rows = _blur_matrix(x.shape[-2], float(sigma), mode, float(truncate)).to(x.device)
    cols = _blur_matrix(x.shape[-1], float(sigma), mode, float(truncate)).to(x.device)
    return rows @ x @ cols.T


def _filter2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """cv2.filter2D: correlation with a centred kernel, reflect-101 borders."""
    k = kernel.to(x.device, x.dtype)
    pad_h, pad_w = k.shape[0] // 2, k.shape[1] // 2
    n, c, h, w = x.shape
    flat = x.reshape(n * c, 1, h, w)
    if pad_h < h and pad_w < w:
        flat = F.pad(flat, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    else:  # a kernel wider than the image: replicate instead of failing
        flat = F.pad(flat, (pad_w, pad_w, pad_h, pad_h), mode="replicate")
    return F.conv2d(flat, k[None, None]).reshape(n, c, h, w)


def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """The reference's anti-aliased disk kernel (cv2.GaussianBlur of an aliased disk)."""
    half = 8 if radius <= 8 else int(radius)
    ksize = 3 if radius <= 8 else 5
    coords = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(coords, coords)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float32)
    disk /= disk.sum()
    g = np.exp(-0.5 * ((np.arange(ksize) - (ksize - 1) / 2) / alias_blur) ** 2)
    g /= g.sum()
    kernel = torch.from_numpy(disk)[None, None]
    kernel = _filter2d(kernel, torch.from_numpy(np.outer(g, g)).float())
    return kernel[0, 0]


def _shift_gather(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Per-image shift by (dy, dx) pixels with edge replication (the reference's ``shift``)."""
    n, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device)[None] - dy[:, None]).clamp(0, h - 1)  # (N, H)
    cols = (torch.arange(w, device=x.device)[None] - dx[:, None]).clamp(0, w - 1)  # (N, W)
    index = torch.arange(n, device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def motion_blur_batch(x: torch.Tensor, radius: int, sigma: float, angles: list[float]) -> torch.Tensor:
    """imagecorruptions' motion blur (its replacement for ImageMagick's): a one-sided
    Gaussian along ``angle``, one angle per image."""
    width = 2 * int(radius) + 1
    kernel = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    n, _, h, w = x.shape
    out = torch.zeros_like(x)
    alive = torch.ones(n, dtype=torch.bool, device=x.device)
    for i in range(width):
        dy = torch.tensor([-math.ceil(i * math.sin(math.radians(a)) - 0.5) for a in angles], device=x.device)
        dx = torch.tensor([-math.ceil(i * math.cos(math.radians(a)) - 0.5) for a in angles], device=x.device)
        alive &= (dy.abs() < h) & (dx.abs() < w)  # the reference stops once motion leaves the image
        out = out + float(kernel[i]) * _shift_gather(x, dy, dx) * alive.view(n, 1, 1, 1)
    return out


def clipped_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom into the centre by ``factor`` (linear interpolation, as scipy's order=1), then
    trim back to the input size."""
    h, w = x.shape[-2:]
    ch, cw = int(math.ceil(h / factor)), int(math.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    out_h, out_w = int(round(ch * factor)), int(round(cw * factor))
    zoomed = F.interpolate(crop, size=(out_h, out_w), mode="bilinear", align_corners=True)
    trim_h, trim_w = (out_h - h) // 2, (out_w - w) // 2
    zoomed = zoomed[..., max(0, trim_h):max(0, trim_h) + h, max(0, trim_w):max(0, trim_w) + w]
    if zoomed.shape[-2:] != (h, w):  # rounding left the zoom a pixel short
        zoomed = F.pad(zoomed, (0, w - zoomed.shape[-1], 0, h - zoomed.shape[-2]), mode="replicate")
    return zoomed


def plasma_fractal(n: int, mapsize: int, wibbledecay: float, gen: torch.Generator) -> torch.Tensor:
    """The reference's diamond-square height maps, ``n`` at once, (n, mapsize, mapsize) in [0, 1]."""
    maps = torch.zeros(n, mapsize, mapsize, dtype=torch.float64)
    stepsize, wibble = mapsize, 100.0

    def wibbled_mean(array: torch.Tensor) -> torch.Tensor:
        noise = (torch.rand(array.shape, generator=gen, dtype=torch.float64) * 2 - 1) * wibble
        return array / 4 + wibble * noise

    while stepsize >= 2:
        half = stepsize // 2
        corners = maps[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        square = corners + torch.roll(corners, -1, dims=1)
        square = square + torch.roll(square, -1, dims=2)
        maps[:, half:mapsize:stepsize, half:mapsize:stepsize] = wibbled_mean(square)
        dr = maps[:, half:mapsize:stepsize, half:mapsize:stepsize]
        ul = maps[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        left = dr + torch.roll(dr, 1, dims=1) + ul + torch.roll(ul, -1, dims=2)
        maps[:, 0:mapsize:stepsize, half:mapsize:stepsize] = wibbled_mean(left)
        top = dr + torch.roll(dr, 1, dims=2) + ul + torch.roll(ul, -1, dims=1)
        maps[:, half:mapsize:stepsize, 0:mapsize:stepsize] = wibbled_mean(top)
        stepsize //= 2
        wibble /= wibbledecay
    flat = maps.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    return ((maps - low[:, None, None]) / (high - low)[:, None, None]).float()


def _next_power_of_2(value: int) -> int:
    return 1 if value == 0 else 2 ** (value - 1).bit_length()


# ----------------------------------------------------------------------------- corruptions


def _gaussian_noise(x, c, gen, table):
    return x + _randn(gen, tuple(x.shape), x) * c


def _shot_noise(x, c, gen, table):
    # Poisson draws on the CPU from the generator: torch.poisson takes one there.
    return torch.poisson((x * c).cpu().double(), generator=gen).float().to(x.device) / c


def _impulse_noise(x, c, gen, table):
    # skimage's random_noise(mode='s&p'): each value flips with probability ``amount``,
    # to 1 or 0 with equal odds.
    flip = _rand(gen, tuple(x.shape), x) <= c
    salt = _rand(gen, tuple(x.shape), x) <= 0.5
    return torch.where(flip, salt.float(), x)


def _defocus_blur(x, c, gen, table):
    return _filter2d(x, _disk(c[0], c[1]))


def _glass_blur(x, c, gen, table):
    sigma, delta, iterations = c
    y = (gaussian_filter(x, sigma) * 255).to(torch.uint8)  # the reference quantises here
    n, _, h, w = y.shape
    hs = list(range(h - delta, delta, -1))
    ws = list(range(w - delta, delta, -1))
    draws = torch.randint(-delta, delta, (iterations, len(hs), len(ws), 2, n), generator=gen).to(x.device)
    images = torch.arange(n, device=x.device)
    for it in range(iterations):
        # Sequential, as in the reference, one position in all images at once. The
        # reference's numpy "swap" (``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on views)
        # only copies the neighbour into (h, w); ImageNet-C and CIFAR-10-C were made that
        # way, so it is kept.
        for a, hh in enumerate(hs):
            for b, ww in enumerate(ws):
                dx, dy = draws[it, a, b, 0], draws[it, a, b, 1]
                y[:, :, hh, ww] = y[images, :, hh + dy, ww + dx]
    return gaussian_filter(y.float() / 255, sigma)


def _motion_blur(x, c, gen, table):
    return motion_blur_batch(x, c[0], c[1], _uniform(gen, len(x), -45, 45))


def _zoom_blur(x, c, gen, table):
    start, stop, step = c
    factors = np.arange(start, stop, step)
    out = torch.zeros_like(x)
    for factor in factors:
        out += clipped_zoom(x, float(factor))
    return (x + out) / (len(factors) + 1)


def _snow(x, c, gen, table):
    n, _, h, w = x.shape
    layer = _randn(gen, (n, 1, h, w), x) * c[1] + c[0]
    layer = clipped_zoom(layer, c[2])
    layer = torch.where(layer < c[3], torch.zeros_like(layer), layer).clamp(0, 1)
    layer = motion_blur_batch(layer, c[4], c[5], _uniform(gen, n, -135, -45))
    layer = torch.round(layer * 255) / 255
    x = c[6] * x + (1 - c[6]) * torch.maximum(x, luma(x) * 1.5 + 0.5)
    return x + layer + torch.rot90(layer, 2, dims=(2, 3))


@lru_cache(maxsize=8)
def frost_textures(size: int, channels: int, seed: int = 0) -> torch.Tensor:
    """Five generated frost plates, (5, C, S, S) in [0, 1], S a bit larger than ``size`` so
    that each image gets a random crop. Seeded: the same plates in every run."""
    gen = torch.Generator().manual_seed(seed)
    side = int(math.ceil(size * 1.5))
    mapsize = _next_power_of_2(side)
    plates = []
    for mean, spread in FROST_PLATES:
        base = plasma_fractal(1, mapsize, 1.6, gen)[:, None, :side, :side]
        # Ice needles: sparse seeds smeared along a few random directions.
        seeds = (torch.rand(1, 1, side, side, generator=gen) < 0.01).float()
        angles = (torch.rand(4, generator=gen) * 360).tolist()
        needles = sum(motion_blur_batch(seeds, max(2, side // 10), side / 20, [a]) for a in angles)
        needles = gaussian_filter(needles, 0.6)
        texture = 0.6 * _standardise(base) + _standardise(needles)
        texture = _standardise(texture)
        rgb = torch.tensor(mean).view(1, 3, 1, 1) + spread * texture
        plates.append(luma(rgb) if channels == 1 else rgb)
    return torch.cat(plates).clamp(0, 1)


def _standardise(t: torch.Tensor) -> torch.Tensor:
    return (t - t.mean()) / t.std().clamp_min(1e-8)


def _frost(x, c, gen, table):
    n, channels, h, w = x.shape
    plates = frost_textures(max(h, w), channels).to(x.device)
    which = torch.randint(0, 5, (n,), generator=gen)
    side = plates.shape[-1]
    tops = torch.randint(0, side - h + 1, (n,), generator=gen).tolist()
    lefts = torch.randint(0, side - w + 1, (n,), generator=gen).tolist()
    crops = torch.stack([plates[k, :, t:t + h, s:s + w] for k, t, s in zip(which.tolist(), tops, lefts)])
    return c[0] * x + c[1] * crops


def _fog(x, c, gen, table):
    n, _, h, w = x.shape
    mapsize = max(FOG_MAPSIZE.get(table, 1), _next_power_of_2(max(h, w)))
    fog = plasma_fractal(n, mapsize, c[1], gen)[:, None, :h, :w].to(x.device)
    max_val = x.flatten(1).max(1).values.view(n, 1, 1, 1)
    return (x + c[0] * fog) * max_val / (max_val + c[0])


def _brightness(x, c, gen, table):
    # Adding to HSV's value channel scales RGB by new V / V (hue and saturation stay).
    value = x.max(dim=1, keepdim=True).values
    new_value = (value + c).clamp(0, 1)
    scaled = x * (new_value / value.clamp_min(1e-12))
    return torch.where(value > 0, scaled, new_value.expand_as(x))


def _contrast(x, c, gen, table):
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * c + means


def _elastic_transform(x, c, gen, table):
    n, channels, h, w = x.shape
    if table != "imagenet":  # make_cifar_c.py, make_tinyimagenet_c.py: an affine warp, then a displacement field
        alpha, sigma, jitter = c[0] * h, c[1] * h, c[2] * h
        x = _random_affine(x, jitter, gen)
        dx = gaussian_filter(_rand(gen, (n, h, w), x) * 2 - 1, sigma, "reflect", 3.0) * alpha
        dy = gaussian_filter(_rand(gen, (n, h, w), x) * 2 - 1, sigma, "reflect", 3.0) * alpha
    else:  # imagecorruptions: displacement only, scaled to the image size
        alpha, sigma, max_d = c, 0.01 * h, 0.005 * h
        dx = gaussian_filter((_rand(gen, (n, h, w), x) * 2 - 1) * max_d, sigma, "reflect", 3.0) * alpha
        dy = gaussian_filter((_rand(gen, (n, h, w), x) * 2 - 1) * max_d, sigma, "reflect", 3.0) * alpha
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    return _sample(x, xs + dx, ys + dy)


def _sample(x: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling at pixel coordinates (N, H, W), reflecting at the borders."""
    h, w = x.shape[-2:]
    grid = torch.stack([2 * px / max(1, w - 1) - 1, 2 * py / max(1, h - 1) - 1], dim=-1)
    return F.grid_sample(x, grid.float(), mode="bilinear", padding_mode="reflection", align_corners=True)


def _random_affine(x: torch.Tensor, jitter: float, gen: torch.Generator) -> torch.Tensor:
    """make_cifar_c's affine: three points around the centre moved by up to ``jitter``."""
    n, _, h, w = x.shape
    centre = np.array([h // 2, w // 2], dtype=np.float64)
    side = min(h, w) // 3
    src = np.array([centre + side, [centre[0] + side, centre[1] - side], centre - side])
    moves = (torch.rand(n, 3, 2, generator=gen, dtype=torch.float64) * 2 - 1).numpy() * jitter
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten(), torch.ones(h * w, dtype=torch.float64)])
    px, py = [], []
    for i in range(n):
        dst = src + moves[i]
        # cv2.getAffineTransform(src, dst), then warpAffine samples src at M^-1 (dst pixel)
        forward = np.linalg.solve(np.c_[src, np.ones(3)], dst).T  # (2, 3)
        inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
        mapped = torch.from_numpy(inverse) @ points
        px.append(mapped[0].view(h, w))
        py.append(mapped[1].view(h, w))
    return _sample(x, torch.stack(px).to(x.device), torch.stack(py).to(x.device))


@lru_cache(maxsize=32)
def _box_matrix(size_out: int, size_in: int) -> torch.Tensor:
    """PIL's BOX resampling along one axis as a matrix: each output pixel averages the input
    pixels whose centres fall inside its footprint."""
    scale = size_in / size_out
    matrix = torch.zeros(size_out, size_in)
    for i in range(size_out):
        centre = (i + 0.5) * scale
        inside = [j for j in range(size_in) if -0.5 < (j + 0.5 - centre) / scale <= 0.5]
        matrix[i, inside] = 1.0 / len(inside)
    return matrix


def _pixelate(x, c, gen, table):
    h, w = x.shape[-2:]
    rows, cols = _box_matrix(int(h * c), h).to(x.device), _box_matrix(int(w * c), w).to(x.device)
    small = rows @ x @ cols.T
    return F.interpolate(small, size=(h, w), mode="nearest-exact")  # PIL's NEAREST (and BOX, upwards)


def _jpeg_compression(x, c, gen, table):
    import io

    from PIL import Image

    as_bytes = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    decoded = []
    for image in as_bytes:  # PIL's encoder, as the reference (4:2:0 chroma subsampling for RGB)
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "JPEG", quality=int(c))
        decoded.append(np.asarray(Image.open(buffer)).reshape(image.shape))
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).float().div(255).to(x.device)


_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {name: globals()[f"_{name}"] for name in CORRUPTIONS}


# ----------------------------------------------------------------------------- the probe

def corruption_errors(accuracy: dict[str, list[float]], clean: float, reference: dict[str, Any] | None
                      ) -> dict[str, Any]:
    """Hendrycks and Dietterich's corruption error of each corruption, and their means:
    CE_c = sum_s E_s,c / sum_s E^ref_s,c and relative CE_c = sum_s (E_s,c - E_clean) /
    sum_s (E^ref_s,c - E^ref_clean), errors in %; mCE is the mean over corruptions (x100)."""
    if reference is None:
        return {"ce": None, "relative_ce": None, "mce": None, "relative_mce": None}
    ce, relative = {}, {}
    ref_clean = 100 - reference["clean_accuracy"]
    for name, accs in accuracy.items():
        ref_accs = reference["accuracy"].get(name)
        if ref_accs is None or len(ref_accs) != len(accs):
            continue
        errors = [100 - a for a in accs]
        ref_errors = [100 - a for a in ref_accs]
        ce[name] = 100 * sum(errors) / max(1e-9, sum(ref_errors))
        denominator = sum(e - ref_clean for e in ref_errors)
        relative[name] = 100 * sum(e - (100 - clean) for e in errors) / denominator if denominator > 0 else None
    rel_values = [v for v in relative.values() if v is not None]
    return {"ce": ce, "relative_ce": relative, "mce": sum(ce.values()) / len(ce) if ce else None,
            "relative_mce": sum(rel_values) / len(rel_values) if rel_values else None}


class CorruptionsProbe(Probe):
    """Accuracy under the 15 ImageNet-C corruptions at 5 severities; mCE against a reference run."""

    default_samples = 20  # 75 conditions x 20 images: keeps the default suite under 20% of a digits step

    def prepare(self, context: Any) -> None:
        self.reference: list[Any] | None = None
        if self.config.reference:
            self.reference = read_reference_probe(self.config.reference, "corruptions", key="reference")

    def resolved(self, batch: ProbeBatch) -> dict[str, Any]:
        return {"parameters": table_name(batch.images.shape[-1], self.config.parameters)}

    def forward_passes(self, batch: ProbeBatch) -> int:
        return (1 + len(self.config.corruptions) * len(self.config.severities)) * batch.chunks()

    def run(self, batch: ProbeBatch) -> ProbeResult:
        clean = batch.accuracy(batch.images)
        accuracy: dict[str, list[float]] = {}
        for name in self.config.corruptions:
            accuracy[name] = []
            for severity in self.config.severities:
                corrupted = torch.cat([corrupt(chunk, name, severity, generator=batch.generator,
                                               parameters=self.config.parameters)
                                       for chunk in batch.images.split(batch.batch_size)])
                accuracy[name].append(batch.accuracy(corrupted))
        mean_accuracy = float(np.mean([a for accs in accuracy.values() for a in accs]))
        reference = None
        if self.reference is not None and batch.step < len(self.reference) and self.reference[batch.step]:
            reference = self.reference[batch.step]
        errors = corruption_errors(accuracy, clean, reference)
        scalars = {"clean_accuracy": clean, "mean_accuracy": mean_accuracy,
                   "mce": errors["mce"], "relative_mce": errors["relative_mce"]}
        scalars.update({f"accuracy/{name}": float(np.mean(accs)) for name, accs in accuracy.items()})
        grid = np.array([accuracy[name] for name in self.config.corruptions])
        image = render_heat_map(grid, f"accuracy (%) under corruption, step {batch.step}", vmin=0, vmax=100,
                                axis_labels=("severity", "corruption"))
        return ProbeResult(
            scalars={k: v for k, v in scalars.items() if v is not None},
            details={"clean_accuracy": clean, "severities": list(self.config.severities), "accuracy": accuracy,
                     **errors},
            images={"accuracy": image})


def read_reference_probe(path: str, label: str, *, key: str) -> list[Any]:
    """The per-step results of probe ``label`` in another run's metrics.json."""
    import json
    from pathlib import Path

    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "metrics.json"
    if not file.is_file():
        raise ConfigError(f"{file} does not exist; expected a run directory or its metrics.json", key=key)
    try:
        metrics = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{file} is not readable JSON ({exc})", key=key) from None
    steps = (metrics.get("probes") or {}).get(label) if isinstance(metrics, dict) else None
    if not isinstance(steps, list):
        raise ConfigError(f"{file} has no results of probe {label!r}", key=key)
    return steps
