"""The federated algorithms an MMAR can name: the built-in aggregators and site-side algorithms, with their arguments.

Declared once here, read by the MMAR loader (fedcommon.mmar), by the server's aggregation (fedserver.aggregation)
and by the site (fedclient.site_algorithms); the math lives with each of those.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any

# Extra tensors that travel with a SCAFFOLD model and update (Karimireddy et al. 2020): the server's control
# variate c goes to the sites beside the global model, a site's change of its own c_i comes back beside its update.
# A ':' never appears in a torch state_dict name, so these cannot clash with a model's variables.
SCAFFOLD_CONTROL_PREFIX = "scaffold.c:"
SCAFFOLD_DELTA_PREFIX = "scaffold.delta_c:"

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


@dataclass(frozen=True)
class Arg:
    """One argument of an algorithm: its default (None: required) and the interval it must lie in."""

    name: str
    default: float | int | None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def rule(self) -> str:
        """What a value must be, in words: "a number >= 0 and < 0.5"."""
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return f"{'an integer' if self.integer else 'a number'} {' and '.join(bounds)}".rstrip()

    def problem(self, value: Any) -> str | None:
        """Why `value` is not a valid value of this argument, or None."""
        ok = not isinstance(value, bool) and (
            isinstance(value, int) if self.integer else isinstance(value, (int, float)) and math.isfinite(value)
        )
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        return None if ok else f"must be {self.rule()}, got {value!r}"


@dataclass(frozen=True)
class AggregatorDecl:
    """A built-in aggregator: its name, arguments and whether it needs every update of a round at once."""

    name: str
    summary: str
    args: tuple[Arg, ...] = ()
    needs_all_updates: bool = False


def _unit(name: str, default: float) -> Arg:
    return Arg(name, default, low=0.0, high=1.0, high_open=True)


def _positive(name: str, default: float) -> Arg:
    return Arg(name, default, low=0.0, low_open=True)


# Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2; their experiments tune the adaptivity
# tau around 1e-3 and the server rate eta over 1e-3..1: with eta 0.1 FedAdam brings the digits example to 0.9
# accuracy in 3 rounds (0.01 needs more than 5). FedAdagrad has no beta_2 (its v only accumulates).
_FEDOPT = (_positive("eta", 0.1), _unit("beta_1", 0.9), _unit("beta_2", 0.99), _positive("tau", 1e-3))

AGGREGATORS: dict[str, AggregatorDecl] = {
    d.name: d
    for d in (
        AggregatorDecl("FedAvg", "x <- x + weighted mean of the updates (the default)"),
        AggregatorDecl(
            "FedAvgM",
            "server momentum: m <- server_momentum*m + mean; x <- x + server_lr*m",
            (_positive("server_lr", 1.0), _unit("server_momentum", 0.9)),
        ),
        AggregatorDecl("FedAdam", "Reddi et al. 2021, Adam on the server", _FEDOPT),
        AggregatorDecl("FedYogi", "Reddi et al. 2021, Yogi on the server", _FEDOPT),
        AggregatorDecl(
            "FedAdagrad", "Reddi et al. 2021, Adagrad on the server", tuple(a for a in _FEDOPT if a.name != "beta_2")
        ),
        AggregatorDecl("FedMedian", "coordinate-wise median of the updates", needs_all_updates=True),
        AggregatorDecl(
            "FedTrimmedAvg",
            "coordinate-wise mean without the beta*n smallest and largest",
            (Arg("beta", 0.1, low=0.0, high=0.5, high_open=True),),
            needs_all_updates=True,
        ),
        AggregatorDecl(
            "Krum",
            "Blanchard et al. 2017: the update closest to its n-f-2 nearest others",
            (Arg("num_malicious", 0, low=0, integer=True),),
            needs_all_updates=True,
        ),
        AggregatorDecl(
            "MultiKrum",
            "Blanchard et al. 2017: weighted mean of the num_selected best Krum scores",
            (Arg("num_malicious", 0, low=0, integer=True), Arg("num_selected", None, low=1, integer=True)),
            needs_all_updates=True,
        ),
    )
}
DEFAULT_AGGREGATOR = "FedAvg"

# Site side: FedProx's proximal weight mu (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).
FEDPROX_ARGS = (_positive("mu", 0.01),)


@dataclass(frozen=True)
class AggregatorChoice:
    """The aggregator a run uses: a built-in `name`, or a custom class at `path`; `args` complete with defaults."""

    name: str | None = DEFAULT_AGGREGATOR
    path: str | None = None
    args: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How status, metrics and summary.json name it."""
        return self.name or self.path or DEFAULT_AGGREGATOR

    @property
    def needs_all_updates(self) -> bool | None:
        """For a built-in, whether it needs every update at once; None for a custom one (its class says)."""
        return AGGREGATORS[self.name].needs_all_updates if self.name else None

    def spec(self) -> dict:
        """The config's form: {"name": ..., "args": {...}} or {"path": ..., "args": {...}}."""
        key, value = ("name", self.name) if self.name else ("path", self.path)
        return {key: value, "args": dict(self.args)}


