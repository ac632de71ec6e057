"""The run's SupervisedTemplate: Avalanche's, with mixed precision, channels_last inputs and a
tuned DataLoader.

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

from ..distributed import SINGLE, GlobalBatches
from ..timing import PhaseTimes

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, precision: str) -> ContextManager[Any]:
    """torch.autocast for ``precision`` on ``device``'s type (a no-op for fp32)."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def strategy_autocast(strategy: Any) -> ContextManager[Any]:
    """The run's autocast, for a plugin's extra forward passes (a teacher's); a no-op under a
    plain Avalanche template."""
    make = getattr(strategy, "autocast", None)
    return make() if callable(make) else contextlib.nullcontext()


class IncrementalTemplate(SupervisedTemplate):
    """SupervisedTemplate + ``precision`` (fp32, bf16, fp16 with loss scaling), ``channels_last``
    inputs and DataLoader settings (``persistent_workers``, ``prefetch_factor``)."""

    def __init__(self, *, precision: str = "fp32", channels_last: bool = False, compile: bool | str = False,
                 persistent_workers: bool = True, prefetch_factor: int | None = None,
                 batch_augmentation: Any = None, dist: Any = None, **kwargs: Any):
        """``batch_augmentation``: a :class:`~incremental.data.device.BatchAugmentation` turns on
        the device data path (uint8 images on the device, augmented there in batches)."""
        super().__init__(**kwargs)
        self.dist = dist or SINGLE  # a DistInfo: under torchrun, batches are sharded and reduced
        self.batch_augmentation = batch_augmentation
        self._device_images: Any = None
        # torch.compile's mode, or None for eager ("default" for ``compile: true``)
        self.compile_mode: str | None = ("default" if compile is True else compile) or None
        self._compiled: tuple[int, Any] | None = None
        self._ddp: tuple[tuple[int, ...], Any] | None = None  # (trainable parameters' ids, the DDP wrapper)
        self.precision = precision
        self.channels_last = channels_last
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        # fp16 gradients underflow without scaling; bf16 has fp32's exponent range and needs none.
        self.scaler = torch.amp.GradScaler(torch.device(self.device).type, enabled=precision == "fp16")
        self.phase_times = PhaseTimes(self.device)  # plugins time their phases into it (incremental.timing)

    def make_optimizer(self, **kwargs: Any) -> None:
        """Nothing to regroup: OptimizationPlugin builds a fresh optimizer over the trainable
        parameters at every experience, after the head has grown. (Avalanche's regrouping keeps
        the previous optimizer's groups, and fails on parameters a strategy froze.)"""
        self.optimized_param_id = dict(self.model.named_parameters())

    def autocast(self) -> ContextManager[Any]:
        return autocast(self.device, self.precision)

    def compiled_model(self) -> Any:
        """The training forward, compiled: the backbone's pooled features under torch.compile
        (static shapes), the head eager, so a growing head never recompiles. Made again when a
        plugin swaps the model or its backbone. A model without a backbone and head is compiled
        whole.

        The model itself is not compiled in place: teachers are deep copies of it, and a copy of
        an in-place-compiled module would still call the original's forward."""
        model = self.model
        backbone = getattr(model, "backbone", None)
        key = id(backbone if backbone is not None else model)
        if self._compiled is None or self._compiled[0] != key:
            target = PooledFeatures(backbone) if backbone is not None and hasattr(model, "head") else model
            self._compiled = (key, torch.compile(target, mode=self.compile_mode, dynamic=False))
        compiled = self._compiled[1]
        if backbone is not None and hasattr(model, "head"):
            return lambda x: model.head(compiled(x))
        return compiled

    def data_parallel(self) -> Any:
        """The training forward under torchrun: torch's DistributedDataParallel around the model
        (bucketed gradient all-reduce, overlapped with backward). Made again when the trainable
        parameters change (a grown head, a strategy freezing or unfreezing a part), since DDP
        registers them once. The model itself stays unwrapped: plugins, teachers and checkpoints
        see the plain module.

        ``find_unused_parameters``: prompt pools (L2P, DualPrompt) use only the selected prompts
        in a step; the search costs one graph traversal per step. Buffers (BatchNorm statistics)
        are broadcast from rank 0 after each step by :meth:`optimizer_step`, as before."""
        from torch.nn.parallel import DistributedDataParallel

        trainable = tuple(id(p) for p in self.model.parameters() if p.requires_grad)
        if self._ddp is None or self._ddp[0] != trainable:
            device = torch.device(self.device)
            forward = TrainingForward(self.model, self.compiled_model() if self.compile_mode else None)
            wrapper = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None,
                                              broadcast_buffers=False, find_unused_parameters=True)
            self._ddp = (trainable, wrapper)
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        return self._ddp[1]

    def forward(self) -> torch.Tensor:
        with self.autocast():
            if not self.is_training and getattr(self.model, "output_adapter", None) is not None:
                output = self.model.classify(self.mb_x)  # the strategy's classifier (NCM, BiC)
            elif self.dist.enabled and self.is_training:
                output = self.data_parallel()(self.mb_x)
                output = output[0] if isinstance(output, tuple) else output  # the aux loss stays on the backbone
            elif self.compile_mode and self.is_training:  # evaluation stays eager: its batches vary
                if self.compile_mode == "reduce-overhead":  # a new CUDA-graph step: earlier outputs are done
                    torch.compiler.cudagraph_mark_step_begin()
                output = self.compiled_model()(self.mb_x)
            else:
                output = super().forward()
        return output.float()  # losses and metrics in fp32

    def backward(self) -> None:
        loss = self.loss
        if self.dist.enabled:
            # DDP averages gradients over ranks equally; shards of a last, partial global batch
            # differ in size, so each rank's mean loss is weighted by its share of the batch:
            # the gradient of the mean loss over the whole global batch, as in one process.
            loss = loss * shard_weight(len(self.mb_y), self.dist, loss.device)
        self.scaler.scale(loss).backward(retain_graph=self.retain_graph)

    def optimizer_step(self) -> None:
        from ..distributed import broadcast_buffers

        self.scaler.step(self.optimizer)  # under torchrun the gradients were reduced by DDP in backward  # skipped when fp16 gradients overflowed
        self.scaler.update()
        broadcast_buffers(self.model, self.dist)

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
        if self._device_loader(train=train, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                               num_workers=kwargs.get("num_workers", 0)):
            return
        if self.dist.enabled:
            self._sharded_loader(batch_size, kwargs, train=train, shuffle=shuffle, drop_last=drop_last)
            return
        avalanche(**self._loader_args(kwargs))
        self._set_prefetch()

    def _set_prefetch(self) -> None:
        # Avalanche does not pass prefetch_factor on; the DataLoader reads it per iterator.
        if self.prefetch_factor is not None and getattr(self.dataloader, "num_workers", 0) > 0:
            self.dataloader.prefetch_factor = self.prefetch_factor

    def _sharded_loader(self, batch_size: int, kwargs: dict[str, Any], *, train: bool, shuffle: bool,
                        drop_last: bool) -> None:
        """Under torchrun: each global batch split across ranks. (Avalanche's own distributed
        evaluation loader pads shards with repeated samples, which would count them twice.)"""
        from torch.utils.data import DataLoader

        data = self.adapted_dataset
        workers = kwargs.get("num_workers", 0)
        sampler = ShardedBatchSampler(len(data), batch_size, self.dist, train=train, shuffle=shuffle,
                                      drop_last=drop_last)
        self.dataloader = DataLoader(data, batch_sampler=sampler, num_workers=workers,
                                     collate_fn=getattr(data, "collate_fn", None),
                                     pin_memory=torch.device(self.device).type == "cuda",
                                     persistent_workers=workers > 0 and self.persistent_workers)
        self._set_prefetch()

    def batches(self, dataset: Any, *, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                num_workers: int = 0) -> Any:
        """An epoch-iterable of training batches ``[x, y, t]`` (train transforms) of ``dataset``
        for a plugin's own loop (ViTIL's balanced finetuning), through the run's data path: on the
        device when it is on, else a DataLoader. Shuffles and augmentation draws come from a
        generator seeded by ``seed``, never from the training's random stream. Not sharded under
        torchrun: every rank makes the same batches."""
        from torch.utils.data import DataLoader

        loader = self._device_batches(dataset, batch_size=batch_size, train=True, shuffle=shuffle,
                                      drop_last=drop_last, num_workers=num_workers, dist=None)
        if loader is None:
            return DataLoader(dataset.train(), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                              generator=torch.Generator().manual_seed(seed), num_workers=num_workers)
        return SeededEpochs(loader, seed)

    def _device_loader(self, *, train: bool, batch_size: int, shuffle: bool, drop_last: bool,
                       num_workers: int = 0) -> bool:
        """Use the device data path for the experience's dataset if it is on and the dataset allows it."""
        loader = self._device_batches(self.adapted_dataset, batch_size=batch_size, train=train, shuffle=shuffle,
                                      drop_last=drop_last, num_workers=num_workers, dist=self.dist)
        if loader is None:
            return False
        self.dataloader = loader
        return True

    def _device_batches(self, dataset: Any, *, batch_size: int, train: bool, shuffle: bool, drop_last: bool,
                        num_workers: int, dist: Any) -> Any:
        """A device-path loader over ``dataset``: in-memory images (uint8 on the device) or image
        folders (bytes decoded on the device); None when the path is off or the dataset has
        samples from elsewhere."""
        if self.batch_augmentation is None:
            return None
        from ..data.device import DeviceBatchLoader, DeviceImages, resolve
        from ..data.jpeg import FileBatchAugmentation, FileBatchLoader

        resolved = resolve(dataset)
        if resolved is None:
            return None
        common = dict(batch_size=batch_size, train=train, shuffle=shuffle, drop_last=drop_last, dataset=dataset,
                      dist=dist)
        if isinstance(self.batch_augmentation, FileBatchAugmentation):
            return FileBatchLoader(resolved, torch.device(self.device), self.batch_augmentation,
                                   num_workers=num_workers, **common)
        if self._device_images is None or self._device_images.device != torch.device(self.device):
            self._device_images = DeviceImages(self.device)
        return DeviceBatchLoader(resolved, self._device_images, self.batch_augmentation, **common)


