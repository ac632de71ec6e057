"""Config files: YAML read strictly, ``extends:`` chains, ``--set`` overrides, and which file
each key came from (so a later error names the file).

A config file may start from another with ``extends: NAME_OR_PATH`` (deep merge; a section
whose ``name`` changes is replaced rather than merged). ``--set key.path=value`` overrides
are applied last, with values parsed as YAML.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, UserError, did_you_mean
from .parse import _join, _show, parse_dataclass
from .schema import RunConfig


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
    from ..registry import load_builtins

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
    from ..extensions import load_plugin

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