def _suggest(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_args(args: Any, declared: tuple[Arg, ...], what: str) -> tuple[dict, list[tuple[str, str]]]:
    """`args` completed with the defaults, and the problems as (key under "args", message)."""
    if not isinstance(args, dict):
        return {}, [("", f"must be an object of arguments of {what}, got {type(args).__name__}")]
    valid = [a.name for a in declared]
    listed = ", ".join(valid) if valid else "none"
    problems = [
        (str(k), f"unknown argument of {what}; valid: {listed}" + _suggest(str(k), valid))
        for k in args
        if k not in valid
    ]
    out = {}
    for arg in declared:
        if arg.name not in args:
            if arg.default is None:
                problems.append((arg.name, f"required by {what} ({arg.rule()})"))
            else:
                out[arg.name] = arg.default
            continue
        why = arg.problem(args[arg.name])
        if why:
            problems.append((arg.name, why))
        else:
            out[arg.name] = float(args[arg.name]) if not arg.integer else args[arg.name]
    return out, problems


def parse_aggregator(value: Any) -> tuple[AggregatorChoice | None, list[tuple[str, str]]]:
    """Check an "aggregator" value: the choice, or None with the problems as (sub-key, message).

    A sub-key is relative to "aggregator" ("name", "args.beta", "" for the value itself). A custom aggregator's
    module is only checked for its form here; the MMAR loader also checks that custom/ holds it.
    """
    names = list(AGGREGATORS)
    shapes = '{"name": "FedAvg", "args": {...}} or {"path": "module.Class", "args": {...}}'
    if not isinstance(value, dict):
        return None, [("", f"must be {shapes}")]
    extra = sorted(set(value) - {"name", "path", "args"})
    problems = [(k, "unknown key; valid: name, path, args" + _suggest(k, ["name", "path", "args"])) for k in extra]
    if ("name" in value) == ("path" in value):
        return None, [*problems, ("", f"give either 'name' (one of {', '.join(names)}) or 'path' (a custom class)")]
    if "path" in value:
        path, args = value["path"], value.get("args", {})
        if not isinstance(path, str) or not _DOTTED.fullmatch(path):
            problems.append(("path", f"must be 'module.Class' (dotted Python names), got {path!r}"))
        if not isinstance(args, dict) or not all(isinstance(k, str) and k.isidentifier() for k in args):
            problems.append(("args", "must be an object of keyword arguments"))
        return (None if problems else AggregatorChoice(name=None, path=path, args=dict(args))), problems
    name = value["name"]
    decl = AGGREGATORS.get(name) if isinstance(name, str) else None
    if decl is None:
        valid = f"unknown aggregator {name!r}; valid: {', '.join(names)}"
        problems.append(("name", valid + _suggest(str(name), names)))
        return None, problems
    args, arg_problems = check_args(value.get("args", {}), decl.args, name)
    problems += [(f"args.{k}" if k else "args", m) for k, m in arg_problems]
    return (None if problems else AggregatorChoice(name=name, args=args)), problems
