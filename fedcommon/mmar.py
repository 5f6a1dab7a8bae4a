"""Load and validate an MMAR folder: the configs, site code and models of one federated run."""

from __future__ import annotations

import ast
import difflib
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from fedcommon.algorithms import FEDPROX_ARGS, AggregatorChoice, check_args, parse_aggregator
from fedcommon.safe_regex import UnsafePattern, compile_safe

SERVER_CONFIG = "config/config_fed_server.json"
CLIENT_CONFIG = "config/config_fed_client.json"
TRAIN_CONFIG = "config/config_train.json"
ENVIRONMENT = "config/environment.json"
CUSTOM_DIR = "custom"
FORMAT_VERSION = 1
WEIGHT_BY = ("iterations", "samples", "uniform")
ROUND_SUM = ("auto", "memory", "disk")  # config_fed_server.json "round_sum": see ServerConfig
DEFAULT_MAX_NUM_CLIENTS = 100
# Components come from the MMAR's custom/ or from these packages, never from any other installed module.
FEDLEARN_PACKAGES = ("fedclient", "fedcommon", "fedserver")
FEDLEARN_ROOT = Path(__file__).resolve().parent.parent

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MISSING = object()
_BAD = object()
_DEFAULT_MAX = object()
_COMPONENT_SHAPE = '{"path": "module.Class", "args": {...}}'
# Every character str.splitlines() breaks at: a key or value holding one must not split a problem in two.
_ONE_LINE = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})

Report = Callable[[str, str], None]


class MMARError(ValueError):
    """An MMAR that cannot be used; the message lists every problem, one per line."""


@dataclass(frozen=True)
class Component:
    """A class named as "module.Class" and the keyword arguments to build it with."""

    path: str
    args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ServerConfig:
    """config/config_fed_server.json: how the server runs the rounds."""

    task_name: str
    min_num_clients: int
    max_num_clients: int
    wait_after_min_clients: float
    start_round: int
    num_rounds: int
    heart_beat_timeout: float
    exclude_vars: tuple[str, ...] | str
    aggregation_weights: dict[str, float]
    initial_model: Component | None
    initial_model_file: Path | None
    # Keep the open round's accepted contributions on disk (one model-sized write per contribution that
    # leaves the round open), so a server that restarts mid-round does not ask those sites to train again.
    persist_open_round: bool = True
    # The largest weight (samples or iterations) a site may claim for one contribution.
    max_contribution_weight: float = 1e9
    # Where the close reads the open round's running sum (ROUND_SUM): "memory" keeps a model-sized copy of it,
    # added to as uploads arrive, beside the files on disk; "auto" does so from 256 MiB up while it fits in a
    # quarter of the memory available (fedserver.memory_sum).
    round_sum: str = "auto"
    # How a round's updates become the next global model (fedcommon.algorithms.AGGREGATORS, or a custom class).
    aggregator: AggregatorChoice = field(default_factory=AggregatorChoice)


@dataclass(frozen=True)
class ClientConfig:
    """config/config_fed_client.json: how a site takes part in the rounds."""

    task_name: str
    exclude_vars: tuple[str, ...] | str
    weight_by: str
    retry_timeout: float
    heartbeat_interval: float | None
    privacy: Component | None
    cross_site_validate: bool
    # Cross-site validation: whether this site shares its best model (it validates the others either way),
    # and how long it waits for models that have not arrived.
    is_participating: bool = True
    cross_site_validation_timeout: float = 600.0
    # Site-side algorithms: FedProx's proximal weight mu (None: off), and SCAFFOLD's control variates.
    fedprox_mu: float | None = None
    scaffold: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """config/config_train.json: the site's trainer component and its seed."""

    trainer: Component
    seed: int


@dataclass(frozen=True)
class MMAR:
    """A validated MMAR folder."""

    root: Path
    server: ServerConfig
    client: ClientConfig
    train: TrainConfig
    environment: dict

    @property
    def custom_dir(self) -> Path:
        """The folder of site code that goes on sys.path when components are built."""
        return self.root / CUSTOM_DIR


def excluded(name: str, exclude_vars: tuple[str, ...] | str) -> bool:
    """Whether variable `name` is excluded: a tuple lists exact names, a string is a pattern searched in the name.

    The pattern comes from a deployed archive: it is matched in linear time (fedcommon.safe_regex), never by `re`.
    """
    if isinstance(exclude_vars, str):
        return bool(exclude_vars) and compile_safe(exclude_vars).search(name)
    return name in exclude_vars