class SeededEpochs:
    """A device loader whose epochs draw their random numbers from their own seeded stream (the
    global generator's state is saved and restored around each epoch)."""

    def __init__(self, loader: Any, seed: int):
        self.loader, self.generator = loader, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        iterator = iter(self.loader)
        with torch.random.fork_rng(devices=[]):
            # device loaders plan the epoch (shuffle and every draw) before their first batch
            torch.random.set_rng_state(self.generator.get_state())
            try:
                first = next(iterator)
            except StopIteration:
                return
            finally:
                self.generator.set_state(torch.random.get_rng_state())
        yield first
        yield from iterator


def shard_weight(local_samples: int, dist: Any, device: torch.device) -> torch.Tensor:
    """world size x this shard's share of the global batch (1 for equal shards), for DDP's
    equal average; the global size is summed on the device, so no host sync."""
    import torch.distributed

    count = torch.tensor(float(local_samples), device=device)
    total = count.clone()
    torch.distributed.all_reduce(total)
    return dist.world_size * count / total


class TrainingForward(torch.nn.Module):
    """The model's training forward as one module for DDP: the whole model, or the head over
    the compiled forward (:meth:`IncrementalTemplate.compiled_model`) when compiled."""

    def __init__(self, model: torch.nn.Module, compiled: Any = None):
        super().__init__()
        self.model = model
        self.__dict__["compiled"] = compiled  # a callable over the model's own modules, not a submodule

    def forward(self, x: torch.Tensor) -> Any:
        """The logits, and a backbone's auxiliary loss when it left one (L2P's pull constraint):
        DDP looks for unused parameters from the outputs, so a loss over parameters outside the
        logits' graph (the prompt keys) must be among them, or its gradient would be reduced twice."""
        logits = self.model(x) if self.compiled is None else self.compiled(x)
        aux = getattr(getattr(self.model, "backbone", None), "aux_loss", None)
        return (logits, aux) if torch.is_tensor(aux) and aux.requires_grad else logits


class PooledFeatures(torch.nn.Module):
    """A backbone's pooled features, ``forward_head(forward_features(x), pre_logits=True)``:
    the part of the model torch.compile gets."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)


def compile_seconds() -> float:
    """Seconds torch.compile has spent so far in this process (dynamo and inductor, forward
    and backward graphs), from torch's own timers; 0 where they are not available."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # pragma: no cover - older torch
        return 0.0
    return float(sum(sum(times) for name, times in compilation_time_metrics.items()
                     if name == "_compile.compile_inner" or "bw_compiler" in name))


class ShardedBatchSampler(GlobalBatches):
    """A DataLoader batch sampler: this rank's shard of each global batch."""

    def __iter__(self) -> Any:  # type: ignore[override]
        for batch, shard in super().__iter__():
            if len(shard):  # evaluation only: a last batch smaller than the world
                yield batch[shard].tolist()
