"""Name -> component registries, in the spirit of timm's and fvcore's.

A registry is filled by the ``@REGISTRY.register(...)`` decorator at import time of the
module that defines the component; :func:`load_builtins` imports those modules
explicitly. A duplicate name is an error, and an unknown name is an error listing the
close matches. Each entry may carry a typed config dataclass: the config loader
validates the entry's section of the YAML against it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import ConfigError, did_you_mean

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    config_cls: type | None
    module: str

    @property
    def summary(self) -> str:
        doc = (getattr(self.obj, "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else ""


class Registry(Generic[T]):
    def __init__(self, kind: str, common: str | None = None):
        self.kind = kind  # singular noun used in messages: "backbone", "strategy", ...
        self._entries: dict[str, Entry[T]] = {}
        self._common = common  # "module:Class" of the options every entry of this kind takes

    @property
    def common_options(self) -> type | None:
        """The options class every entry takes besides its own (backbones: ``pretrained``,
        ``compress``; probes: ``num_samples``...), imported on first use."""
        if self._common is None:
            return None
        module, _, name = self._common.partition(":")
        return getattr(importlib.import_module(module), name)

    def register(self, name: str, *, config: type | None = None) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                previous = self._entries[name].module
                raise ConfigError(f"{self.kind} {name!r} is already registered (by {previous})")
            module = getattr(obj, "__module__", "?")
            self._entries[name] = Entry(name=name, obj=obj, config_cls=config, module=module)
            return obj

        return decorator

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            hint = did_you_mean(name, self._entries)
            raise ConfigError(f"unknown {self.kind} {name!r}{hint}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)


DATASETS: Registry[Any] = Registry("dataset")
BACKBONES: Registry[Any] = Registry("backbone", common="incremental.models.options:BackboneOptions")
STRATEGIES: Registry[Any] = Registry("strategy")
PROBES: Registry[Any] = Registry("probe", common="incremental.probes.options:ProbeOptions")

REGISTRIES: dict[str, Registry[Any]] = {
    "datasets": DATASETS,
    "backbones": BACKBONES,
    "strategies": STRATEGIES,
    "probes": PROBES,
}

# The modules whose import fills each registry. Kept explicit (no directory scanning) so
# what is built in is readable here; tests check that every module is listed.
BUILTIN_MODULES: dict[str, tuple[str, ...]] = {
    "datasets": ("incremental.data.digits", "incremental.data.synthetic",
                 "incremental.data.cifar", "incremental.data.imagefolder"),
    "backbones": ("incremental.models.vit", "incremental.models.resnet", "incremental.models.swin",
                  "incremental.models.dlcl"),
    "strategies": ("incremental.strategies.finetune", "incremental.strategies.replay",
                   "incremental.strategies.vitil", "incremental.strategies.icarl", "incremental.strategies.lwf",
                   "incremental.strategies.ewc", "incremental.strategies.bic", "incremental.strategies.der",
                   "incremental.strategies.gdumb"),
    "probes": ("incremental.probes.corruptions", "incremental.probes.masking", "incremental.probes.fourier",
               "incremental.probes.adversarial", "incremental.probes.ood"),
}


def load_builtins(*kinds: str) -> None:
    """Import the modules that register the built-in components (all kinds by default)."""
    for kind in kinds or tuple(BUILTIN_MODULES):
        for module in BUILTIN_MODULES[kind]:
            importlib.import_module(module)
    from .extensions import load_entry_points

    load_entry_points()  # installed packages' plugins: after the built-ins, so clashes name the plugin
