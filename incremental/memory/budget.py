"""An exemplar memory with a budget in bytes: every class an equal share, each share stored by
a codec (incremental.memory.codecs), decoded when replayed.

Peers count memory in exemplars ("2,000 images"), which hides how each is stored. Here the
budget is bytes, and each class keeps as many exemplars as its codec fits in its share: raw
pixels, JPEG files, or a NeRV network's weights. When new classes arrive the shares shrink,
and each old class is re-stored from what the memory holds (raw and JPEG drop their last
exemplars; NeRV fits a smaller network to its own decoded frames).

Every class record is ``label`` (int16) plus its codec's payload, and the memory's size is the
sum of those tensors' bytes: exactly what the checkpoint stores of it. The indices of the
original images are kept beside, outside the budget, only to score the decoded exemplars
(PSNR against the originals); training never reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .codecs import ExemplarCodec, Payload, payload_bytes, psnr_db, store_classes

LABEL_BYTES = 2  # each class record's label, as int16


@dataclass
class StoredClass:
    experience: int
    indices: list[int]  # the originals' positions in that experience's train set (diagnostics only)
    payload: Payload


class ByteBudgetMemory:
    def __init__(self, budget: int, codec: ExemplarCodec, *, seed: int):
        self.budget = int(budget)
        self.codec = codec
        self.seed = seed
        self.classes: dict[int, StoredClass] = {}
        self._decoded: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_fits: dict[int, dict[str, Any]] = {}  # the latest experience's fits, by label (NeRV)

    def share(self, num_classes: int) -> int:
        """Each class's bytes for its payload (its label's bytes taken off)."""
        return self.budget // max(1, num_classes) - LABEL_BYTES

    def _seed(self, label: int, experience: int) -> int:
        return (self.seed * 1_000_003 + label * 1009 + experience) % (2 ** 31)

    def add_classes(self, experience: int, ranked: dict[int, list[int]],
                    images: Callable[[list[int]], torch.Tensor]) -> None:
        """Store the new classes (label -> indices into this experience's train set, best
        first; ``images(indices)`` gives their uint8 pixels) and shrink the old ones to the new
        share. Classes whose codec fits nothing keep no exemplars."""
        from ..progress import bar

        share = self.share(len(self.classes) + len(ranked))
        old, new = sorted(self.classes), sorted(ranked)
        with bar(len(old) + len(new), "memory encoding", unit="class") as progress:
            shrunk, stored = ([None] * len(old), [None] * len(new)) if share <= 0 else store_classes(
                self.codec, share, [(self.classes[label].payload, self._seed(label, experience)) for label in old],
                [(images(ranked[label]), self._seed(label, experience)) for label in new])
            progress.update(len(old) + len(new))
        self.last_fits = {}
        # the codec's reports of the fits just made (none were made when the share is empty)
        reports = (getattr(self.codec, "last_fits", None) or []) if share > 0 else []
        for label, report in zip(old + new, reports):
            if report is not None:
                self.last_fits[label] = {"steps": report.steps, "fit_psnr_db": report.psnr_db}
        for label, payload in zip(old, shrunk):
            if payload is None:
                del self.classes[label]
            else:
                self.classes[label].payload = payload
                self.classes[label].indices = self.classes[label].indices[:self.codec.count(payload)]
        for label, payload in zip(new, stored):
            if payload is not None:
                order = ranked[label]
                self.classes[label] = StoredClass(experience, list(order[:self.codec.count(payload)]), payload)
        self._decoded = None
        assert self.bytes_used() <= self.budget, "a codec exceeded its share"

    def check_holds_one_exemplar(self, images: torch.Tensor, num_classes: int, codec_name: str) -> None:
        """Refuse a budget whose share for ``num_classes`` (the first experience's) holds no exemplar
        of ``images`` (a sample of the dataset's): the run would be plain finetuning."""
        from ..errors import ConfigError

        one = LABEL_BYTES + self.codec.smallest_exemplar(images)
        if self.share(num_classes) + LABEL_BYTES < one:
            raise ConfigError(f"{self.budget} bytes hold no exemplar: one {codec_name} exemplar of this dataset takes "
                              f"at least {one} bytes with its label, so the {num_classes} classes of experience 0 "
                              f"need at least {one * num_classes} bytes", key="protocol.memory.bytes")

    def bytes_used(self) -> int:
        return sum(LABEL_BYTES + payload_bytes(c.payload) for c in self.classes.values())

    def __len__(self) -> int:
        return sum(self.codec.count(c.payload) for c in self.classes.values())

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every exemplar as uint8 images and their labels, in label order (decoded once per
        experience), or None when empty."""
        if not self.classes:
            return None
        if self._decoded is None:
            parts = [(self.codec.decode(self.classes[label].payload), label) for label in sorted(self.classes)]
            images = torch.cat([images for images, _ in parts])
            labels = torch.cat([torch.full((len(images),), label, dtype=torch.long) for images, label in parts])
            self._decoded = (images, labels)
        return self._decoded

    def report(self, originals: Callable[[int, list[int]], torch.Tensor]) -> dict[str, Any]:
        """What metrics.json records after an experience: bytes used and allowed, exemplars
        held, and the decoded exemplars' PSNR (dB) against the originals
        (``originals(experience, indices)``); null PSNR means lossless."""
        decoded = self.decoded()
        psnr = None
        if decoded is not None:
            truth = torch.cat([originals(self.classes[label].experience, self.classes[label].indices)
                               for label in sorted(self.classes)])
            psnr = psnr_db(decoded[0], truth)
        report = {"bytes": self.bytes_used(), "budget_bytes": self.budget, "exemplars": len(self),
                  "classes": len(self.classes), "psnr_db": psnr}
        if self.last_fits:
            report["fits"] = {str(label): fit for label, fit in sorted(self.last_fits.items())}
        return report

    def state_dict(self) -> dict[str, Any]:
        return {"classes": {str(label): {"experience": c.experience, "indices": list(c.indices),
                                         "label": torch.tensor(label, dtype=torch.int16), "payload": dict(c.payload)}
                            for label, c in self.classes.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classes = {int(label): StoredClass(int(c["experience"]), [int(i) for i in c["indices"]], dict(c["payload"]))
                        for label, c in state["classes"].items()}
        self._decoded = None
