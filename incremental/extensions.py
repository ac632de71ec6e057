"""Users' own strategies, backbones, probes and datasets, without editing the toolkit.

Three ways in, all importing code that registers components with the built-ins' decorators
(``@STRATEGIES.register("name", config=MyConfig)``):

- ``plugins: [path/to/my_strategy.py, my_package.module]`` in a run YAML (relative paths
  are relative to the YAML file that lists them);
- ``--plugin PATH_OR_MODULE`` on the command line (relative to the current folder);
- an installed package's ``incremental.plugins`` entry points, loaded with the built-ins.

Only the files and modules named are imported (and installed packages' entry points);
nothing is scanned. A file is imported once per process, whatever path names it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType

from .errors import UserError, first_line

ENTRY_POINT_GROUP = "incremental.plugins"
_loaded_files: dict[Path, ModuleType] = {}
_entry_points_loaded = False


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def _failure(what: str, exc: BaseException, file: Path | None) -> str:
    """``ErrorType: message (at FILE:LINE)``, the line inside the plugin when there is one."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if file is not None and Path(f.filename).resolve() == file] or frames[-1:]
    where = f" (at {Path(inside[-1].filename).name}:{inside[-1].lineno})" if inside else ""
    message = first_line(exc)
    return f"{what} failed to import: {type(exc).__name__}{': ' + message if message else ''}{where}"


def load_plugin(spec: str, base: Path, *, key: str) -> str:
    """Import one plugin file or module; returns what to record in config.yaml (a file's
    absolute path, or the module name). Errors are one-line UserErrors naming ``key``."""
    from .errors import ConfigError

    if _is_path(spec):
        path = (base / Path(spec).expanduser()).resolve()
        if path.is_dir():
            raise UserError(f"{path} is a folder; a plugin is a .py file or an importable module", key=key)
        if not path.is_file():
            raise UserError(f"plugin file {path} does not exist", key=key)
        if path in _loaded_files:
            return str(path)
        name = f"incremental_plugins.{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise UserError(f"{path} cannot be imported as a Python file", key=key)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclass type hints are resolved through sys.modules
        try:
            module_spec.loader.exec_module(module)
        except ConfigError as exc:  # e.g. a name that is already registered
            sys.modules.pop(name, None)
            raise UserError(f"{path}: {exc.message}", key=key) from None
        except SystemExit as exc:  # would end the command silently with the plugin's code
            sys.modules.pop(name, None)
            raise UserError(f"{path} called sys.exit({exc.code!r}) while being imported", key=key) from None
        except Exception as exc:  # noqa: BLE001 - any error in the user's file is reported in one line
            sys.modules.pop(name, None)
            raise UserError(_failure(str(path), exc, path), key=key) from None
        _loaded_files[path] = module
        return str(path)
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name and spec.startswith(exc.name):
            raise UserError(f"no module named {exc.name!r} (a plugin is a .py file path or an importable "
                            f"module)", key=key) from None
        raise UserError(_failure(spec, exc, None), key=key) from None
    except ConfigError as exc:
        raise UserError(f"{spec}: {exc.message}", key=key) from None
    except SystemExit as exc:
        raise UserError(f"{spec} called sys.exit({exc.code!r}) while being imported", key=key) from None
    except Exception as exc:  # noqa: BLE001
        raise UserError(_failure(spec, exc, None), key=key) from None
    return spec


def load_entry_points() -> list[str]:
    """Import every installed package's ``incremental.plugins`` entry points (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return []
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    from .errors import ConfigError

    loaded = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        origin = f"entry point {entry.name!r} ({entry.value}) of {entry.dist.name if entry.dist else 'a package'}"
        try:
            entry.load()
        except ConfigError as exc:
            raise UserError(f"{origin}: {exc.message}", key=ENTRY_POINT_GROUP) from None
        except Exception as exc:  # noqa: BLE001
            raise UserError(_failure(origin, exc, None), key=ENTRY_POINT_GROUP) from None
        loaded.append(entry.value)
    return loaded
