"""Build a component named {"path": "module.Class", "args": {...}}, importing site code from given folders."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from fedcommon.mmar import Component

_lock = threading.RLock()
_versions: dict[Path, int] = {}


class ComponentError(ValueError):
    """A component that cannot be built; the message names its path and what failed."""


def build_component(
    component: Component, search_paths: Sequence[Path] = (), **extra_kwargs: object
) -> object:
    """Import the component's module with `search_paths` first on sys.path; return Class(**args, **extra)."""
    path = component.path
    module_name, _, class_name = path.rpartition(".")
    if not module_name or not class_name:
        raise ComponentError(f"component {path!r}: path must be 'module.Class'")
    clash = sorted(component.args.keys() & extra_kwargs.keys())
    if clash:
        raise ComponentError(
            f"component {path!r}: args {clash} are set by the caller and must not be configured"
        )
    kwargs = {**component.args, **extra_kwargs}
    folders = [str(Path(os.fspath(p)).resolve()) for p in search_paths]
    with _lock:
        saved = list(sys.path)
        sys.path[:0] = folders
        try:
            _forget_stale_modules(folders)
            cls = _find_class(path, module_name, class_name, folders)
            return _construct(path, cls, kwargs)
        finally:
            sys.path[:] = saved


def _forget_stale_modules(folders: list[str]) -> None:
    """Drop cached modules that the folders now provide from another or a changed file.

    A long-lived process (the server) builds components from one run's custom/ after another's,
    and both may hold a `model.py`: the cached one must not stand in for the new one.
    """
    importlib.invalidate_caches()
    for top in _top_level_names(folders):
        if top in sys.stdlib_module_names:
            continue
        provided = _provided_file(top, folders)
        version = provided.stat().st_mtime_ns if provided is not None else 0
        seen = _versions.get(provided, version) if provided is not None else version
        if provided is not None:
            _versions[provided] = version
        origin = getattr(sys.modules.get(top), "__file__", None)
        if origin is not None and (Path(origin).resolve() != provided or seen != version):
            for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
                del sys.modules[name]


def _top_level_names(folders: list[str]) -> set[str]:
    names = set()
    for folder in folders:
        if os.path.isdir(folder):
            for entry in os.scandir(folder):
                if entry.name.endswith(".py"):
                    names.add(entry.name[:-3])
                elif entry.is_dir() and entry.name.isidentifier():
                    names.add(entry.name)
    return names


def _provided_file(top: str, folders: list[str]) -> Path | None:
    """The file that importing `top` would load from the folders (the first that has it)."""
    for folder in folders:
        package = Path(folder, top)
        for candidate in (package / "__init__.py", Path(folder, f"{top}.py")):
            if candidate.is_file():
                return candidate.resolve()
        if package.is_dir():
            return None
    return None


def _find_class(path: str, module_name: str, class_name: str, folders: list[str]) -> type:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            where = f"in {', '.join(folders)} or " if folders else "in "
            raise ComponentError(
                f"component {path!r}: module {e.name!r} not found {where}the installed packages"
            ) from e
        raise ComponentError(f"component {path!r}: importing module {module_name!r} failed: {e}") from e
    except Exception as e:
        raise ComponentError(
            f"component {path!r}: importing module {module_name!r} raised {type(e).__name__}: {e}"
        ) from e
    cls = getattr(module, class_name, None)
    if cls is None:
        origin = getattr(module, "__file__", None) or module_name
        raise ComponentError(f"component {path!r}: module {module_name!r} ({origin}) has no {class_name!r}")
    if not callable(cls):
        raise ComponentError(f"component {path!r}: {class_name!r} is a {type(cls).__name__}, not a class")
    return cls


def _construct(path: str, cls: type, kwargs: dict) -> object:
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise ComponentError(f"component {path!r}: bad arguments {sorted(kwargs)}: {e}") from e
    except ValueError:
        pass  # no signature to check (a builtin or extension class): the call itself will tell
    try:
        return cls(**kwargs)
    except Exception as e:
        raise ComponentError(f"component {path!r}: constructor raised {type(e).__name__}: {e}") from e