def load_mmar(root: str | os.PathLike) -> MMAR:
    """Read and validate the MMAR at `root`; raise MMARError listing every problem found."""
    path = Path(root)
    if not path.exists():
        raise MMARError(f"{path}: MMAR folder does not exist")
    if not path.is_dir():
        hint = " (extract the zip first)" if path.suffix.lower() == ".zip" else ""
        raise MMARError(f"{path}: MMAR must be a folder{hint}")
    path = path.resolve()
    problems: list[str] = []
    custom_dir = path / CUSTOM_DIR

    server_data = _read_json(path, SERVER_CONFIG, problems, required=True)
    client_data = _read_json(path, CLIENT_CONFIG, problems, required=True)
    train_data = _read_json(path, TRAIN_CONFIG, problems, required=True)
    env_data = _read_json(path, ENVIRONMENT, problems, required=False)

    server = _server_config(_Reader(SERVER_CONFIG, server_data, problems), path, custom_dir)
    client = _client_config(_Reader(CLIENT_CONFIG, client_data, problems), custom_dir)
    train = _train_config(_Reader(TRAIN_CONFIG, train_data, problems), custom_dir)
    environment = _environment(_Reader(ENVIRONMENT, env_data, problems))

    server_task = (server_data or {}).get("task_name")
    client_task = (client_data or {}).get("task_name")
    valid = all(isinstance(task, str) and task.strip() for task in (server_task, client_task))
    if valid and server_task != client_task:
        problems.append(
            f"{CLIENT_CONFIG}: key 'task_name': {client_task!r} differs from {SERVER_CONFIG} task_name {server_task!r}"
        )
    if problems:
        raise MMARError("\n".join(problem.translate(_ONE_LINE) for problem in problems))
    return MMAR(root=path, server=server, client=client, train=train, environment=environment)


class _Reader:
    """One config object: hands out its keys and records each problem against the file and key."""

    def __init__(self, file: str, data: dict | None, problems: list[str]) -> None:
        self.file = file
        self.data = data
        self.problems = problems
        self.seen: set[str] = set()
        self.failed = data is None

    def report(self, key: str, message: str) -> None:
        """Record a problem with `key` of this file."""
        self.problems.append(f"{self.file}: key '{key}': {message}")
        self.failed = True

    def take(self, key: str, check: Callable[[Any, str, Report], Any], default: Any = _MISSING) -> Any:
        """The checked value of `key`, its default when absent, or _BAD after reporting."""
        self.seen.add(key)
        if key not in self.data:
            if default is _MISSING:
                self.report(key, "required")
                return _BAD
            return default
        return check(self.data[key], key, self.report)

    def finish(self) -> bool:
        """Report keys nobody took; True when the file had no problem at all."""
        for key in self.data:
            if key not in self.seen:
                self.report(key, "unknown key" + _suggestion(key, self.seen))
        return not self.failed


