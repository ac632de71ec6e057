"""The process a run lives in: the device, deterministic kernels and warning filters."""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

from ..errors import ConfigError


def hide_avalanche_deprecations() -> None:
    """Inside a ``catch_warnings`` block: drop the deprecation warnings raised inside Avalanche's
    own code on every experience (nothing a user can act on). Its ``@deprecated``
    decorator re-inserts a "once" filter at every call, ahead of any ignore filter, so the
    warnings are dropped at display time instead; every other warning is shown as usual."""
    shown = warnings.showwarning

    def show(message: Any, category: type, filename: str, *args: Any, **kwargs: Any) -> None:
        if f"{os.sep}avalanche{os.sep}" in filename and (
                issubclass(category, DeprecationWarning) or "non-tuple sequence" in str(message)):
            return  # the second: torch's indexing deprecation, inside Avalanche's EWC
        shown(message, category, filename, *args, **kwargs)

    warnings.showwarning = show


def use_deterministic_algorithms(enabled: bool) -> None:
    """Deterministic kernels (process-wide), as torch's reproducibility notes ask."""
    import torch

    if enabled:
        # cuBLAS needs a fixed workspace to be deterministic; set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = not enabled and torch.backends.cudnn.benchmark


def device_data_path(data_path: str, device: Any) -> bool:
    """Whether in-memory datasets go to the device (see TrainingConfig.data_path)."""
    return data_path == "device" or (data_path == "auto" and getattr(device, "type", str(device)) == "cuda")


def resolve_workers(num_workers: int | str) -> int:
    """``training.num_workers`` as a number: ``auto`` is the CPU cores this process may use,
    shared among the GPUs' processes on this node (torchrun's LOCAL_WORLD_SIZE, else the GPUs
    seen), less one for the training process itself."""
    if num_workers != "auto":
        return int(num_workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or _gpus_seen() or 1
    return max(0, cores // sharing - 1)


def _gpus_seen() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(requested: str) -> Any:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("cuda requested but no CUDA device is available", key="training.device")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def check_run_memory(cfg: Any, device: Any) -> None:
    """The config's sizes against this machine's memory (incremental.config.memory): host RAM,
    and on CUDA the GPU's free memory for what trains there. torch is imported only for CUDA."""
    from ..config.memory import check_memory

    if getattr(device, "type", str(device)) != "cuda":
        check_memory(cfg)
        return
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    check_memory(cfg, device_bytes=int(free), device_name=torch.cuda.get_device_name(device))


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` (training.threads) for the block, then restored;
    None leaves torch's default."""
    if count is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
