"""The strict typed parser: plain data (from YAML) into the config dataclasses, and back.

Loading is strict: an unknown key, a value of the wrong type or out of range raises
:class:`ConfigError` carrying the dotted key path. Sections that pick a registered component
(``dataset``, ``backbone``, ``strategy``, ``probes``) are written as ``{name: NAME,
...options}``, or just ``NAME``; the options are validated against that component's own config
dataclass, and the options every component of its kind takes (the registry's ``common``).
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from typing import Any, Literal, Union

import yaml

from ..errors import ConfigError, did_you_mean
from ..registry import REGISTRIES
from .fields import Component, EmptyConfig


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


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict, _SHORT_REPR.maxstring = 2, 4, 4, 40


def _show(value: Any) -> str:
    """A value as an error message quotes it: bounded in depth and length whatever its size
    (a YAML alias bomb's repr would never finish)."""
    text = _SHORT_REPR.repr(value)
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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float
                raise ConfigError(f"expected a finite number, got {_show(value)}", key=path) from None
        elif isinstance(value, str):
            # PyYAML reads ``1e-3`` (no dot) as a string; accept what is plainly a number.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .inf and .nan are valid YAML, never a valid setting
                raise ConfigError(f"expected a finite number, got {_show(value)}", key=path)
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported config type {tp!r} at {path}")
    raise ConfigError(f"expected {_describe(tp)}, got {_show(value)}", key=path)


def _check_range(value: Any, meta: typing.Mapping[str, Any], path: str) -> None:
    """The field's bounds, on a number or on every number of a list."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_range(item, meta, _join(path, i))
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    checks = (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<"))
    for key, ok, symbol in checks:
        if key in meta and not ok(value, meta[key]):
            raise ConfigError(f"must be {symbol} {meta[key]}, got {value}", key=path)


def parse_dataclass(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, strictly (see the module docstring).

    A class with ``PRESETS`` (``{name: {key: value}}``) takes ``preset: NAME``: the preset's
    values fill in every key the mapping does not set itself, so a preset is a documented
    starting point (``balanced_finetuning: {preset: dytox}``) that explicit keys refine, and
    the resolved config lists what the preset chose."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping, got {_show(data)}", key=path or None)
    presets = getattr(cls, "PRESETS", None)
    if presets and data.get("preset") is not None:
        name = data["preset"]
        if name not in presets:
            raise ConfigError(f"unknown preset {_show(name)}{did_you_mean(str(name), presets)}; known: "
                              f"{', '.join(presets)}", key=_join(path, "preset"))
        data = {**presets[name], **data}
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
    common_cls = REGISTRIES[kind].common_options
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