def _suggestion(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _read_json(root: Path, rel: str, problems: list[str], required: bool) -> dict | None:
    file = root / rel
    if not file.exists():
        if required:
            problems.append(f"{rel}: required file is missing")
            return None
        return {}
    duplicates: list[str] = []

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        keys = [k for k, _ in pairs]
        duplicates.extend(k for i, k in enumerate(keys) if k in keys[:i])
        return dict(pairs)

    try:
        text = file.read_text(encoding="utf-8-sig")
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        problems.append(f"{rel}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}")
        return None
    except UnicodeDecodeError:
        problems.append(f"{rel}: not UTF-8 text")
        return None
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits; nesting too deep
        problems.append(f"{rel}: cannot be read as JSON: {e}")
        return None
    except OSError as e:
        problems.append(f"{rel}: cannot be read: {e.strerror or e}")
        return None
    problems.extend(f"{rel}: key '{k}': given more than once" for k in dict.fromkeys(duplicates))
    if not isinstance(data, dict):
        problems.append(f"{rel}: must be a JSON object, got {_describe(data)}")
        return None
    return data


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite JSON number that fits a float (an integer of 400 digits does not)."""
    if _is_int(value):
        return abs(value) <= sys.float_info.max
    return isinstance(value, float) and math.isfinite(value)


def _integer(minimum: int) -> Callable[[Any, str, Report], Any]:
    def check(value: Any, key: str, report: Report) -> Any:
        if not _is_int(value) or value < minimum:
            report(key, f"must be an integer >= {minimum}, got {_describe(value)}")
            return _BAD
        return value

    return check


def _number(minimum: float, exclusive: bool) -> Callable[[Any, str, Report], Any]:
    def check(value: Any, key: str, report: Report) -> Any:
        if not _is_number(value) or value < minimum or (exclusive and value == minimum):
            report(key, f"must be a number {'>' if exclusive else '>='} {minimum:g}, got {_describe(value)}")
            return _BAD
        return float(value)

    return check


def _optional_number(minimum: float, exclusive: bool) -> Callable[[Any, str, Report], Any]:
    inner = _number(minimum, exclusive)
    return lambda value, key, report: None if value is None else inner(value, key, report)


def _string(value: Any, key: str, report: Report) -> Any:
    if not isinstance(value, str) or not value.strip():
        report(key, f"must be a non-empty string, got {_describe(value)}")
        return _BAD
    return value


def _boolean(value: Any, key: str, report: Report) -> Any:
    if not isinstance(value, bool):
        report(key, f"must be true or false, got {_describe(value)}")
        return _BAD
    return value


def _format_version(value: Any, key: str, report: Report) -> Any:
    if not _is_int(value) or value != FORMAT_VERSION:
        report(key, f"must be {FORMAT_VERSION} (the only format this version reads), got {_describe(value)}")
        return _BAD
    return value


def _one_of(allowed: tuple[str, ...]) -> Callable[[Any, str, Report], Any]:
    def check(value: Any, key: str, report: Report) -> Any:
        if not isinstance(value, str) or value not in allowed:
            choices = ", ".join(repr(c) for c in allowed)
            report(key, f"must be one of {choices}, got {_describe(value)}")
            return _BAD
        return value

    return check


def _exclude_vars(value: Any, key: str, report: Report) -> Any:
    if isinstance(value, str):
        if not value:
            return ()
        try:
            compile_safe(value)
        except UnsafePattern as e:
            report(key, str(e))
            return _BAD
        return value
    if not isinstance(value, list):
        report(key, f"must be a list of variable names or one regular expression, got {_describe(value)}")
        return _BAD
    bad = [i for i, item in enumerate(value) if not isinstance(item, str) or not item]
    for i in bad:
        report(f"{key}[{i}]", f"must be a non-empty variable name, got {_describe(value[i])}")
    return _BAD if bad else tuple(value)


def _aggregation_weights(value: Any, key: str, report: Report) -> Any:
    if not isinstance(value, dict):
        report(key, f"must be an object of site name -> number > 0, got {_describe(value)}")
        return _BAD
    weights = {}
    for site, weight in value.items():
        if not site.strip():
            report(key, "site names must be non-empty")
        elif not _is_number(weight) or weight <= 0:
            report(f"{key}.{site}", f"must be a number > 0, got {_describe(weight)}")
        else:
            weights[site] = float(weight)
    return weights if len(weights) == len(value) else _BAD


def _component(custom_dir: Path) -> Callable[[Any, str, Report], Any]:
    def check(value: Any, key: str, report: Report) -> Any:
        if not isinstance(value, dict):
            report(key, f"must be a component {_COMPONENT_SHAPE}, got {_describe(value)}")
            return _BAD
        ok = True
        for extra in sorted(value.keys() - {"path", "args"}):
            report(f"{key}.{extra}", "unknown key" + _suggestion(extra, {"path", "args"}))
            ok = False
        path = value.get("path", _MISSING)
        if path is _MISSING:
            report(f"{key}.path", "required")
            ok = False
        elif not _is_component_path(path):
            report(f"{key}.path", f"must be 'module.Class' (dotted Python names), got {_describe(path)}")
            ok = False
        else:
            problem = _locate(path, custom_dir)
            if problem:
                report(f"{key}.path", problem)
                ok = False
        args = value.get("args", {})
        if not isinstance(args, dict):
            report(f"{key}.args", f"must be an object of keyword arguments, got {_describe(args)}")
            ok = False
        else:
            for name in args:
                if not _IDENTIFIER.fullmatch(name):
                    report(f"{key}.args", f"argument name {name!r} is not a Python identifier")
                    ok = False
        return Component(path=path, args=dict(args)) if ok else _BAD

    return check


PRIVACY_PROTOCOLS = ("LaplacianProtocol", "PercentileProtocol", "SVTProtocol")
PRIVACY_MODULE = "fedclient.fed_privacy"


def _privacy(custom_dir: Path) -> Callable[[Any, str, Report], Any]:
    """A privacy filter: {"name": "SVTProtocol", "args": {...}} for a built-in one, or a component by "path"."""
    component = _component(custom_dir)

    def check(value: Any, key: str, report: Report) -> Any:
        if value is None:
            return None
        if isinstance(value, dict) and "name" in value:
            if "path" in value:
                report(key, "give either 'name' (a built-in protocol) or 'path' (a component), not both")
                return _BAD
            name = value["name"]
            if name not in PRIVACY_PROTOCOLS:
                report(
                    f"{key}.name",
                    f"must be one of {', '.join(PRIVACY_PROTOCOLS)}, got {_describe(name)}"
                    + _suggestion(str(name), set(PRIVACY_PROTOCOLS)),
                )
                return _BAD
            value = {"path": f"{PRIVACY_MODULE}.{name}", **{k: v for k, v in value.items() if k != "name"}}
        return component(value, key, report)

    return check


def _aggregator(custom_dir: Path) -> Callable[[Any, str, Report], Any]:
    """{"name": BUILTIN, "args": {...}}, or a custom aggregator {"path": "module.Class", "args": {...}} in custom/."""
    component = _component(custom_dir)

    def check(value: Any, key: str, report: Report) -> Any:
        choice, problems = parse_aggregator(value)
        for sub, message in problems:
            report(f"{key}.{sub}" if sub else key, message)
        if choice is None:
            return _BAD
        if choice.path is not None and component({"path": choice.path, "args": choice.args}, key, report) is _BAD:
            return _BAD
        return choice

    return check


def _fedprox(value: Any, key: str, report: Report) -> Any:
    """{"mu": number > 0}: FedProx's proximal term at every site; null turns it off."""
    if value is None:
        return None
    args, problems = check_args(value, FEDPROX_ARGS, "fedprox")
    for sub, message in problems:
        report(f"{key}.{sub}" if sub else key, message)
    return _BAD if problems else args["mu"]


def _initial_model(root: Path, custom_dir: Path) -> Callable[[Any, str, Report], Any]:
    component = _component(custom_dir)

    def check(value: Any, key: str, report: Report) -> Any:
        if isinstance(value, dict) and "file" in value:
            if "path" in value:
                report(key, "give either 'path' (a component) or 'file' (a saved model), not both")
                return _BAD
            extras = sorted(value.keys() - {"file"})
            for extra in extras:
                report(f"{key}.{extra}", "unknown key (a 'file' initial model takes no other key)")
            if extras:
                return _BAD
            file = _model_file(root, value["file"], f"{key}.file", report)
            return _BAD if file is _BAD else (None, file)
        if isinstance(value, dict) and "path" in value:
            built = component(value, key, report)
            return _BAD if built is _BAD else (built, None)
        shapes = f'a component {_COMPONENT_SHAPE} or {{"file": "models/..."}}'
        report(key, f"must be {shapes}, got {_describe(value)}")
        return _BAD

    return check


def _model_file(root: Path, value: Any, key: str, report: Report) -> Any:
    if not isinstance(value, str) or not value:
        report(key, f"must be a path relative to the MMAR root, got {_describe(value)}")
        return _BAD
    if "\0" in value:
        report(key, f"must be a path inside the MMAR, got {value!r}")
        return _BAD
    rel = PurePosixPath(value.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts:
        report(key, f"must be a path inside the MMAR (relative, without '..'), got {value!r}")
        return _BAD
    file = (root / rel).resolve()
    if not file.is_relative_to(root):
        report(key, f"{value!r} leads outside the MMAR")
        return _BAD
    if not file.is_file():
        report(key, f"file {value!r} not found in the MMAR")
        return _BAD
    return file


def _is_component_path(path: Any) -> bool:
    if not isinstance(path, str) or "." not in path:
        return False
    return all(_IDENTIFIER.fullmatch(part) for part in path.split("."))


def _locate(path: str, custom_dir: Path) -> str | None:
    """Why "module.Class" is not allowed or not there (read from source, never imported), or None.

    Allowed are modules of the MMAR's custom/ (its own files, no symlinks) and of fedlearn's packages;
    naming any other installed module ("os.system", "subprocess.Popen") would let a config run anything.
    """
    module, _, name = path.rpartition(".")
    parts = module.split(".")
    top = parts[0]
    in_custom = _custom_provides(custom_dir, top)
    if top in FEDLEARN_PACKAGES:
        if in_custom:
            return f"{CUSTOM_DIR}/ has a module '{top}' that would hide fedlearn's package of that name; rename it"
        return _check_source(FEDLEARN_ROOT, parts, name, "fedlearn's packages", FEDLEARN_ROOT)
    if not in_custom:
        allowed = ", ".join(FEDLEARN_PACKAGES)
        hint = _suggestion(top, _custom_names(custom_dir))
        return f"{path!r} is outside the MMAR's {CUSTOM_DIR}/ and fedlearn's packages ({allowed}){hint}"
    if top in sys.stdlib_module_names:
        return f"{CUSTOM_DIR}/ has a module '{top}' named like the standard library's; rename it"
    problem = _outside_custom(custom_dir, parts)
    return problem or _check_source(custom_dir, parts, name, f"{CUSTOM_DIR}/", custom_dir.parent)


def _custom_provides(custom_dir: Path, top: str) -> bool:
    """Whether custom/ holds something importable as `top` (a symlink counts, to be refused)."""
    return os.path.lexists(custom_dir / f"{top}.py") or os.path.lexists(custom_dir / top)


def _custom_names(custom_dir: Path) -> set[str]:
    if not custom_dir.is_dir() or custom_dir.is_symlink():
        return set()
    return {p.stem for p in custom_dir.iterdir() if p.suffix == ".py" or p.is_dir()}


def _outside_custom(custom_dir: Path, parts: list[str]) -> str | None:
    """Why the module's files are not the MMAR's own (a symlink, or resolving outside custom/), or None."""
    root = custom_dir.parent
    if custom_dir.is_symlink() or not _inside(custom_dir, root):
        return f"{CUSTOM_DIR}/ is a symbolic link or leads outside the MMAR; site code must be the MMAR's own files"
    chain = [custom_dir.joinpath(*parts[:i]) for i in range(1, len(parts) + 1)]
    chain += [c.parent / f"{c.name}.py" for c in chain] + [c / "__init__.py" for c in chain]
    for link in chain:
        if link.is_symlink():
            return f"{link.relative_to(root).as_posix()} is a symbolic link; site code must be the MMAR's own files"
        if os.path.lexists(link) and not _inside(link, custom_dir):
            return f"{link.relative_to(root).as_posix()} leads outside {CUSTOM_DIR}/"
    return None


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` resolves (symlinks followed) to `folder` or below it."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def _check_source(base: Path, parts: list[str], name: str, where: str, shown_from: Path) -> str | None:
    """Why module `parts` under `base` is missing or binds no `name` at its top level, or None."""
    module = ".".join(parts)
    package = base.joinpath(*parts)
    # The import system prefers a package folder to a module file of the same name.
    candidates = (package / "__init__.py", package.parent / f"{package.name}.py")
    source = next((f for f in candidates if f.is_file()), None)
    if source is None:
        return f"module '{module}' not found in {where}"
    shown = source.relative_to(shown_from).as_posix()
    try:
        tree = ast.parse(source.read_bytes(), filename=str(source))
    except SyntaxError as e:
        return f"{shown}: syntax error at line {e.lineno}: {e.msg}"
    except (OSError, ValueError, RecursionError, MemoryError) as e:
        return f"{shown}: cannot be read: {e}"
    return None if _binds(tree.body, name) else f"{shown} defines no '{name}'"


def _binds(body: list[ast.stmt], name: str) -> bool:
    """Whether a module body (top level, through if/try/with) binds `name`; a star import counts."""
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in (
            name,
            "__getattr__",
        ):
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*" or (alias.asname or alias.name.split(".")[0]) == name:
                    return True
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
            isinstance(n, ast.Name) and n.id == name for t in targets if t for n in ast.walk(t)
        ):
            return True
        nested = [getattr(node, attr, []) for attr in ("body", "orelse", "finalbody")]
        nested += [h.body for h in getattr(node, "handlers", [])]
        if isinstance(node, (ast.If, ast.Try, ast.With)) and any(_binds(b, name) for b in nested):
            return True
    return False


def _server_config(reader: _Reader, root: Path, custom_dir: Path) -> ServerConfig | None:
    if reader.data is None:
        return None
    reader.take("format_version", _format_version, FORMAT_VERSION)
    values = {
        "task_name": reader.take("task_name", _string),
        "min_num_clients": reader.take("min_num_clients", _integer(1), 1),
        "max_num_clients": reader.take("max_num_clients", _integer(1), _DEFAULT_MAX),
        "wait_after_min_clients": reader.take("wait_after_min_clients", _number(0, exclusive=False), 10.0),
        "start_round": reader.take("start_round", _integer(0), 0),
        "num_rounds": reader.take("num_rounds", _integer(1)),
        "heart_beat_timeout": reader.take("heart_beat_timeout", _number(0, exclusive=True), 60.0),
        "exclude_vars": reader.take("exclude_vars", _exclude_vars, ()),
        "aggregation_weights": reader.take("aggregation_weights", _aggregation_weights, {}),
        "persist_open_round": reader.take("persist_open_round", _boolean, True),
        "max_contribution_weight": reader.take("max_contribution_weight", _number(0, exclusive=True), 1e9),
        "round_sum": reader.take("round_sum", _one_of(ROUND_SUM), "auto"),
        "aggregator": reader.take("aggregator", _aggregator(custom_dir), AggregatorChoice()),
    }
    initial = reader.take("initial_model", _initial_model(root, custom_dir))
    low, high = values["min_num_clients"], values["max_num_clients"]
    if high is _DEFAULT_MAX:
        high = values["max_num_clients"] = DEFAULT_MAX_NUM_CLIENTS
        if low is not _BAD and low > high:
            reader.report("max_num_clients", f"must be >= min_num_clients ({low}); the default is {high}")
    elif low is not _BAD and high is not _BAD and low > high:
        reader.report("max_num_clients", f"must be >= min_num_clients ({low}), got {high}")
    if not reader.finish():
        return None
    model, model_file = initial
    return ServerConfig(**values, initial_model=model, initial_model_file=model_file)


def _client_config(reader: _Reader, custom_dir: Path) -> ClientConfig | None:
    if reader.data is None:
        return None
    reader.take("format_version", _format_version, FORMAT_VERSION)
    values = {
        "task_name": reader.take("task_name", _string),
        "exclude_vars": reader.take("exclude_vars", _exclude_vars, ()),
        "weight_by": reader.take("weight_by", _one_of(WEIGHT_BY), "iterations"),
        "retry_timeout": reader.take("retry_timeout", _number(0, exclusive=True), 30.0),
        "heartbeat_interval": reader.take("heartbeat_interval", _optional_number(0, exclusive=True), None),
        "privacy": reader.take("privacy", _privacy(custom_dir), None),
        "cross_site_validate": reader.take("cross_site_validate", _boolean, False),
        "is_participating": reader.take("is_participating", _boolean, True),
        "cross_site_validation_timeout": reader.take(
            "cross_site_validation_timeout", _number(0, exclusive=True), 600.0
        ),
        "fedprox_mu": reader.take("fedprox", _fedprox, None),
        "scaffold": reader.take("scaffold", _boolean, False),
    }
    return ClientConfig(**values) if reader.finish() else None


def _train_config(reader: _Reader, custom_dir: Path) -> TrainConfig | None:
    if reader.data is None:
        return None
    values = {
        "trainer": reader.take("trainer", _component(custom_dir)),
        "seed": reader.take("seed", _integer(0), 0),
    }
    return TrainConfig(**values) if reader.finish() else None


def _environment(reader: _Reader) -> dict | None:
    if reader.data is None:
        return None
    for key, value in reader.data.items():
        reader.seen.add(key)
        if not (isinstance(value, (str, bool)) or _is_number(value)):
            reader.report(key, f"must be a string, number or boolean, got {_describe(value)}")
    return dict(reader.data) if reader.finish() else None
