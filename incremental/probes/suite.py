"""The Avalanche plugin that runs the configured probes after every experience's evaluation."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from ..config import Component, probe_labels
from ..progress import bar
from .base import PixelModel, Probe, ProbeBatch, ProbeData, build_probes, patch_grid, untouched


class ProbeSuite(SupervisedPlugin, supports_distributed=True):
    """Runs the configured probes after the evaluation of every experience.

    ``int8``: the run evaluates an int8 copy (``compress.quantize: int8_dynamic``), so the probes
    see that copy too, made from the model the same way; probes that differentiate the network
    (attacks) cannot, having no int8 backward, and see the fp32 model. Each result then says which
    network it describes (``network``). Results of the last step: :attr:`last_results`,
    :attr:`last_images`, :attr:`last_seconds`, :attr:`last_passes`.
    """

    FP32_FOR_GRADIENTS = "fp32 (int8 dynamic quantization has no backward; the int8 copy is made from this network)"

    def __init__(self, specs: Sequence[Component], data: ProbeData, num_experiences: int,
                 echo: Callable[[str], None] | None = None, *, int8: bool = False):
        super().__init__()
        self.int8 = int8
        self.labels = probe_labels(specs)
        self.probes: list[Probe] = build_probes(specs, data)
        self.data = data
        self.num_experiences = num_experiences
        self.echo = echo
        self.last_results: dict[str, Any] = {}
        self.last_images: dict[str, dict[str, np.ndarray]] = {}
        self.last_seconds: dict[str, float] = {}
        self.last_passes: dict[str, tuple[int, int]] = {}  # batches run and the bar's total

    def after_eval(self, strategy: Any, **kwargs: Any) -> None:
        step = strategy.clock.train_exp_counter - 1
        if step >= 0:
            self.run(strategy.model, step, strategy.device)

    def due(self, step: int, probe: Probe) -> bool:
        return (step + 1) % probe.options.every == 0 or step == self.num_experiences - 1

    def run(self, model: nn.Module, step: int, device: torch.device) -> dict[str, Any]:
        """Probe ``model`` after experience ``step``; returns {label: result JSON or None}."""
        self.last_results, self.last_images, self.last_seconds, self.last_passes = {}, {}, {}, {}
        pixel_model = PixelModel(model, self.data.mean, self.data.std).to(device)
        int8_model: PixelModel | None = None  # made on the first probe due that uses it, once per step
        loaded: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        with untouched(model):
            for position, (label, probe) in enumerate(zip(self.labels, self.probes)):
                if not self.due(step, probe):
                    self.last_results[label] = None
                    continue
                start = time.perf_counter()
                limit = probe.num_samples
                # Loaded once per sample count and step; unseen classes only for probes that use them.
                for future in (False, True) if probe.uses_future_images else (False,):
                    if (limit, future) not in loaded:
                        loaded[(limit, future)] = self.data.load(self.data.indices(step, limit, future=future), device)
                images, labels = loaded[(limit, False)]
                future_images = loaded[(limit, True)][0] if probe.uses_future_images else torch.empty(0)
                generator = torch.Generator().manual_seed(self.data.seed * 1_000_003 + step * 1009 + position)
                network, probed = None, pixel_model
                if self.int8 and probe.needs_input_gradients:
                    network = self.FP32_FOR_GRADIENTS
                elif self.int8:
                    if int8_model is None:
                        from ..models.compress import int8_copy

                        int8_model = PixelModel(int8_copy(model), self.data.mean, self.data.std)
                    network, probed = "int8_dynamic", int8_model
                batch = ProbeBatch(images=images, labels=labels, model=probed, generator=generator,
                                   batch_size=probe.options.batch_size, step=step,
                                   num_seen_classes=self.data.seen_classes(step), patch_grid=patch_grid(model),
                                   future_images=future_images if len(future_images) else None)
                planned, done = probe.forward_passes(batch), [0]
                with bar(planned, f"exp {step} probe {label}", unit="batch") as progress:
                    def advance() -> None:
                        done[0] += 1
                        progress.update(1)

                    probed.progress = advance
                    try:
                        result = probe.run(batch)
                    finally:
                        probed.progress = None
                seconds = time.perf_counter() - start
                self.last_results[label] = {**result.to_json(), "parameters": probe.parameters(batch),
                                            "num_samples": len(images), "time_s": seconds,
                                            **({"network": network} if network else {})}
                self.last_images[label] = result.images
                self.last_seconds[label] = seconds
                self.last_passes[label] = (done[0], planned)
                if self.echo is not None:
                    on = "" if network is None else f" [{network.split(' (')[0]}]"
                    self.echo(f"  probe {label}{on}: {probe_line(result)} ({seconds:.1f}s)")
        return self.last_results


def probe_line(result: Any) -> str:
    """What a probe's progress line says: its first summary numbers, or why it measured nothing."""
    summary = ", ".join(f"{k} {v:.2f}" for k, v in list(result.scalars.items())[:4] if v is not None)
    if summary:
        return summary
    reason = result.details.get("skipped")
    return f"skipped: {reason}" if reason else "no numbers"
