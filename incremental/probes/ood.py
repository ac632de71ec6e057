"""Out-of-distribution detection, and its worst case (the adversarial-training OOD line of
work): in-distribution = the seen classes' test images; OOD = the classes of future
experiences, or another dataset. ``worst_case`` pushes each OOD image by PGD to raise the
detection score, i.e. to look in-distribution."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .attacks import apgd_score, pgd
from .base import Probe, ProbeBatch, ProbeResult, luma, unnormalise

SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "msp": lambda logits: logits.softmax(dim=1).max(dim=1).values,  # Hendrycks and Gimpel 2017
    "max_logit": lambda logits: logits.max(dim=1).values,  # Hendrycks et al. 2022
    "energy": lambda logits: torch.logsumexp(logits, dim=1),  # Liu et al. 2020 (negative energy, T = 1)
}


def fpr_at_tpr(inside: np.ndarray, outside: np.ndarray, tpr: float = 0.95) -> float:
    """The fraction of OOD scores kept at the threshold whose true-positive rate (in-distribution
    kept, ``score >= threshold``) is nearest ``tpr``, the lowest such threshold; ties between two
    rates go to the higher one. This is the OOD literature's FPR95 (Hendrycks et al.'s
    ``fpr_and_fdr_at_recall``, which MCM, Energy and Outlier Exposure report); the threshold is
    always an in-distribution score, so no interpolation enters."""
    positives = np.sort(np.asarray(inside, dtype=np.float64))[::-1]
    count = len(positives)
    # the achievable numbers kept: k with positives[k-1] > positives[k], and all of them
    kept = np.r_[np.flatnonzero(positives[:-1] > positives[1:]) + 1, count]
    distance = np.abs(kept / count - tpr)
    chosen = int(kept[::-1][np.argmin(distance[::-1])])  # argmin's first: the higher rate on a tie
    outside = np.asarray(outside, dtype=np.float64)
    if chosen == count:  # the highest threshold keeping every in-distribution score
        return float((outside >= positives[-1]).mean())
    return float((outside > positives[chosen]).mean())  # down to just above the next one


def auroc_fpr95(inside: np.ndarray, outside: np.ndarray) -> tuple[float, float]:
    """AUROC (%) with in-distribution as positive, and FPR95 (%): :func:`fpr_at_tpr` at 95%."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(inside)), np.zeros(len(outside))]
    auroc = 100.0 * roc_auc_score(labels, np.r_[inside, outside])
    return float(auroc), 100.0 * fpr_at_tpr(inside, outside)


