"""The one training engine: every training loop in the toolkit takes its steps here.

Three loops train models: the run's Avalanche template (:mod:`.template`), ViTIL's balanced
finetuning (:mod:`.finetune`) and MAE pretraining (:mod:`incremental.mae`). Each gets from one
:class:`TrainingEngine` the same

- precision: autocast for ``bf16``/``fp16``, loss scaling for ``fp16``;
- compile: the training forward under ``torch.compile`` (static shapes); for a model with a
  backbone and a head, the backbone's pooled features are compiled and the head stays eager,
  so a growing head never recompiles;
- data path: batches made on the device (:mod:`incremental.data.device`, image folders through
  :mod:`incremental.data.jpeg`) when it is on, else a DataLoader;
- sharding under torchrun: each global batch split across ranks, the forward through torch's
  DistributedDataParallel (bucketed all-reduce overlapped with backward), each rank's loss
  weighted by its share of the global batch, buffers broadcast from rank 0 after each step;
  so N processes make the update one process makes on the whole batch.

The template keeps Avalanche's loop and callbacks and delegates its forward, backward, step
and data loaders here; :meth:`TrainingEngine.fit` is the plain loop for the other two (an LR
schedule per iteration, the loss read and checked for NaN every ``LOSS_CHECK_EVERY`` steps).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..distributed import SINGLE, DistInfo, GlobalBatches
from .optim import LOSS_CHECK_EVERY, scale_lrs

@functools.cache
def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP's switch for "no buffer broadcast before each forward" (buffers are broadcast after
    each step instead): ``forward_sync_buffers`` from torch 2.14, ``broadcast_buffers`` before."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel.__init__).parameters else "broadcast_buffers"
    return {name: False}


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, precision: str) -> ContextManager[Any]:
    """torch.autocast for ``precision`` on ``device``'s type (a no-op for fp32)."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class TrainingEngine:
    """Precision, compile, the data path and sharding, for any training loop over one device."""

    def __init__(self, device: torch.device | str, *, precision: str = "fp32", compile: bool | str = False,
                 dist: DistInfo | None = None, batch_augmentation: Any = None):
        """``compile``: False, True (torch's ``default`` mode) or a mode name. ``batch_augmentation``:
        the dataset's :class:`~incremental.data.device.BatchAugmentation` (or a file one) turns on
        the device data path; None keeps DataLoaders."""
        self.device = torch.device(device)
        self.precision = precision
        self.compile_mode: str | None = ("default" if compile is True else compile) or None
        self.dist = dist or SINGLE
        self.batch_augmentation = batch_augmentation
        # fp16 gradients underflow without scaling; bf16 has fp32's exponent range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self._compiled: tuple[int, Any] | None = None  # (id of what was compiled, the compiled module)
        self._ddp: tuple[tuple[int, ...], Any] | None = None  # (trainable parameters' ids, the DDP wrapper)
        self._device_images: Any = None

    # ---------------------------------------------------------------- one step
    def autocast(self) -> ContextManager[Any]:
        return autocast(self.device, self.precision)

    def compiled(self, model: nn.Module) -> Callable[..., Any]:
        """``model``'s forward under torch.compile (static shapes): the backbone's pooled features
        compiled and the head eager, so a growing head never recompiles; a model without a
        backbone and head compiled whole. Made again when the model or its backbone is swapped.

        The model itself is not compiled in place: teachers are deep copies of it, and a copy of
        an in-place-compiled module would still call the original's forward."""
        backbone = getattr(model, "backbone", None)
        split = backbone is not None and hasattr(model, "head")
        key = id(backbone if split else model)
        if self._compiled is None or self._compiled[0] != key:
            target = PooledFeatures(backbone) if split else model
            self._compiled = (key, torch.compile(target, mode=self.compile_mode, dynamic=False))
        compiled = self._compiled[1]
        if split:
            return lambda x: model.head(compiled(x))
        return compiled

    def data_parallel(self, model: nn.Module) -> nn.Module:
        """``model``'s training forward under torchrun: torch's DistributedDataParallel around it.
        Made again when the trainable parameters change (a grown head, a strategy or balanced
        finetuning freezing a part), since DDP registers them once. The model stays unwrapped:
        plugins, teachers and checkpoints see the plain module.

        ``find_unused_parameters``: prompt pools (L2P, DualPrompt) use only the selected prompts
        in a step; the search costs one graph traversal per step. Buffers (BatchNorm statistics)
        are broadcast from rank 0 after each step by :meth:`step`."""
        from torch.nn.parallel import DistributedDataParallel

        trainable = tuple(id(p) for p in model.parameters() if p.requires_grad)
        if self._ddp is None or self._ddp[0] != trainable or self._ddp[1].module.model is not model:
            forward = TrainingForward(model, self.compiled(model) if self.compile_mode else None)
            wrapper = DistributedDataParallel(
                forward, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True, **_no_forward_buffer_sync())
            self._ddp = (trainable, wrapper)
        return self._ddp[1]

    def forward(self, model: nn.Module, *inputs: Any) -> Any:
        """``model``'s training forward on ``inputs``, under the engine's autocast: through DDP
        under torchrun, compiled when compile is on, else the model's own. A backbone's auxiliary
        loss (L2P's pull constraint) stays on the backbone, as without DDP."""
        with self.autocast():
            if self.dist.enabled:
                self._mark_cudagraph_step()
                return self.data_parallel(model)(*inputs)[0]
            if self.compile_mode:
                self._mark_cudagraph_step()
                return self.compiled(model)(*inputs)
            return model(*inputs)

    def _mark_cudagraph_step(self) -> None:
        if self.compile_mode == "reduce-overhead":  # a new CUDA-graph step: earlier outputs are done
            torch.compiler.cudagraph_mark_step_begin()

    def shard_weight(self, local_samples: int) -> torch.Tensor | None:
        """world size x this rank's share of the global batch (1 for equal shards), for DDP's
        equal average over ranks; None in a single process. The global size is summed on the
        device: no host sync."""
        if not self.dist.enabled:
            return None
        import torch.distributed

        count = torch.tensor(float(local_samples), device=self.device)
        total = count.clone()
        torch.distributed.all_reduce(total)
        return self.dist.world_size * count / total

    def backward(self, loss: torch.Tensor, weight: torch.Tensor | None = None, *, retain_graph: bool = False) -> None:
        """Backward of ``loss`` (scaled for fp16). ``weight`` (:meth:`shard_weight`): shards of a
        last, partial global batch differ in size, and DDP averages gradients over ranks equally,
        so each rank's mean loss is weighted by its share: the gradient of the mean loss over the
        whole global batch, as in one process."""
        if weight is not None:
            loss = loss * weight
        self.scaler.scale(loss).backward(retain_graph=retain_graph)

    def step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        """The optimizer step through the scaler (skipped when fp16 gradients overflowed); under
        torchrun the gradients were reduced by DDP in backward, and buffers are then broadcast."""
        from ..distributed import broadcast_buffers

        self.scaler.step(optimizer)
        self.scaler.update()
        broadcast_buffers(model, self.dist)

    # ---------------------------------------------------------------- data
    def device_batches(self, dataset: Any, *, batch_size: int, train: bool, shuffle: bool, drop_last: bool,
                       num_workers: int = 0, sharded: bool = True) -> Any:
        """A device-path loader of ``[x, y, t]`` batches over the Avalanche ``dataset``: in-memory
        images (uint8 on the device) or image folders (bytes decoded on the device); None when
        the path is off or the dataset has samples from elsewhere. ``sharded``: under torchrun,
        this rank's shard of each global batch."""
        if self.batch_augmentation is None:
            return None
        from ..data.device import DeviceBatchLoader, DeviceImages, resolve
        from ..data.jpeg import FileBatchAugmentation, FileBatchLoader

        resolved = resolve(dataset)
        if resolved is None:
            return None
        common = dict(batch_size=batch_size, train=train, shuffle=shuffle, drop_last=drop_last, dataset=dataset,
                      dist=self.dist if sharded else None)
        if isinstance(self.batch_augmentation, FileBatchAugmentation):
            return FileBatchLoader(resolved, self.device, self.batch_augmentation, num_workers=num_workers, **common)
        if self._device_images is None or self._device_images.device != self.device:
            self._device_images = DeviceImages(self.device)
        return DeviceBatchLoader(resolved, self._device_images, self.batch_augmentation, **common)

    def batches(self, dataset: Any, *, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                num_workers: int = 0) -> Any:
        """An epoch-iterable of training batches ``[x, y, t]`` (train transforms) of the Avalanche
        ``dataset`` for a loop outside the template, through the run's data path: on the device
        when it is on, else a DataLoader. Shuffles (and, on the device, augmentation draws)
        come from a generator seeded by ``seed``, never from the training's random stream.
        Under torchrun each rank gets its shard of every global batch, and the ranks' shuffles
        agree (the same seed)."""
        from torch.utils.data import DataLoader

        loader = self.device_batches(dataset, batch_size=batch_size, train=True, shuffle=shuffle,
                                     drop_last=drop_last, num_workers=num_workers)
        if loader is not None:
            return SeededEpochs(loader, seed)
        generator = torch.Generator().manual_seed(seed)
        if self.dist.enabled:
            return self.sharded_loader(dataset.train(), batch_size, train=True, shuffle=shuffle, drop_last=drop_last,
                                       num_workers=num_workers, generator=generator)
        return DataLoader(dataset.train(), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          generator=generator, num_workers=num_workers)

    def sharded_loader(self, data: Any, batch_size: int, *, train: bool, shuffle: bool, drop_last: bool,
                       num_workers: int = 0, generator: torch.Generator | None = None,
                       persistent_workers: bool = False) -> Any:
        """A DataLoader of this rank's shard of each global batch of ``data`` under torchrun
        (Avalanche's own distributed evaluation loader pads shards with repeated samples, which
        would count them twice); shuffles from ``generator``, else torch's global one."""
        from torch.utils.data import DataLoader

        sampler = ShardedBatchSampler(len(data), batch_size, self.dist, train=train, shuffle=shuffle,
                                      drop_last=drop_last, generator=generator)
        return DataLoader(data, batch_sampler=sampler, num_workers=num_workers,
                          collate_fn=getattr(data, "collate_fn", None), pin_memory=self.device.type == "cuda",
                          persistent_workers=persistent_workers)

    # ---------------------------------------------------------------- a plain loop
    def fit(self, model: nn.Module, batches: Iterable[Sequence[Any]], optimizer: torch.optim.Optimizer, *,
            epochs: int, lr_factor: Callable[[int, int], float], loss: Callable[[Callable[..., Any], Sequence[Any]],
                                                                              torch.Tensor],
            check: Callable[[float, str], None], desc: str, on_epoch: Callable[[int, float], None] | None = None
            ) -> list[float]:
        """Train ``model`` for ``epochs`` over ``batches`` (an epoch-iterable with a length).

        ``lr_factor(iteration, iters_per_epoch)`` scales every group's ``base_lr`` before each
        step. ``loss(forward, batch)`` is one batch's mean loss, with ``forward(*inputs)`` the
        engine's training forward of ``model`` (DDP, compiled, under autocast) and the batch's
        tensors on the device. The loss stays on the device and is read, and passed to
        ``check(value, when)`` (which raises on a NaN; ``when`` names the epoch from 1, like the
        template's message), every ``LOSS_CHECK_EVERY`` steps and at each epoch's end. Returns
        each epoch's mean loss over the global batches (the same in every rank);
        ``on_epoch(epoch, mean)`` is called after each, and a progress bar labelled ``desc``
        counts the steps."""
        from ..progress import bar

        forward = lambda *inputs: self.forward(model, *inputs)  # noqa: E731
        steps = len(batches)  # type: ignore[arg-type]
        progress = bar(epochs * steps, desc)
        epoch_losses: list[float] = []
        iteration = 0
        try:
            for epoch in range(epochs):
                total, count = torch.zeros((), device=self.device), 0
                for batch in batches:
                    scale_lrs(optimizer, lr_factor(iteration, steps))
                    batch = [part.to(self.device, non_blocking=True) if torch.is_tensor(part) else part
                             for part in batch]
                    value = loss(forward, batch).float()
                    optimizer.zero_grad(set_to_none=True)
                    weight = self.shard_weight(len(batch[0]))
                    self.backward(value, weight)
                    self.step(optimizer, model)
                    # the global batch's mean: each rank's share, summed over ranks when read
                    total += value.detach() if weight is None else value.detach() * weight / self.dist.world_size
                    count, iteration = count + 1, iteration + 1
                    progress.update(1)
                    if count % LOSS_CHECK_EVERY == 0:
                        check(self._read(total) / count, f"in epoch {epoch + 1} of {epochs} (step {count})")
                mean = self._read(total) / max(1, count)
                check(mean, f"in epoch {epoch + 1} of {epochs}")
                epoch_losses.append(mean)
                progress.set_postfix(epoch=epoch + 1, loss=f"{mean:.3f}", refresh=False)
                if on_epoch is not None:
                    on_epoch(epoch, mean)
        finally:
            progress.close()
        return epoch_losses

    def _read(self, total: torch.Tensor) -> float:
        """A device sum as a number, summed over ranks under torchrun (so every rank reads the
        same value, and a NaN stops all of them together)."""
        if self.dist.enabled:
            import torch.distributed

            total = total.clone()
            torch.distributed.all_reduce(total)
        return float(total)


