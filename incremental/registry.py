"""Name -> component registries, in the spirit of timm's and fvcore's.

A registry is filled by ``REGISTRY.declare(name, "module:attribute", config=..., summary=...)``
for the built-ins (their ``options`` modules, which import neither torch nor Avalanche: the
builder is imported when first used), and by the ``@REGISTRY.register(...)`` decorator in
users' plugin files; :func:`load_builtins` imports the built-ins' declarations. A duplicate name is an error, and an unknown name is an error listing the
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
    """A registered component: its name, its config class, a one-line summary, and the object
    that builds it, or (``declare``) where to import that object from when it is first used."""

    name: str
    target: Any  # the object, or "package.module:attribute"
    config_cls: type | None
    module: str
    declared_summary: str | None = None

    @property
    def obj(self) -> T:
        """The builder: imported on first use for a declared entry (a strategy's module imports
        torch and Avalanche; naming it in a config should not)."""
        if not isinstance(self.target, str):
            return self.target
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)

    @property
    def summary(self) -> str:
        if self.declared_summary is not None:
            return self.declared_summary
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
        """A decorator registering the object it decorates (what plugin files use)."""
        def decorator(obj: T) -> T:
            self._add(Entry(name=name, target=obj, config_cls=config, module=getattr(obj, "__module__", "?")))
            return obj

        return decorator

    def declare(self, name: str, target: str, *, config: type | None = None, summary: str) -> None:
        """Register ``target`` ("package.module:attribute") without importing it: the built-ins
        are declared this way, so ``incremental list`` and config validation stay light."""
        self._add(Entry(name=name, target=target, config_cls=config, module=target.partition(":")[0],
                        declared_summary=summary))

    def _add(self, entry: Entry[T]) -> None:
        if entry.name in self._entries:
            previous = self._entries[entry.name].module
            raise ConfigError(f"{self.kind} {entry.name!r} is already registered (by {previous})")
        self._entries[entry.name] = entry

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
# How a pre-trained ViT is tuned by the methods that start from one (adapters, SSF, VPT, ...)
TUNING: Registry[Any] = Registry("tuning")
# How an exemplar memory stores its images (raw pixels, JPEG, NeRV), for byte budgets
CODECS: Registry[Any] = Registry("codec")

REGISTRIES: dict[str, Registry[Any]] = {
    "datasets": DATASETS,
    "backbones": BACKBONES,
    "strategies": STRATEGIES,
    "probes": PROBES,
    "tuning": TUNING,
    "codecs": CODECS,
}

# The modules whose import fills each registry: each declares its kind's built-ins (their
# names, config classes and summaries) without importing what builds them. Kept explicit (no
# directory scanning) so what is built in is readable here.
BUILTIN_MODULES: dict[str, tuple[str, ...]] = {
    "datasets": ("incremental.data.options",),
    "backbones": ("incremental.models.options",),
    "strategies": ("incremental.strategies.options",),
    "probes": ("incremental.probes.options",),
    "tuning": ("incremental.models.options",),
    "codecs": ("incremental.memory.options",),
}


def load_builtins(*kinds: str) -> None:
    """Import the modules that register the built-in components (all kinds by default)."""
    for kind in kinds or tuple(BUILTIN_MODULES):
        for module in BUILTIN_MODULES[kind]:
            importlib.import_module(module)
    from .extensions import load_entry_points

    load_entry_points()  # installed packages' plugins: after the built-ins, so clashes name the plugin


def format_options(config_cls: type | None) -> str:
    """``name=default, ...`` of a config dataclass (nested ones in braces): what `incremental list`
    and the documentation's reference tables show."""
    import dataclasses

    if config_cls is None:
        return ""
    parts = []
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "?")
        if dataclasses.is_dataclass(default):
            parts.append(f"{f.name}={{{format_options(type(default))}}}")
        else:
            parts.append(f"{f.name}={default!r}")
    return ", ".join(parts)


def markdown_table(kind: str) -> str:
    """Registry ``kind`` as a Markdown table (name, what it is, options and defaults): the
    documentation site's reference pages, generated so that they cannot drift from the code."""
    load_builtins(kind)
    registry = REGISTRIES[kind]
    rows = ["| name | what | options (defaults) |", "| --- | --- | --- |"]
    for entry in registry:
        options = format_options(entry.config_cls).replace("|", "\\|")
        summary = entry.summary.replace("|", "\\|")
        rows.append(f"| `{entry.name}` | {summary} | {f'`{options}`' if options else '-'} |")
    if registry.common_options is not None:
        rows += ["", f"Every entry also takes: `{format_options(registry.common_options)}`."]
    return "\n".join(rows)
