"""The run's SupervisedTemplate: Avalanche's loop and callbacks, taking its steps on the one
training engine (:mod:`.engine`): mixed precision, compile, the device data path and sharding
under torchrun; plus channels_last inputs and a tuned DataLoader.

Avalanche 0.6 has no mixed precision. Its template exposes ``forward``, ``backward`` and
``optimizer_step`` for subclasses, so autocast wraps the forward pass (training and
evaluation), fp16 scales the loss with a GradScaler, and the optimizer step goes through the
scaler; plugins (strategies, probes) are unchanged. Losses are computed outside autocast, in
fp32, from the low-precision logits, as torch's AMP recipe does.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch
from avalanche.training.templates import SupervisedTemplate

from ..distributed import SINGLE
from ..timing import PhaseTimes
from .engine import TrainingEngine, autocast
from .features import EvalFeatures, FeatureCache, start_without_reading

__all__ = ["IncrementalTemplate", "autocast", "strategy_autocast"]


def strategy_autocast(strategy: Any) -> ContextManager[Any]:
    """The run's autocast, for a plugin's extra forward passes (a teacher's); a no-op under a
    plain Avalanche template."""
    make = getattr(strategy, "autocast", None)
    return make() if callable(make) else contextlib.nullcontext()


class IncrementalTemplate(SupervisedTemplate):
    """SupervisedTemplate on the training engine: ``precision`` (fp32, bf16, fp16 with loss
    scaling), ``compile``, the device data path and torchrun sharding; plus ``channels_last``
    inputs and DataLoader settings (``persistent_workers``, ``prefetch_factor``)."""

    def __init__(self, *, precision: str = "fp32", channels_last: bool = False, compile: bool | str = False,
                 persistent_workers: bool = True, prefetch_factor: int | None = None,
                 batch_augmentation: Any = None, dist: Any = None, feature_cache_bytes: int = 0, **kwargs: Any):
        """``batch_augmentation``: a :class:`~incremental.data.device.BatchAugmentation` turns on
        the device data path (uint8 images on the device, augmented there in batches).
        ``feature_cache_bytes``: what the :class:`~.features.FeatureCache` of pooled features may
        hold (0: none), reused by evaluation and the strategies' feature passes."""
        super().__init__(**kwargs)
        self.engine = TrainingEngine(self.device, precision=precision, compile=compile, dist=dist or SINGLE,
                                     batch_augmentation=batch_augmentation)
        self.channels_last = channels_last
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self.phase_times = PhaseTimes(self.device)  # plugins time their phases into it (incremental.timing)
        self.feature_cache = FeatureCache(feature_cache_bytes)
        self._eval_features: EvalFeatures | None = None

    # Set by strategies whose loss sees the current experience's classes only (L2P, SLCA, EASE...):
    # the first class the training loss takes logits of; 0 is every class.
    loss_classes_from = 0

    def criterion(self) -> torch.Tensor:
        first = self.loss_classes_from
        if first and self.is_training:
            return self._criterion(self.mb_output[:, first:], self.mb_y - first)
        return super().criterion()

    # the engine's settings, read by plugins and the run
    @property
    def dist(self) -> Any:
        return self.engine.dist

    @property
    def precision(self) -> str:
        return self.engine.precision

    @property
    def compile_mode(self) -> str | None:
        return self.engine.compile_mode

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.engine.scaler

    def make_optimizer(self, **kwargs: Any) -> None:
        """Nothing to regroup: OptimizationPlugin builds a fresh optimizer over the trainable
        parameters at every experience, after the head has grown. (Avalanche's regrouping keeps
        the previous optimizer's groups, and fails on parameters a strategy froze.)"""
        self.optimized_param_id = dict(self.model.named_parameters())

    def autocast(self) -> ContextManager[Any]:
        return self.engine.autocast()

    def forward(self) -> torch.Tensor:
        if self._eval_features is not None:
            with self.autocast():
                pooled = self._eval_features.pooled(len(self.mb_x), lambda: self.model.pooled(self.mb_x))
                output = self.model.classify_pooled(pooled)
        elif not self.is_training and getattr(self.model, "output_adapter", None) is not None:
            with self.autocast():
                output = self.model.classify(self.mb_x)  # the strategy's classifier (NCM, BiC)
        elif self.is_training and (self.dist.enabled or self.compile_mode):
            output = self.engine.forward(self.model, self.mb_x)  # evaluation stays eager: its batches vary
        else:
            with self.autocast():
                output = super().forward()
        return output.float()  # losses and metrics in fp32

    def eval_epoch(self, **kwargs: Any) -> None:
        """Avalanche's evaluation loop, timed as phase ``eval_earlier`` on an earlier
        experience's test data (the part the feature cache serves)."""
        earlier = self.experience.current_experience < self.clock.train_exp_counter - 1
        with self.phase_times.phase("eval_earlier") if earlier else contextlib.nullcontext():
            self._eval_epoch_cached(**kwargs)

    def _eval_epoch_cached(self, **kwargs: Any) -> None:
        """The pooled features of this experience's images taken from the feature cache while
        the network under the head is unchanged. On a hit the loop runs over the cached
        features and the labels, without reading an image."""
        model = self.model
        if not (self.feature_cache.enabled and callable(getattr(model, "classify_pooled", None))):
            return super().eval_epoch(**kwargs)
        key = ("eval", self.experience.origin_stream.name, self.experience.current_experience,
               len(self.adapted_dataset))
        self._eval_features = features = EvalFeatures(self.feature_cache, key, model)
        image_loader = self.dataloader
        dataset = self.adapted_dataset
        cached = None if self.dist.enabled else features.cached_batches(  # a rank's shard is not in dataset order
            dataset.targets, dataset.targets_task_labels, self.eval_mb_size)
        if cached is not None and start_without_reading(image_loader):
            self.dataloader = cached
        try:
            super().eval_epoch(**kwargs)
            features.finish(model)
        finally:
            self._eval_features = None
            self.dataloader = image_loader

    def backward(self) -> None:
        self.engine.backward(self.loss, self.engine.shard_weight(len(self.mb_y)), retain_graph=self.retain_graph)

    def optimizer_step(self) -> None:
        self.engine.step(self.optimizer, self.model)

    def _unpack_minibatch(self) -> None:
        super()._unpack_minibatch()
        if self.channels_last and self.mbatch[0].dim() == 4:
            self.mbatch[0] = self.mbatch[0].contiguous(memory_format=torch.channels_last)

    def _loader_args(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if kwargs.get("num_workers", 0) > 0:
            # Workers kept across epochs (not restarted each epoch) and batches prefetched.
            kwargs.setdefault("persistent_workers", self.persistent_workers)
        return kwargs

    def make_train_dataloader(self, **kwargs: Any) -> None:
        # Compiled: each epoch's last partial batch is dropped (as timm's loader does), since a
        # new batch size would recompile; not when the data holds less than one batch.
        drop_last = kwargs.get("drop_last", False) or (
            self.compile_mode is not None and len(self.adapted_dataset) >= self.train_mb_size)
        kwargs["drop_last"] = drop_last
        self._make_loader(kwargs, train=True, batch_size=self.train_mb_size, shuffle=kwargs.get("shuffle", True),
                          drop_last=drop_last, avalanche=super().make_train_dataloader)

    def make_eval_dataloader(self, **kwargs: Any) -> None:
        self._make_loader(kwargs, train=False, batch_size=self.eval_mb_size, shuffle=False, drop_last=False,
                          avalanche=super().make_eval_dataloader)

    def _make_loader(self, kwargs: dict[str, Any], *, train: bool, batch_size: int, shuffle: bool, drop_last: bool,
                     avalanche: Any) -> None:
        """The device data path when it applies; else under torchrun a sharded DataLoader; else
        Avalanche's own loader (``avalanche``), with persistent workers and prefetching."""
        loader = self.engine.device_batches(self.adapted_dataset, batch_size=batch_size, train=train,
                                            shuffle=shuffle, drop_last=drop_last,
                                            num_workers=kwargs.get("num_workers", 0))
        if loader is not None:
            self.dataloader = loader
            return
        if self.dist.enabled:
            workers = kwargs.get("num_workers", 0)
            self.dataloader = self.engine.sharded_loader(self.adapted_dataset, batch_size, train=train,
                                                         shuffle=shuffle, drop_last=drop_last, num_workers=workers,
                                                         persistent_workers=workers > 0 and self.persistent_workers)
        else:
            avalanche(**self._loader_args(kwargs))
        self._set_prefetch()

    def _set_prefetch(self) -> None:
        # Avalanche does not pass prefetch_factor on; the DataLoader reads it per iterator.
        if self.prefetch_factor is not None and getattr(self.dataloader, "num_workers", 0) > 0:
            self.dataloader.prefetch_factor = self.prefetch_factor
