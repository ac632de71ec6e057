"""Data-parallel training under torchrun: every rank holds the same model, memory and random
state; each global batch is split across ranks; gradients, evaluation counts and losses are
reduced; only rank 0 writes.

Avalanche 0.6 detects torch.distributed (``DistributedHelper``) but its templates neither
shard data nor reduce gradients or metrics, and its replay buffers are per rank (DyTox's
erratum: N ranks, N times the memory). Here:

- all ranks seed identically, so the class order, initialisation, shuffles and the exemplar
  selection (a deterministic function of the shared model and data) agree: one global memory
  of the configured size, replicated, each exemplar seen once per epoch across ranks;
- a global batch of ``training.batch_size`` is split into contiguous shards, one per rank;
  the training forward runs through torch's DistributedDataParallel, whose bucketed
  all-reduce overlaps backward, with each rank's loss weighted by its share of the batch (the
  same update as one process on the whole batch, up to float summation order); then buffers
  (BatchNorm statistics) are broadcast from rank 0 (see :mod:`incremental.training.engine`);
- evaluation shards the test data and sums the per-experience counts, so the accuracy matrix
  is the single-process one exactly;
- feature passes outside the training loop (herding, iCaRL's class means, the prototypes of the
  pre-trained methods: :func:`incremental.memory.extract_features`) and EWC's Fisher are split
  across ranks and gathered; ViTIL's balanced finetuning and MAE pretraining train on the same
  engine, so each rank takes its shard of every global batch there too; probes run on rank 0
  only, keeping ranks equal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch (of indices)."""
        return batch.tensor_split(self.world_size)[self.rank] if self.enabled else batch


SINGLE = DistInfo()


class GlobalBatches:
    """An epoch's global batches over ``n`` samples: one permutation (torch's global generator,
    equal on every rank, as a DataLoader's sampler draws it), cut into ``batch_size`` pieces.
    Iterating yields each global batch (sample positions) and the positions within it that
    are this rank's contiguous shard (all of them in a single process)."""

    def __init__(self, n: int, batch_size: int, dist: DistInfo, *, train: bool, shuffle: bool, drop_last: bool,
                 generator: torch.Generator | None = None):
        """``generator``: the shuffles' own stream (the same seed on every rank), instead of
        torch's global generator."""
        self.n, self.batch_size, self.dist = n, batch_size, dist
        self.train, self.shuffle, self.drop_last = train, shuffle, drop_last
        self.generator = generator

    def __len__(self) -> int:
        """A last, partial batch is kept unless ``drop_last``, and in training only if every
        rank gets a sample of it (their gradients are averaged)."""
        full, rest = divmod(self.n, self.batch_size)
        keep_rest = rest and not self.drop_last and (rest >= self.dist.world_size or not self.train)
        return full + (1 if keep_rest else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for b in range(len(self)):
            batch = order[b * self.batch_size: (b + 1) * self.batch_size]
            yield batch, self.dist.shard(torch.arange(len(batch)))


def current() -> DistInfo:
    """The running process group, or a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return SINGLE


def gather_rows_with_grad(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows`` concatenated in rank order, differentiable (torch.distributed.nn's
    all_gather: each rank's gradient flows back to the rank that owns the rows, summed over
    ranks); shards of different lengths (a last, partial global batch) are padded for the
    collective and cut back. A single process gets ``rows`` back. For losses over the whole global
    batch (CLIP's contrastive loss), so that a run under torchrun equals one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    from torch.distributed.nn.functional import all_gather

    sizes = torch.tensor([len(rows)], device=rows.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(all_sizes, sizes)
    lengths = [int(s) for s in all_sizes]
    padded = torch.cat([rows, rows.new_zeros((max(lengths) - len(rows), *rows.shape[1:]))])
    return torch.cat([part[:n] for part, n in zip(all_gather(padded), lengths)])


def init_from_environment(requested_device: str) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL for CUDA, gloo on the
    CPU. A single process returns SINGLE and initialises nothing."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if dist.is_initialized():
        return current()
    import importlib

    # Avalanche's training package builds default loggers at import time, and refuses to once a
    # process group exists on a rank other than 0 (its datasets import it too): imported first.
    importlib.import_module("avalanche.training")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = requested_device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return current()


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """Each rank on its own GPU (torchrun's LOCAL_RANK)."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    import torch.distributed as dist

    if not info.enabled:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point() or buffer.dtype in (torch.long, torch.int):
            dist.broadcast(buffer, src=0)


def sum_tensor(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    import torch.distributed as dist

    if info.enabled:
        dist.all_reduce(value)
    return value


def shard_range(n: int, info: DistInfo) -> torch.Tensor:
    """This rank's contiguous part of ``range(n)`` (all of it in a single process)."""
    return torch.arange(n).tensor_split(info.world_size)[info.rank] if info.enabled else torch.arange(n)


def gather_shards(local: torch.Tensor, n: int, info: DistInfo) -> torch.Tensor:
    """The rows of every rank's :func:`shard_range` part of ``n`` rows, in order, on every rank
    (one all-gather; shards differ in size by at most one row, so each is padded to the largest)."""
    import torch.distributed as dist

    if not info.enabled:
        return local
    sizes = [len(part) for part in torch.arange(n).tensor_split(info.world_size)]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the run directory's timestamped name)."""
    import torch.distributed as dist

    if not info.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def on_rank_zero(action: Callable[[], None], info: DistInfo) -> None:
    """Run ``action`` on rank 0 only; a UserError it raises is raised on every rank (the
    others would otherwise wait for rank 0 at the first collective)."""
    from .errors import UserError

    failure = None
    if info.is_main:
        try:
            action()
        except UserError as exc:
            failure = (exc.message, exc.key, exc.source)
    failure = broadcast_object(failure, info)
    if failure is not None:
        message, key, source = failure
        raise UserError(message, key=key, source=source)


def barrier(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.enabled:
        dist.barrier()
