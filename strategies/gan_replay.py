"""Generative replay with a class-conditional GAN (Shin et al. 2017, "Continual Learning with
Deep Generative Replay"), built from the GAN literature's stable choices (incremental.memory.gan).

After each experience the generator trains on that experience's images plus its previous
self's samples of the old classes, so it keeps every class seen. While the classifier trains on
a new experience, each batch gets generated old-class samples, labelled by the class they were
generated for (``labels: condition``, conditional replay) or by the previous experience's model
(``labels: solver``, DGR's scholar), making up ``mix_ratio`` of the batch. Nothing but the
generator is kept (the previous model is the checkpointed one).

Hooks: ``before_training_exp`` (the replay's random stream), ``before_training_iteration``
(adds the generated samples to ``strategy.mbatch``), ``after_training_exp`` (trains the GAN,
then scores its samples with the current model).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from incremental.errors import ConfigError
from incremental.memory import extract_features
from incremental.memory.gan import (Generator, PooledPixels, ProjectionDiscriminator, frechet_distance, generator_bytes,
                                    grid, round_to_storage, sample, train_gan, upsamplings, widest_generator)
from incremental.models.net import classify, frozen
from incremental.strategy import StrategyContext, StrategyPlugin
from incremental.timing import phase

from .options import GANReplayConfig


class GANReplay(StrategyPlugin):
    """Generative replay: a class-conditional GAN (hinge, spectral norm, projection D, DiffAugment)."""

    def __init__(self, config: GANReplayConfig, context: StrategyContext):
        super().__init__(config, context)
        splits = context.splits
        context.require_stored_images("gan_replay")
        try:
            upsamplings(splits.image_size)
        except ValueError as exc:
            raise ConfigError(f"gan_replay: {exc}", key="dataset.image_size") from None
        # every network built here (the width search too) draws initial weights: from a
        # stream of its own, so the model's and data's random streams stay as they were
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed(0, 3))
            self._build_generator(config, context)
        self.seen: list[int] = []  # classes the generator has learnt
        self.old: list[int] = []  # classes replayed during the current experience
        self.replay_rng = torch.Generator()
        self.solver: Any = None  # labels: solver, the model as the previous experience left it
        self.report: dict[str, Any] | None = None
        self.grids: dict[str, Any] = {}

    def _build_generator(self, config: GANReplayConfig, context: StrategyContext) -> None:
        splits = context.splits
        budget = context.memory_bytes
        shape = {"num_classes": context.total_classes, "channels": splits.channels,
                 "image_size": splits.image_size, "z_dim": config.z_dim}
        width = config.width
        if width is None:
            width = min(32, config.max_width) if budget is None else widest_generator(
                budget, storage=config.storage, max_width=config.max_width, **shape)
            if width is None:
                smallest = generator_bytes(Generator(width=4, **shape), config.storage)
                raise ConfigError(f"the smallest generator (width 4) takes {smallest} bytes, over the budget of "
                                  f"{budget}", key="protocol.memory.bytes")
        self.generator = Generator(width=width, **shape)
        self.bytes = generator_bytes(self.generator, config.storage)
        if budget is not None and self.bytes > budget:
            raise ConfigError(f"a generator of width {width} takes {self.bytes} bytes, over "
                              f"protocol.memory.bytes = {budget}", key="strategy.width")

    def _seed(self, experience: int, stream: int) -> int:
        return (self.context.config.seed * 7919 + experience * 31 + stream) % (2 ** 31)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        experience = strategy.experience.current_experience
        self.old = list(self.seen)
        self.replay_rng.manual_seed(self._seed(experience, 0))
        self.solver = None
        if self.config.labels == "solver" and self.old:
            # the head has grown new rows already; the labels are argmaxes over the old classes only
            self.solver = frozen(copy.deepcopy(strategy.model))

    def generated_batch(self, count: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` generated old-class samples, normalised as the training inputs, and their
        labels (uniform over the old classes), from the replay's own random stream."""
        old = torch.tensor(self.old, dtype=torch.long)
        labels = old[torch.randint(0, len(old), (count,), generator=self.replay_rng)]
        images = self._normalise(sample(self.generator, labels, self.replay_rng)).to(device)
        labels = labels.to(device)
        if self.solver is not None:
            with torch.no_grad():
                logits = classify(self.solver, images)[:, old.to(device)]
            labels = old.to(device)[logits.argmax(dim=1)]
        return images, labels

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        splits = self.context.splits
        mean = torch.tensor(splits.mean).view(1, -1, 1, 1)
        std = torch.tensor(splits.std).view(1, -1, 1, 1)
        resize = getattr(splits.batch_augmentation, "resize", None)
        if resize:
            images = torch.nn.functional.interpolate(images, size=(resize, resize), mode="bilinear", align_corners=False)
        return (images - mean) / std

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        ratio = self.config.mix_ratio
        if not self.old or ratio <= 0:
            return
        x, y, *rest = strategy.mbatch
        count = int(round(len(x) * ratio / (1 - ratio)))
        if not count:
            return
        gen_x, gen_y = self.generated_batch(count, x.device)
        batch = [torch.cat([x, gen_x.to(x.dtype)]), torch.cat([y, gen_y.to(y.dtype)])]
        batch += [torch.cat([t, torch.zeros(count, dtype=t.dtype, device=t.device)]) for t in rest]
        strategy.mbatch = batch

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        experience = strategy.experience.current_experience
        data = self.context.train_dataset(experience)
        labels = torch.tensor([int(t) for t in data.targets], dtype=torch.long)
        real = self.context.train_images(experience, list(range(len(labels))))
        cfg, splits = self.config, self.context.splits
        device = torch.device(strategy.device)
        gpus = [device.index or 0] if device.type == "cuda" else []
        with phase(strategy, "generator_training"), torch.random.fork_rng(devices=gpus):
            torch.manual_seed(self._seed(experience, 1))  # seeds the GPU's stream too
            previous = copy.deepcopy(self.generator).eval() if self.old else None
            discriminator = ProjectionDiscriminator(num_classes=self.context.total_classes, channels=splits.channels,
                                                    image_size=splits.image_size, width=cfg.discriminator_width)
            self.generator.train()
            train_gan(self.generator, discriminator, real, labels, previous=previous, old_labels=self.old,
                      steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, loss=cfg.loss, d_steps=cfg.d_steps,
                      diffaugment=cfg.diffaugment, gp_weight=cfg.gp_weight, device=device)
            round_to_storage(self.generator, cfg.storage)
            self.generator.eval()
        self.seen = sorted(set(self.seen) | set(labels.tolist()))
        with phase(strategy, "generator_scoring"):
            self.report, self.grids = self._score(strategy, experience)

    @torch.no_grad()
    def _score(self, strategy: Any, experience: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The current model's accuracy on generated samples of every seen class (labelled by
        their condition), and the Frechet distance between those samples and the seen classes'
        test images in ``frechet_space``; and a grid of samples per class."""
        rng = torch.Generator().manual_seed(self._seed(experience, 2))
        per_class = self.config.quality_samples
        labels = torch.tensor(self.seen, dtype=torch.long).repeat_interleave(per_class)
        images = sample(self.generator, labels, rng)
        pixels = (images * 255).round().clamp(0, 255).to(torch.uint8)  # as a dataset stores images
        generated = self.context.images_dataset(pixels, labels).eval()
        model = strategy.model
        space = model if self.config.frechet_space == "model" else PooledPixels(8)
        feats = extract_features(space, generated, batch_size=strategy.eval_mb_size, device=strategy.device)
        logits = _logits(model, generated, strategy.eval_mb_size, strategy.device)
        accuracy = 100.0 * (logits.argmax(dim=1) == labels).float().mean().item()
        tests = [self.context.benchmark.test_stream[j].dataset for j in range(experience + 1)]
        test = tests[0]
        for part in tests[1:]:
            test = test.concat(part)
        real = extract_features(space, test, batch_size=strategy.eval_mb_size, device=strategy.device)
        report = {"codec": "gan", "bytes": self.bytes, "budget_bytes": self.context.memory_bytes, "exemplars": 0,
                  "classes": len(self.seen), "generator_width": self.generator.first_width // 2, "psnr_db": None,
                  "generated_accuracy": accuracy, "frechet_distance": frechet_distance(feats, real),
                  "frechet_space": self.config.frechet_space}
        shown = self.config.grid_samples
        grids = {f"generated/class_{c:03d}": grid(images[labels == c][:shown], rows=1) for c in self.seen}
        return report, grids

    def memory_report(self) -> dict[str, Any] | None:
        return self.report

    def memory_images(self) -> dict[str, Any]:
        return self.grids

    def state_dict(self) -> dict[str, Any]:
        return {"generator": {k: v.clone() for k, v in self.generator.state_dict().items()}, "seen": list(self.seen)}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        self.generator.load_state_dict(state["generator"])
        self.generator.eval()
        self.seen = [int(c) for c in state["seen"]]


def _logits(model: Any, dataset: Any, batch_size: int, device: Any) -> torch.Tensor:
    """The run's classifier (the model with its output adapter) on a dataset, in eval mode."""
    from torch.utils.data import DataLoader

    from incremental.models.net import classify, frozen

    was_training = model.training
    model.eval()
    loader = DataLoader(dataset.eval(), batch_size=batch_size, shuffle=False, generator=torch.Generator())
    logits = torch.cat([classify(model, batch[0].to(device)).float().cpu() for batch in loader])
    model.train(was_training)
    return logits
