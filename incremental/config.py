"""Strict, typed run configuration loaded from YAML.

A run config is a tree of dataclasses. Loading is strict: an unknown key, a value of the
wrong type or out of range raises :class:`ConfigError` carrying the dotted key path and the
file the value came from, which the CLI prints as ``FILE: key.path: problem``.

Sections that pick a registered component (``dataset``, ``backbone``, ``strategy``,
``probes``) are written as ``{name: NAME, ...options}``, or just ``NAME``; the options are
validated against that component's own config dataclass.

A config file may start from another with ``extends: NAME_OR_PATH`` (deep merge; a section
whose ``name`` changes is replaced rather than merged). ``--set key.path=value`` overrides
are applied last, with values parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError, UserError, did_you_mean
from .registry import REGISTRIES

# ----------------------------------------------------------------------------- fields


def opt(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, factory: Any = None) -> Any:
    """A dataclass field with an optional numeric range, checked on load."""
    metadata = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Component:
    """A registered component chosen by name, with its typed options. ``common`` holds the
    options every component of its kind takes (for backbones: ``pretrained``, ``compress``)."""

    name: str
    config: Any = None
    common: Any = None


def component(kind: str, default: str | None = None) -> Any:
    """A field holding a :class:`Component` from registry ``kind`` (``"backbones"``...)."""
    return field(default=None, metadata={"registry": kind, "default_name": default})


def component_list(kind: str) -> Any:
    return field(default_factory=list, metadata={"registry": kind})


@dataclass
class EmptyConfig:
    """Options of a component that takes none."""


# ----------------------------------------------------------------------------- schema


@dataclass
class PruneConfig:
    """Structured pruning with torch-pruning: a fraction of the channels inside each block
    (MLP hidden units, attention head dimensions, inner conv channels), ranked by group L2
    (or L1) norm. Residual widths stay, so ``num_features`` and the growing head do not change."""

    ratio: float = opt(0.5, gt=0, lt=1)
    importance: Literal["l2", "l1", "random"] = "l2"
    round_to: int | None = opt(None, ge=1)  # keep channel counts multiples of this (GPU kernels like 8)


@dataclass
class LowRankConfig:
    """Each Linear layer W (out x in) of the backbone becomes two, W ~ U_r S_r V_r^T from its
    SVD, where that saves parameters. ``rank_ratio`` keeps r = ratio * min(in, out); ``energy``
    instead keeps the fewest singular values holding that fraction of sum(s^2)."""

    rank_ratio: float = opt(0.25, gt=0, le=1)
    energy: float | None = opt(None, gt=0, le=1)
    min_features: int = opt(32, ge=1)  # smaller layers stay dense


@dataclass
class DistillConfig:
    """Feature distillation from a frozen, larger teacher backbone (usually ``pretrained:``):
    a linear projection of the student's pooled features is pulled toward the teacher's."""

    teacher: Component = component("backbones")
    weight: float = opt(1.0, ge=0)
    loss: Literal["cosine", "mse"] = "cosine"


@dataclass
class CompressConfig:
    prune: PruneConfig | None = None
    low_rank: LowRankConfig | None = None
    quantize: Literal["none", "int8_dynamic"] = "none"  # int8 Linear weights for evaluation (CPU)
    distill: DistillConfig | None = None

    @property
    def structural(self) -> bool:
        return self.prune is not None or self.low_rank is not None

    @property
    def enabled(self) -> bool:
        return self.structural or self.quantize != "none" or self.distill is not None


@dataclass
class BackboneOptions:
    """Options every backbone takes, next to its own."""

    # weights only: a safetensors file, or a torch/timm checkpoint (loaded with weights_only)
    pretrained: str | None = None
    compress: CompressConfig = opt(factory=CompressConfig)


@dataclass
class ProbeOptions:
    """Options every probe takes, next to its own."""

    num_samples: int | None = opt(None, ge=1)  # seen-class test images per step; None: the probe's default
    batch_size: int = opt(250, ge=1)
    every: int = opt(1, ge=1)  # probe after every k-th experience; the last one is always probed
    label: str | None = None  # the results key (default: the probe's name); needed to list a probe twice


# Options shared by every component of a registry, parsed next to the component's own.
COMMON_OPTIONS: dict[str, type] = {"backbones": BackboneOptions, "probes": ProbeOptions}


@dataclass
class MemoryConfig:
    """Exemplar memory budget: a fixed total (iCaRL: 2000) or a fixed number per class
    (PODNet: 20). Neither set means no memory."""

    total: int | None = opt(None, ge=0)
    per_class: int | None = opt(None, ge=0)

    def validate(self) -> None:
        if self.total is not None and self.per_class is not None:
            raise ConfigError("set either total or per_class, not both", key="per_class")


@dataclass
class ProtocolConfig:
    """How the dataset's classes are split into experiences.

    ``initial_classes: 0`` is the B0 protocol (every experience has ``increment`` classes);
    ``initial_classes: 50`` is B50 (50 classes first, then ``increment`` per experience).
    ``increment`` may be a list for uneven steps; then it lists every experience after the
    initial one (or every experience, for B0) and must add up to the class count.

    ``class_order`` is ``random`` (a permutation drawn from ``order_seed``, as PyCIL does
    with numpy), ``sorted``, a named order (``incremental list protocols`` shows them), or
    an explicit list of class ids.
    """

    initial_classes: int = opt(0, ge=0)
    increment: Union[int, list[int]] = 10
    class_order: Union[str, list[int]] = "random"
    order_seed: int | None = None
    memory: MemoryConfig = opt(factory=MemoryConfig)

    def validate(self) -> None:
        steps = self.increment if isinstance(self.increment, list) else [self.increment]
        if not steps:
            raise ConfigError("must not be empty", key="increment")
        for i, n in enumerate(steps):
            if n <= 0:
                key = f"increment.{i}" if isinstance(self.increment, list) else "increment"
                raise ConfigError(f"must be > 0, got {n}", key=key)


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = opt(1e-3, gt=0)
    # LR for the first experience only (PyCIL's init_lr); None means ``lr``.
    initial_lr: float | None = opt(None, gt=0)
    weight_decay: float = opt(0.05, ge=0)
    momentum: float = opt(0.9, ge=0, lt=1)  # SGD only


@dataclass
class SchedulerConfig:
    """Learning-rate schedule, restarted at every experience and stepped every iteration."""

    name: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: int = opt(0, ge=0)
    milestones: list[int] = opt(factory=list)  # epochs, for ``step``
    gamma: float = opt(0.1, gt=0, le=1)
    min_lr_ratio: float = opt(0.0, ge=0, le=1)  # cosine floor, as a fraction of the LR


@dataclass
class TrainingConfig:
    epochs: int = opt(10, ge=1)
    # Epochs of the first experience (PyCIL's init_epoch); None means ``epochs``.
    initial_epochs: int | None = opt(None, ge=1)
    batch_size: int = opt(64, ge=1)
    eval_batch_size: int = opt(256, ge=1)
    label_smoothing: float = opt(0.0, ge=0, lt=1)
    optimizer: OptimizerConfig = opt(factory=OptimizerConfig)
    scheduler: SchedulerConfig = opt(factory=SchedulerConfig)
    num_workers: int = opt(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # fp32, or autocast to bf16 / fp16 (fp16 adds loss scaling); the forward pass only
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False  # NHWC model and inputs: faster convolutions on GPUs (conv models)
    compile: bool = False  # torch.compile the model's forward (a GPU option: no speed-up on CPUs)
    # device: in-memory datasets (digits, synthetic, CIFAR) held on the device as uint8 and
    # augmented there in batches; loader: a DataLoader with per-sample transforms; auto: device
    # on CUDA, loader on the CPU (other datasets always take the loader)
    data_path: Literal["auto", "device", "loader"] = "auto"
    persistent_workers: bool = True  # with num_workers > 0: keep the workers between epochs
    prefetch_factor: int | None = opt(None, ge=1)  # batches each worker loads ahead (None: torch's 2)
    # torch.use_deterministic_algorithms: bit-identical GPU runs at some speed cost (CPU runs
    # are bit-identical without it); an op with no deterministic kernel then raises an error.
    deterministic: bool = False


@dataclass
class OutputConfig:
    root: str = "runs"  # run directories go here unless --out names one
    tensorboard: bool = True
    save_model: bool = True  # model.safetensors after each experience (for `incremental probe`)
    # checkpoint.pt after each experience, for --resume; all: also checkpoints/experience_XXX.pt
    checkpoint: Literal["last", "all", "off"] = "last"


@dataclass
class RunConfig:
    name: str | None = None  # defaults to the config file's stem
    description: str = ""
    # Python files or modules imported before the rest is validated: they register their
    # own strategies, backbones, probes, datasets (see incremental/extensions.py)
    plugins: list[str] = opt(factory=list)
    seed: int = 0
    dataset: Component = component("datasets", "digits")
    protocol: ProtocolConfig = opt(factory=ProtocolConfig)
    backbone: Component = component("backbones", "vit")
    strategy: Component = component("strategies", "finetune")
    training: TrainingConfig = opt(factory=TrainingConfig)
    probes: list[Component] = component_list("probes")
    output: OutputConfig = opt(factory=OutputConfig)

    def validate(self) -> None:
        probe_labels(self.probes)


def probe_labels(specs: typing.Sequence[Component]) -> list[str]:
    """Results keys of the probes listed in ``probes:`` (``label``, else the name); a
    repeated key is an error."""
    labels: list[str] = []
    for i, spec in enumerate(specs):
        label = spec.common.label if spec.common is not None and spec.common.label else spec.name
        if label in labels:
            raise ConfigError(f"{label!r} is listed twice; give one a distinct 'label'", key=f"probes.{i}.label")
        labels.append(label)
    return labels


# ----------------------------------------------------------------------------- parsing

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp) or tp is Component:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    return (text[:60] + "...") if len(text) > 60 else text


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _parse_value(value: Any, tp: Any, path: str, meta: typing.Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is Component:
        return _parse_component(value, meta["registry"], path, meta.get("default_name"))
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, path)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"expected {_describe(tp)}, got null", key=path)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _parse_value(value, arg, path, meta)
            except ConfigError as exc:
                errors.append(exc)
        # A value of the right shape but wrong content (say, a list with a bad element)
        # explains itself better than "expected X or Y".
        deeper = [e for e in errors if e.key != path]
        if deeper:
            raise deeper[0]
        raise ConfigError(f"expected {_describe(tp)}, got {_show(value)}", key=path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and isinstance(choices[0], str):
            # YAML 1.1 reads a bare off/on/no/yes as a boolean: `checkpoint: off` means "off"
            spelled = [w for w in (("on", "yes", "true") if value else ("off", "no", "false")) if w in choices]
            value = spelled[0] if spelled else value
        if value in choices and type(value) is type(choices[0]):
            return value
        hint = did_you_mean(str(value), [str(c) for c in choices])
        raise ConfigError(f"expected {_describe(tp)}, got {_show(value)}{hint}", key=path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"expected {_describe(tp)}, got {_show(value)}", key=path)
        (item_tp,) = typing.get_args(tp)
        return [_parse_value(v, item_tp, _join(path, i), meta) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {_show(value)}", key=path)
        _, item_tp = typing.get_args(tp)
        return {str(k): _parse_value(v, item_tp, _join(path, k), meta) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads ``1e-3`` (no dot) as a string; accept what is plainly a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported config type {tp!r} at {path}")
    raise ConfigError(f"expected {_describe(tp)}, got {_show(value)}", key=path)


def _check_range(value: Any, meta: typing.Mapping[str, Any], path: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    checks = (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<"))
    for key, ok, symbol in checks:
        if key in meta and not ok(value, meta[key]):
            raise ConfigError(f"must be {symbol} {meta[key]}, got {value}", key=path)


def parse_dataclass(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, strictly (see the module docstring)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping, got {_show(data)}", key=path or None)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            hint = did_you_mean(str(key), fields)
            raise ConfigError(f"unknown key{hint}", key=_join(path, key))
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name in data:
            value = _parse_value(data[name], hints[name], key, f.metadata)
        elif hints[name] is Component:
            value = _parse_component(None, f.metadata["registry"], key, f.metadata["default_name"])
        else:
            continue  # the dataclass default applies
        _check_range(value, f.metadata, key)
        values[name] = value
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as exc:
            exc.key = _join(path, exc.key) if exc.key else (path or None)
            raise
    return instance


def _parse_component(value: Any, kind: str, path: str, default_name: str | None = None) -> Component:
    if value is None:
        value = default_name
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"expected a name or a mapping with 'name', got {_show(value)}", key=path)
    options = dict(value)
    name = options.pop("name", default_name)  # options given without a name: the default component
    if not isinstance(name, str):
        raise ConfigError("missing 'name'" if name is None else f"expected a name, got {_show(name)}",
                          key=_join(path, "name"))
    try:
        entry = REGISTRIES[kind].get(name)
    except ConfigError as exc:
        raise exc.with_context(key=_join(path, "name"))
    config_cls = entry.config_cls or EmptyConfig
    common_cls = COMMON_OPTIONS.get(kind)
    common_keys = {f.name for f in dataclasses.fields(common_cls)} if common_cls else set()
    own_keys = {f.name for f in dataclasses.fields(config_cls)}
    for key in options:
        if key not in own_keys and key not in common_keys:
            hint = did_you_mean(str(key), sorted(own_keys | common_keys))
            raise ConfigError(f"unknown key{hint}", key=_join(path, key))
    common = None
    if common_cls is not None:
        common = parse_dataclass(common_cls, {k: options.pop(k) for k in list(options) if k in common_keys}, path)
    config = parse_dataclass(config_cls, options, path)
    return Component(name=name, config=config, common=common)


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config, as it would be written in YAML."""
    if isinstance(obj, Component):
        return {"name": obj.name, **(to_dict(obj.config) if obj.config is not None else {}),
                **(to_dict(obj.common) if obj.common is not None else {})}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, width=100)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


