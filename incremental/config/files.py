"""Config files: YAML read strictly, ``extends:`` chains, ``--set`` overrides, and which file
each key came from (so a later error names the file).

A config file may start from another with ``extends: NAME_OR_PATH`` (deep merge; a section
whose ``name`` changes is replaced rather than merged). ``--set key.path=value`` overrides
are applied last, with values parsed as YAML.
"""

from __future__ import annotations

import dataclasses
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
    if candidate.is_dir():
        raise ConfigError(f"{name_or_path} is a folder, not a YAML file")
    if candidate.exists():  # a FIFO or a device: reading it could block, and it is no config
        raise ConfigError(f"{name_or_path} is not a regular file (a pipe or a device?); give a YAML file")
    if not looks_like_path:
        shipped = resources.files("incremental.protocols") / f"{name_or_path}.yaml"
        if shipped.is_file():
            return Path(str(shipped))
        hint = did_you_mean(name_or_path, protocol_names())
        raise ConfigError(f"no protocol or file named {name_or_path!r}{hint}; "
                          "see `incremental list protocols`")
    raise ConfigError(f"no such file: {name_or_path}")


# Hostile YAML stays cheap: nesting and the values that aliases expand to are bounded, so a
# "billion laughs" file or 20,000 nested brackets end in one line, not in minutes or a crash.
MAX_NESTING = 64
MAX_VALUES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no tags that build Python objects) that also refuses a key written
    twice in one mapping (plain PyYAML keeps the last one silently) and a key that is not a
    plain value, and bounds nesting. Merge keys (``<<: *defaults``) work as in YAML 1.1."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_NESTING:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_NESTING} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, not a {type(key).__name__}", key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is written twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size_within(data: Any, limit: int) -> bool:
    """Whether ``data`` holds at most ``limit`` values once every alias is expanded (counted
    without recursion, stopping as soon as the limit is passed)."""
    stack, count = [data], 0
    while stack:
        count += 1
        if count > limit:
            return False
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def load_yaml_text(text: str) -> Any:
    """YAML text loaded strictly and within bounds; a problem is a yaml.YAMLError (or a
    ConfigError for a document too large once expanded)."""
    try:
        data = yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise ConfigError(f"nested deeper than this machine can read (limit {MAX_NESTING})") from None
    if not _expanded_size_within(data, MAX_VALUES):
        raise ConfigError(f"expands to more than {MAX_VALUES} values (YAML aliases?)")
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    """Safe-load a YAML mapping; syntax errors become one-line ConfigErrors."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {getattr(exc, 'strerror', None) or exc}", source=str(path)) from None
    try:
        data = load_yaml_text(text)
    except ConfigError as exc:
        raise exc.with_context(source=str(path))
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


def alternatives_at(schema: type | None, keys: typing.Sequence[str]) -> tuple[str, ...]:
    """The keys that are alternatives of one another in the section at ``keys`` (a schema
    dataclass's ``ALTERNATIVES``: memory's ``total`` and ``per_class``), or ()."""
    cls: Any = schema
    for key in keys:
        if not dataclasses.is_dataclass(cls):
            return ()
        hint = typing.get_type_hints(cls).get(key)
        options = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)] if typing.get_args(hint) else [hint]
        cls = options[0] if options and dataclasses.is_dataclass(options[0]) else None
    return tuple(getattr(cls, "ALTERNATIVES", ())) if dataclasses.is_dataclass(cls) else ()


def _drop_replaced_alternatives(node: dict, chosen: typing.Iterable[str], group: tuple[str, ...]) -> None:
    """A mapping that sets one of a group of alternatives replaces the others it inherited."""
    chosen = [k for k in chosen if k in group]
    for key in group:
        if chosen and key not in chosen:
            node.pop(key, None)


def _merge(base: dict, override: dict, source: str, origins: dict[str, str], path: str = "",
           schema: type | None = None) -> dict:
    merged = dict(base)
    _drop_replaced_alternatives(merged, override, alternatives_at(schema, path.split(".") if path else []))
    for key, value in override.items():
        key_path = _join(path, key)
        old = merged.get(key)
        same_component = not (isinstance(old, dict) and isinstance(value, dict)
                              and "name" in value and old.get("name") != value["name"])
        if isinstance(old, dict) and isinstance(value, dict) and same_component:
            merged[key] = _merge(old, value, source, origins, key_path, schema)
        else:
            merged[key] = value
            for stale in [p for p in origins if p.startswith(key_path + ".")]:
                del origins[stale]
        origins[key_path] = source
    return merged


def _load_tree(path: Path, origins: dict[str, str], chain: tuple[Path, ...] = (),
               schema: type | None = None) -> dict[str, Any]:
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
        base = _load_tree(parent_path, origins, chain + (resolved,), schema)
    return _merge(base, data, str(path), origins, schema=schema)


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"expected key.path=value, got {text!r}", source="--set")
    try:
        value = load_yaml_text(raw) if raw.strip() else ""
    except yaml.constructor.ConstructorError as exc:  # valid YAML with a repeated or unhashable key
        raise ConfigError(f"{exc.problem}", key=key, source=f"--set {text}") from None
    except ConfigError as exc:
        raise exc.with_context(key=key, source=f"--set {text}")
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text; validation says whether a string fits
    return key.split("."), value


COMPONENT_SECTIONS = ("dataset", "backbone", "strategy")


def apply_override(data: dict[str, Any], keys: list[str], value: Any, origins: dict[str, str],
                   source: str, schema: type | None = None) -> None:
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            child = node[_list_index(node, key, ".".join(keys[:i]), source)]
        else:
            child = node.get(key)
        if isinstance(child, str) and i == 0 and key in COMPONENT_SECTIONS:
            child = {"name": child}  # `backbone: vit` shorthand, now getting an option
            node[key] = child
        if child is None:
            if keys[i + 1].isdigit():  # an item of a list that is empty (or not written at all)
                _list_index([], keys[i + 1], where, source)
            child = {}
            node[key] = child
        elif not isinstance(child, (dict, list)):
            raise ConfigError(f"cannot set a key inside {_show(child)}", key=where, source=source)
        node = child
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(keys[:-1]), source)] = value
    else:
        node[last] = value
        _drop_replaced_alternatives(node, [last], alternatives_at(schema, keys[:-1]))
    origins[".".join(keys)] = source


def _list_index(items: list, key: str, path: str, source: str) -> int:
    """``key`` as an index of the list at ``path``: an existing item, or a one-line error."""
    if not key.isdigit():
        raise ConfigError(f"is a list; address an item by its number ({path}.0)", key=path, source=source)
    if int(key) >= len(items):
        raise ConfigError(f"has {len(items)} item(s), so there is no item {key}; --set changes existing items, "
                          f"or sets the whole list: --set '{path}=[...]'", key=path, source=source)
    return int(key)


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
    data = _load_tree(path, source.origins, schema=schema)
    changed: dict[str, tuple[Any, Any, str]] = {}  # component sections whose name a --set changed
    for text in overrides:
        keys, value = parse_override(text)
        section = data.get(keys[0]) if keys else None
        if len(keys) == 2 and keys[0] in COMPONENT_SECTIONS and keys[1] == "name" and isinstance(section, dict) \
                and section.get("name") != value and len(section) > 1:
            changed[keys[0]] = (section.get("name"), value, text)
        apply_override(data, keys, value, source.origins, f"--set {text}", schema)
    if data.get("name") is None:
        data["name"] = path.stem
    try:
        # the file's own plugins, then --plugin's, each once (a resumed run names its own again)
        data["plugins"] = list(dict.fromkeys(_import_plugins(data.get("plugins"), source) + list(plugins)))
        return parse_dataclass(schema, data), source
    except UserError as exc:
        section = (exc.key or "").split(".")[0]
        if section in changed and exc.message.startswith("unknown key"):
            old, new, text = changed[section]
            exc.message += (f"; --set {text} changed the {section} from {old} to {new}, whose options differ: "
                            f"--set {section}={new} replaces the whole section")
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
