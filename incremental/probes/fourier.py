"""Fourier-basis sensitivity (Yin et al. 2019): the error rate when each image is perturbed
by one Fourier basis image of L2 norm ``eps`` (random sign per image and channel), for
every frequency, shown as a heat map with the zero frequency at the centre."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..tensorboard import render_heat_map
from .base import Probe, ProbeBatch, ProbeResult


def fourier_basis(h: int, w: int, row: int, col: int) -> torch.Tensor:
    """The real Fourier basis image of the (fftshifted) frequency index (row, col), unit L2 norm."""
    spectrum = torch.zeros(h, w, dtype=torch.complex128)
    u, v = (row - h // 2) % h, (col - w // 2) % w
    spectrum[u, v] = 1
    spectrum[(-u) % h, (-v) % w] = 1  # with its mirror the image is real
    basis = torch.fft.ifft2(spectrum).real
    return (basis / basis.norm()).float()


def frequency_radius(h: int, w: int) -> np.ndarray:
    """|frequency| of each (fftshifted) index, as a fraction of the Nyquist frequency."""
    fy = (np.arange(h) - h // 2) / (h / 2)
    fx = (np.arange(w) - w // 2) / (w / 2)
    return np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / math.sqrt(2)


def mirror_of(row: int, col: int, h: int, w: int) -> tuple[int, int]:
    """The frequency whose Fourier basis image is this one's up to sign."""
    return ((h - row) % h if h % 2 == 0 else h - 1 - row, (w - col) % w if w % 2 == 0 else w - 1 - col)


class FourierProbe(Probe):
    """Error rate under Fourier-basis noise at each frequency (a heat map), and per band.

    Bands: low, middle and high thirds of |frequency| relative to the Nyquist frequency."""

    default_samples = 50

    def resolved(self, batch: ProbeBatch) -> dict[str, Any]:
        h, w = batch.images.shape[-2:]
        return {"eps": self.config.eps or (4.0 if max(h, w) <= 64 else 15.7)}

    def forward_passes(self, batch: ProbeBatch) -> int:
        h, w = batch.images.shape[-2:]
        return (1 + len(self.probed_frequencies(h, w))) * batch.chunks()

    def probed_frequencies(self, h: int, w: int) -> list[tuple[int, int]]:
        """The frequencies run through the network: each basis image once (its mirror, the same
        image up to sign, reuses the result)."""
        done: set[tuple[int, int]] = set()
        for row in range(0, h, self.config.stride):
            for col in range(0, w, self.config.stride):
                if mirror_of(row, col, h, w) not in done:
                    done.add((row, col))
        return sorted(done)

    def run(self, batch: ProbeBatch) -> ProbeResult:
        n, c, h, w = batch.images.shape
        eps = self.config.eps or (4.0 if max(h, w) <= 64 else 15.7)
        error = np.full((h, w), np.nan)
        for row, col in self.probed_frequencies(h, w):  # row-major, as the random signs are drawn
            basis = fourier_basis(h, w, row, col).to(batch.device)
            signs = torch.randint(0, 2, (n, c, 1, 1), generator=batch.generator).to(batch.device) * 2 - 1
            perturbed = (batch.images + eps * signs * basis).clamp(0, 1)
            error[row, col] = 100 - batch.accuracy(perturbed)
        for row in range(0, h, self.config.stride):
            for col in range(0, w, self.config.stride):
                if np.isnan(error[row, col]):
                    error[row, col] = error[mirror_of(row, col, h, w)]  # the same basis image up to sign
        radius = frequency_radius(h, w)
        bands = {"low": radius < 1 / 3, "mid": (radius >= 1 / 3) & (radius < 2 / 3), "high": radius >= 2 / 3}
        scalars = {"clean_error": 100 - batch.accuracy(batch.images), "mean_error": float(np.nanmean(error))}
        for band, where in bands.items():
            values = error[where & ~np.isnan(error)]
            if values.size:
                scalars[f"error/{band}"] = float(values.mean())
        stride = self.config.stride
        probed = error[::stride, ::stride]  # the frequencies actually probed
        rows = [r - h // 2 for r in range(0, h, stride)]
        cols = [c - w // 2 for c in range(0, w, stride)]
        image = render_heat_map(probed, f"error (%) under Fourier noise, eps {eps:g}, step {batch.step}",
                                vmin=0, vmax=100, cmap="jet", axis_labels=("horizontal frequency", "vertical frequency"),
                                extent=(cols[0] - stride / 2, cols[-1] + stride / 2, rows[-1] + stride / 2,
                                        rows[0] - stride / 2))
        grid = [[round(float(v), 2) for v in row] for row in probed]
        return ProbeResult(scalars=scalars, details={"eps": eps, "error_map": grid, "row_frequencies": rows,
                                                     "col_frequencies": cols}, images={"error_map": image})