# Keys (and sections) that name a run or choose what it writes, without changing what it computes;
# and the plugin files it imported, which define components, chosen by the other keys.
RESULT_NEUTRAL_KEYS = ("name", "description", "output", "plugins")


def config_differences(a: Any, b: Any, ignore: typing.Sequence[str] = RESULT_NEUTRAL_KEYS
                       ) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` for every resolved value that differs
    (``a`` and ``b`` are config objects or the dicts ``to_dict`` makes of them)."""
    flat_a, flat_b = (_flatten(c if isinstance(c, dict) else to_dict(c)) for c in (a, b))
    return [(key, flat_a.get(key), flat_b.get(key)) for key in sorted(set(flat_a) | set(flat_b))
            if not any(key == k or key.startswith(k + ".") for k in ignore) and flat_a.get(key) != flat_b.get(key)]


# ----------------------------------------------------------------------------- files


def protocol_names() -> list[str]:
    """Names of the protocol YAML files shipped in ``incremental.protocols``."""
    root = resources.files("incremental.protocols")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str, relative_to: Path | None = None) -> Path:
    """A protocol name (shipped with the package) or a path to a YAML file."""
    candidate = Path(name_or_path).expanduser()
    if relative_to is not None and not candidate.is_absolute():
        local = relative_to / candidate
        if local.is_file():
            return local
    if candidate.is_file():
        return candidate
    looks_like_path = candidate.suffix in (".yaml", ".yml") or "/" in name_or_path
    if not looks_like_path:
        shipped = resources.files("incremental.protocols") / f"{name_or_path}.yaml"
        if shipped.is_file():
            return Path(str(shipped))
        hint = did_you_mean(name_or_path, protocol_names())
        raise ConfigError(f"no protocol or file named {name_or_path!r}{hint}; "
                          "see `incremental list protocols`")
    if candidate.is_dir():
        raise ConfigError(f"{name_or_path} is a folder, not a YAML file")
    raise ConfigError(f"no such file: {name_or_path}")


class _StrictSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no tags that build Python objects) that also refuses a key written
    twice in one mapping; plain PyYAML keeps the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is written twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """Safe-load a YAML mapping; syntax errors become one-line ConfigErrors."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {getattr(exc, 'strerror', None) or exc}", source=str(path)) from None
    try:
        data = yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}invalid YAML: {problem}", source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level, got {_show(data)}", source=str(path))
    return data


def _merge(base: dict, override: dict, source: str, origins: dict[str, str], path: str = "") -> dict:
    merged = dict(base)
    for key, value in override.items():
        key_path = _join(path, key)
        old = merged.get(key)
        same_component = not (isinstance(old, dict) and isinstance(value, dict)
                              and "name" in value and old.get("name") != value["name"])
        if isinstance(old, dict) and isinstance(value, dict) and same_component:
            merged[key] = _merge(old, value, source, origins, key_path)
        else:
            merged[key] = value
            for stale in [p for p in origins if p.startswith(key_path + ".")]:
                del origins[stale]
        origins[key_path] = source
    return merged


def _load_tree(path: Path, origins: dict[str, str], chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError("extends itself in a cycle", key="extends", source=str(path))
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        base: dict[str, Any] = {}
    else:
        if not isinstance(parent, str):
            raise ConfigError(f"expected a protocol name or path, got {_show(parent)}",
                              key="extends", source=str(path))
        try:
            parent_path = resolve_config_path(parent, relative_to=path.parent)
        except ConfigError as exc:
            raise exc.with_context(key="extends", source=str(path))
        base = _load_tree(parent_path, origins, chain + (resolved,))
    return _merge(base, data, str(path), origins)


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"expected key.path=value, got {text!r}", source="--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text; validation says whether a string fits
    return key.split("."), value


def apply_override(data: dict[str, Any], keys: list[str], value: Any, origins: dict[str, str],
                   source: str) -> None:
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            child = node[int(key)]
        if isinstance(child, str) and i == 0 and key in ("dataset", "backbone", "strategy"):
            child = {"name": child}  # `backbone: vit` shorthand, now getting an option
            node[key] = child
        if child is None:
            child = {}
            node[key] = child
        elif not isinstance(child, (dict, list)):
            raise ConfigError(f"cannot set a key inside {_show(child)}",
                              key=".".join(keys[: i + 1]), source=source)
        node = child
    last = keys[-1]
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise ConfigError(f"no list item {last!r}", key=".".join(keys), source=source)
        node[int(last)] = value
    else:
        node[last] = value
    origins[".".join(keys)] = source


@dataclass
class ConfigSource:
    """Where each key of a loaded config came from, to name the file in later errors."""

    path: Path
    origins: dict[str, str]

    def source_of(self, key: str | None) -> str:
        if key:
            parts = key.split(".")
            for n in range(len(parts), 0, -1):
                source = self.origins.get(".".join(parts[:n]))
                if source is not None:
                    return source
                # a mistyped section (``a.typo``) has only deeper keys (``a.typo.b``) recorded
                deeper = [v for k, v in self.origins.items() if k.startswith(key + ".")]
                if n == len(parts) and deeper:
                    return deeper[-1]
        return str(self.path)

    def attribute(self, exc: UserError) -> UserError:
        """Fill in the error's source from its key (a key outside the config, like --out,
        names itself)."""
        if exc.source is None and not (exc.key or "").startswith("--"):
            exc.source = self.source_of(exc.key)
        return exc


def load_config(name_or_path: str, overrides: typing.Sequence[str] = (), schema: type = RunConfig,
                plugins: typing.Sequence[str] = ()) -> tuple[Any, ConfigSource]:
    """Load, merge, override and validate a run config (or another ``schema``, such as MAE
    pretraining's). ``plugins`` (already imported, from ``--plugin``) are recorded with the
    config's own. Raises ConfigError (or UserError for a plugin that fails)."""
    from .registry import load_builtins

    load_builtins()
    try:
        path = resolve_config_path(name_or_path)
    except ConfigError as exc:
        raise exc.with_context(key="CONFIG") from None
    source = ConfigSource(path, {})
    data = _load_tree(path, source.origins)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value, source.origins, f"--set {text}")
    if data.get("name") is None:
        data["name"] = path.stem
    try:
        # the file's own plugins, then --plugin's, each once (a resumed run names its own again)
        data["plugins"] = list(dict.fromkeys(_import_plugins(data.get("plugins"), source) + list(plugins)))
        return parse_dataclass(schema, data), source
    except UserError as exc:
        raise source.attribute(exc)


def _import_plugins(value: Any, source: ConfigSource) -> list[str]:
    """Import the ``plugins:`` of a config before it is validated, so that their components
    exist; returns them as recorded in config.yaml (files as absolute paths)."""
    from .extensions import load_plugin

    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"expected a list of .py file paths or module names, got {_show(value)}", key="plugins")
    origin = source.origins.get("plugins", "")
    base = Path(origin).parent if origin and not origin.startswith("--") else Path.cwd()
    return [load_plugin(spec, base, key=f"plugins.{i}") for i, spec in enumerate(value)]


def protocol_descriptions() -> dict[str, str]:
    """Shipped protocol names with their ``description`` lines (read without validation)."""
    root = resources.files("incremental.protocols")
    result = {}
    for name in protocol_names():
        try:
            data = yaml.safe_load((root / f"{name}.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            data = {}
        result[name] = str(data.get("description", "")) if isinstance(data, dict) else ""
    return result
