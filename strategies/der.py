"""Dark Experience Replay++ (Buzzega et al. 2020), after Avalanche's DER.

Avalanche's DER is a template of its own, and its buffer stores each sample's logits at the
width the head had then, so replay batches mixing experiences cannot be collated once the
head grows. This plugin keeps Avalanche's scheme (one joint forward of a replay batch and
the new batch; CE on new data, ``alpha`` x MSE to the stored logits and ``beta`` x CE on the
replay batch) and its ``compute_dataset_logits``, with the toolkit's class-balanced memory
and logits padded to the total number of classes; the MSE uses the stored entries only.
(Not PyCIL's DER, the Dynamically Expandable Representation of Yan et al. 2021.)
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from incremental.strategy import StrategyContext

from .options import DERConfig
from .replay import ExemplarReplay


class _MemoryWithLogits(Dataset):
    def __init__(self, images: Any, logits: torch.Tensor):
        self.images, self.logits = images, logits

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, Any, torch.Tensor]:
        x, y, *_ = self.images[index]
        return x, y, self.logits[index]


class DarkExperienceReplay(ExemplarReplay):
    """DER++: replay of exemplars with their stored logits (MSE) and labels (CE)."""

    def __init__(self, config: DERConfig, context: StrategyContext):
        super().__init__(config, context)
        context.require_memory("der")
        self.logits: dict[tuple[int, int], torch.Tensor] = {}  # (experience, index) -> padded logits
        self.replay: Iterator[Any] | None = None
        self.replay_size = 0

    def after_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
        pass  # the memory comes in as a separate batch, not mixed into the dataset

    def state_dict(self) -> dict[str, Any]:
        keys = sorted(self.logits)
        return {**super().state_dict(), "logit_keys": [list(k) for k in keys],
                "logits": torch.stack([self.logits[k] for k in keys]) if keys else torch.empty(0)}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        super().load_state_dict(state, model)
        self.logits = {(int(e), int(i)): row for (e, i), row in zip(state["logit_keys"], state["logits"])}

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.replay = None
        memory = self.memory.dataset(self.context.train_dataset)
        if memory is None:
            return
        samples = self.memory.samples()
        logits = torch.stack([self.logits[s] for s in samples])
        self.replay_size = min(len(samples), self.config.batch_size_mem or strategy.train_mb_size)
        generator = torch.Generator().manual_seed(self.context.config.seed + strategy.clock.train_exp_counter)
        loader = DataLoader(_MemoryWithLogits(memory.train(), logits), batch_size=self.replay_size,
                            shuffle=True, drop_last=True, generator=generator)

        def cycle() -> Iterator[Any]:
            while True:
                yield from loader

        self.replay = cycle()

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        if self.replay is None:
            return
        x, y, logits = next(self.replay)
        strategy.mbatch[0] = torch.cat((x.to(strategy.device), strategy.mbatch[0]))
        strategy.mbatch[1] = torch.cat((y.to(strategy.device), strategy.mbatch[1]))
        strategy.mbatch[2] = torch.cat((torch.zeros_like(y).to(strategy.device), strategy.mbatch[2]))
        self.replay_logits = logits.to(strategy.device)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.replay is None:
            return
        n = self.replay_size
        out, y = strategy.mb_output, strategy.mb_y
        stored = self.replay_logits[:, : out.shape[1]]
        seen = ~torch.isnan(stored)
        mse = ((out[:n] - stored.nan_to_num()) ** 2 * seen).sum() / seen.sum().clamp(min=1)
        strategy.loss = F.cross_entropy(out[n:], y[n:]) + self.config.alpha * mse \
            + self.config.beta * F.cross_entropy(out[:n], y[:n])

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        from avalanche.training.supervised.der import compute_dataset_logits

        self.replay = None
        super().after_training_exp(strategy, **kwargs)  # selects the new classes' exemplars
        experience = strategy.experience.current_experience
        data = self.context.train_dataset(experience)
        samples = self.memory.samples()
        new = [index for exp, index in samples if exp == experience]
        if not new:
            return
        rows = compute_dataset_logits(data.subset(new).eval(), strategy.model, strategy.eval_mb_size, strategy.device)
        width = self.context.total_classes
        for index, row in zip(new, rows):
            padded = torch.full((width,), float("nan"))
            padded[: len(row)] = row
            self.logits[(experience, index)] = padded
        kept = set(samples)
        self.logits = {k: v for k, v in self.logits.items() if k in kept}
