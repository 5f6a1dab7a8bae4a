"""Build a component named {"path": "module.Class", "args": {...}}, importing site code from given folders."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from fedcommon.mmar import FEDLEARN_PACKAGES, FEDLEARN_ROOT, Component

_lock = threading.RLock()
_versions: dict[Path, int] = {}


class ComponentError(ValueError):
    """A component that cannot be built; the message names its path and what failed."""


def build_component(component: Component, search_paths: Sequence[Path] = (), **extra_kwargs: object) -> object:
    """Import the component's module with `search_paths` first on sys.path; return Class(**args, **extra).

    The module and the class must come from the search folders or fedlearn's packages: a deployed
    config may name site code, never an arbitrary installed module ("os.system", "subprocess.Popen").
    """
    path = component.path
    module_name, _, class_name = path.rpartition(".")
    if not module_name or not class_name:
        raise ComponentError(f"component {path!r}: path must be 'module.Class'")
    clash = sorted(component.args.keys() & extra_kwargs.keys())
    if clash:
        raise ComponentError(f"component {path!r}: args {clash} are set by the caller and must not be configured")
    kwargs = {**component.args, **extra_kwargs}
    linked = [str(p) for p in search_paths if Path(os.fspath(p)).is_symlink()]
    if linked:
        raise ComponentError(f"component {path!r}: search folder {linked[0]} is a symbolic link; give the real folder")
    folders = [str(Path(os.fspath(p)).resolve()) for p in search_paths]
    allowed = _Allowed(folders)
    with _lock:
        saved = list(sys.path)
        sys.path[:0] = folders
        try:
            _forget_stale_modules(folders)
            cls = _find_class(path, module_name, class_name, folders, allowed)
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
        if top in sys.stdlib_module_names or top in FEDLEARN_PACKAGES:
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


class _Allowed:
    """The folders a component's code may come from: the search folders and fedlearn's own packages."""

    def __init__(self, folders: list[str]) -> None:
        packages = [FEDLEARN_ROOT / name for name in FEDLEARN_PACKAGES]
        self.roots = [Path(os.path.realpath(f)) for f in [*folders, *packages]]
        where = f"the search folders ({', '.join(folders)}) and " if folders else ""
        self.description = f"{where}fedlearn's packages ({', '.join(FEDLEARN_PACKAGES)})"

    def holds(self, file: str | None) -> bool:
        """Whether `file` resolves (symlinks followed) inside one of the folders."""
        if not file:
            return False
        resolved = Path(os.path.realpath(file))
        return any(resolved.is_relative_to(root) for root in self.roots)

    def refuse(self, path: str, what: str) -> ComponentError:
        """The error for `what` ("module 'os' (/usr/lib/python3/os.py) is") coming from elsewhere."""
        return ComponentError(f"component {path!r}: {what} outside {self.description}; nothing was built")


def _check_top_level(path: str, module_name: str, folders: list[str], allowed: _Allowed) -> None:
    """Refuse, before importing anything, a top-level module that would not come from the allowed folders."""
    top = module_name.partition(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError) as e:
        raise ComponentError(f"component {path!r}: module {top!r} cannot be looked up: {e}") from e
    if spec is None:
        where = f"in {', '.join(folders)} or " if folders else "in "
        raise ComponentError(f"component {path!r}: module {top!r} not found {where}fedlearn's packages")
    files = [spec.origin] if spec.has_location else []
    files += list(spec.submodule_search_locations or [])
    outside = next((f for f in files if not allowed.holds(f)), None)
    if not files or outside is not None:
        raise allowed.refuse(path, f"module {top!r} ({outside or spec.origin or 'no file'}) is")


def _find_class(path: str, module_name: str, class_name: str, folders: list[str], allowed: _Allowed) -> type:
    _check_top_level(path, module_name, folders, allowed)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            where = f"in {', '.join(folders)} or " if folders else "in "
            raise ComponentError(f"component {path!r}: module {e.name!r} not found {where}fedlearn's packages") from e
        raise ComponentError(f"component {path!r}: importing module {module_name!r} failed: {e}") from e
    except Exception as e:
        raise ComponentError(
            f"component {path!r}: importing module {module_name!r} raised {type(e).__name__}: {e}"
        ) from e
    origin = getattr(module, "__file__", None)
    if not allowed.holds(origin):
        raise allowed.refuse(path, f"module {module_name!r} ({origin or 'no file'}) is")
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ComponentError(f"component {path!r}: module {module_name!r} ({origin}) has no {class_name!r}")
    if not isinstance(cls, type):
        raise ComponentError(f"component {path!r}: {class_name!r} is a {type(cls).__name__}, not a class")
    # A module of site code may import a class from anywhere ("from subprocess import Popen").
    defined_in = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if not allowed.holds(defined_in):
        where = defined_in or "no file"
        raise allowed.refuse(path, f"class {class_name!r} is defined in module {cls.__module__!r} ({where}),")
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