class SeededEpochs:
    """A device loader whose epochs draw their random numbers from their own seeded stream (the
    global generator's state is saved and restored around each epoch)."""

    def __init__(self, loader: Any, seed: int):
        self.loader, self.generator = loader, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
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


class ShardedBatchSampler(GlobalBatches):
    """A DataLoader batch sampler: this rank's shard of each global batch."""

    def __iter__(self) -> Any:  # type: ignore[override]
        for batch, shard in super().__iter__():
            if len(shard):  # evaluation only: a last batch smaller than the world
                yield batch[shard].tolist()


class TrainingForward(nn.Module):
    """The model's training forward as one module for DDP: the whole model, or the compiled
    forward (:meth:`TrainingEngine.compiled`) when compiled."""

    def __init__(self, model: nn.Module, compiled: Any = None):
        super().__init__()
        self.model = model
        self.__dict__["compiled"] = compiled  # a callable over the model's own modules, not a submodule

    def forward(self, *inputs: Any) -> tuple[Any, tuple[torch.Tensor, ...]]:
        """The model's output, and the auxiliary tensors this forward left for a loss: a backbone's
        ``aux_loss`` (L2P's pull constraint) and ``aux_outputs`` (MEMO's and DER's auxiliary
        logits, FOSTER's feature-enhancement logits), and an output adapter's ``aux_outputs``
        (PROOF's prototype logits, projections and logit scale). DDP looks for unused parameters from the
        outputs, so a loss over parameters outside the output's graph (the prompt keys, the logit
        scale) must be among them, or their gradients would be marked ready twice."""
        output = self.model(*inputs) if self.compiled is None else self.compiled(*inputs)
        backbone = getattr(self.model, "backbone", None)
        aux = [getattr(backbone, "aux_loss", None), *(getattr(backbone, "aux_outputs", None) or ()),
               *(getattr(getattr(self.model, "output_adapter", None), "aux_outputs", None) or ())]
        return output, tuple(t for t in aux if torch.is_tensor(t) and t.requires_grad)


class PooledFeatures(nn.Module):
    """A backbone's pooled features, ``forward_head(forward_features(x), pre_logits=True)``:
    the part of the model torch.compile gets."""

    def __init__(self, backbone: nn.Module):
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