def to_run_format(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Another dataset's [0, 1] images at the run's size and channel count."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if images.shape[1] == 3 and channels == 1:
        images = luma(images)
    elif images.shape[1] == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    return images.clamp(0, 1)


class TextScoredModel(torch.nn.Module):
    """Pixels in [0, 1] to MCM's logits over the seen classes: the cosine similarity of the
    image embedding to each class's text embedding, divided by ``temperature``."""

    def __init__(self, pixel_model: torch.nn.Module, text: torch.Tensor, temperature: float):
        super().__init__()
        self.pixel_model = pixel_model
        self.register_buffer("text", text, persistent=False)
        self.temperature = temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        net = self.pixel_model.model
        pooled = net.forward_head(net.forward_features(self.pixel_model.inputs(images)), pre_logits=True)
        return F.normalize(pooled.float(), dim=-1) @ self.text.T / self.temperature


def check_text_heads(specs: Any, model: torch.nn.Module) -> None:
    """An error before any work when an OOD probe scores with text and the model has none."""
    from ..models.clip import has_text_tower

    for i, spec in enumerate(specs):
        if spec.name == "ood" and getattr(spec.config, "head", "logits") == "text" and not has_text_tower(model):
            raise ConfigError("'text' scores with a text tower (backbone.name: clip); this backbone has none",
                              key=f"probes.{i}.head")


class OodProbe(Probe):
    """OOD detection: AUROC and FPR at 95% TPR of MSP, max-logit and energy scores.

    ``worst_case: true`` adds the same after a PGD attack that raises the OOD images' score."""

    default_samples = 500

    @property
    def uses_future_images(self) -> bool:  # type: ignore[override]
        return self.config.source == "future"

    @property
    def needs_input_gradients(self) -> bool:  # type: ignore[override]
        return bool(self.config.worst_case)

    def prepare(self, context: Any) -> None:
        self.outside: torch.Tensor | None = None
        if self.config.worst_case and self.config.attack == "apgd_ce":
            import importlib.util

            if importlib.util.find_spec("torchattacks") is None:  # said before the first step, not after it
                raise ConfigError("attack apgd_ce uses torchattacks' APGD, which is not installed: pip install "
                                  "--no-deps torchattacks (its requirements pin an old requests)", key="attack")
        self.texts, self.templates = context.class_texts, []
        if self.config.head == "text":  # only a text head reads templates (and may need open_clip for them)
            from ..models.clip import prompt_templates

            self.templates = prompt_templates(context.templates)
        if self.config.source != "dataset":
            return
        from ..data import build_dataset

        spec = self.config.dataset
        splits = build_dataset(spec.name, spec.config)  # its DataErrors name dataset.KEY
        order = np.random.default_rng(context.seed).permutation(len(splits.test))[: self.num_samples]
        images = torch.stack([splits.eval_transform(splits.test[int(i)][0]) for i in order])
        self.outside = to_run_format(unnormalise(images, splits.mean, splits.std), context.image_size, context.channels)

    def forward_passes(self, batch: ProbeBatch) -> int:
        outside = self.outside if self.outside is not None else batch.future_images
        if outside is None:
            return 0
        passes = batch.chunks() + batch.chunks(len(outside))
        if self.config.worst_case:
            # per score: each restart's steps and its score (APGD's own loop: about the same), then the scores
            per_chunk = self.config.restarts * (self.config.steps + 1)
            passes += len(self.config.scores) * (per_chunk + 1) * batch.chunks(len(outside))
        return passes

    def run(self, batch: ProbeBatch) -> ProbeResult:
        outside = self.outside.to(batch.device) if self.outside is not None else batch.future_images
        if outside is None:
            return ProbeResult(scalars={}, details={"skipped": "no unseen classes left to serve as OOD data"})
        if self.config.head == "text":
            import dataclasses

            backbone = batch.model.model.backbone
            text = backbone.text_embeddings(self.texts[:batch.num_seen_classes], self.templates).to(batch.device)
            batch = dataclasses.replace(batch, model=TextScoredModel(batch.model, text, self.config.temperature))
        inside_logits, outside_logits = batch.logits(batch.images), batch.logits(outside)
        scalars: dict[str, float] = {}
        details: dict[str, Any] = {"num_ood": len(outside), "source": self.config.source, "head": self.config.head}
        for name in self.config.scores:
            score = SCORES[name]
            inside = score(inside_logits).cpu().numpy()
            auroc, fpr = auroc_fpr95(inside, score(outside_logits).cpu().numpy())
            scalars[f"auroc/{name}"], scalars[f"fpr95/{name}"] = auroc, fpr
            if self.config.worst_case:
                seen = batch.num_seen_classes

                def objective(logits: torch.Tensor, _: torch.Tensor, score=score) -> torch.Tensor:
                    return score(logits[:, :seen])

                attacked = torch.cat([self.attack(batch, x, objective) for x in outside.split(batch.batch_size)])
                auroc, fpr = auroc_fpr95(inside, score(batch.logits(attacked)).cpu().numpy())
                scalars[f"worst_auroc/{name}"], scalars[f"worst_fpr95/{name}"] = auroc, fpr
        return ProbeResult(scalars=scalars, details=details)

    def resolved(self, batch: ProbeBatch) -> dict[str, Any]:
        if not self.config.worst_case:
            return {}
        if self.config.attack == "apgd_ce":
            import torchattacks

            return {"implementation": f"torchattacks {torchattacks.__version__} APGD, loss ce on [0, score]"}
        return {"implementation": "incremental.probes.attacks.pgd", "step_size": 2.5 * self.config.eps / self.config.steps}

    def attack(self, batch: ProbeBatch, images: torch.Tensor, objective: Any) -> torch.Tensor:
        """The configured attack raising the detection score of ``images`` (OOD data): the best
        of ``restarts`` PGD runs, or torchattacks' APGD with its own restarts."""
        cfg = self.config
        if cfg.attack == "apgd_ce":
            seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=batch.generator))
            return apgd_score(batch.model, images, score=lambda logits: objective(logits, None), eps=cfg.eps,
                              norm=cfg.norm, steps=cfg.steps, restarts=cfg.restarts, seed=seed)
        dummy = torch.zeros(len(images), dtype=torch.long, device=images.device)
        best, best_score = images, None
        for _ in range(cfg.restarts):
            attacked = pgd(batch.model, images, dummy, eps=cfg.eps, norm=cfg.norm, steps=cfg.steps,
                           generator=batch.generator, objective=objective)
            with torch.no_grad():
                value = objective(batch.model(attacked), dummy)
            if best_score is None:
                best, best_score = attacked, value
            else:
                better = value > best_score
                best = torch.where(better.view(-1, 1, 1, 1), attacked, best)
                best_score = torch.maximum(value, best_score)
        return best
