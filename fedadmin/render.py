"""Rich views and plain-text lines of the console's results; the only module that builds tables.

Remote text (a site's metric names, errors, shell output and log lines) enters rendering through `shown`,
which escapes its control characters, and is printed by a `terminal()` console, which reads no markup or
emoji codes in it: nothing a site sends can move the cursor, set the title, write the clipboard or style itself.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from fedadmin.run_state import TRAINING_CODES, awaited, failed_run_message, site_failure, site_progress
from fedcommon.commands import ClientStatus
from fedcommon.escape import for_terminal
from fedcommon.outcome import CommandOutcome, TargetReply

T = TypeVar("T")

_NONE = "–"
_NOT_VALIDATED = "—"


def shown(value: T) -> T:
    """A copy of `value` (a result, an outcome, reply data) with every string in it, keys included, escaped for a
    terminal: what the console renders of it can carry no control character from the wire."""
    if isinstance(value, str):
        return for_terminal(value)  # type: ignore[return-value]
    if isinstance(value, dict):
        return {shown(k): shown(v) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple takes its fields one by one
        return type(value)(*(shown(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(shown(v) for v in value)  # type: ignore[return-value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: shown(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **fields)
    return value


def terminal(**options: Any) -> Console:
    """A Console for the console's human output: `[bold]` or `:smile:` in a string it prints stays as written."""
    return Console(markup=False, emoji=False, **options)


def show(result: Any, **options: Any) -> None:
    """Print a result (anything with __rich__) for the operator: its remote text escaped, no markup read."""
    terminal(**options).print(shown(result))


def value_text(value: Any) -> str:
    """A reply value as short text: lists joined, floats to 4 significant digits, None as a dash."""
    if value is None:
        return _NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(value_text(v) for v in value) if value else _NONE
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def metrics_text(metrics: dict[str, Any] | None) -> str:
    """{"accuracy": 0.9, "loss": 0.2} as "accuracy=0.9000  loss=0.2000" (the demo's format)."""
    if not metrics:
        return ""
    return "  ".join(
        f"{k}={v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k}={v}"
        for k, v in sorted(metrics.items())
    )


def size_text(n: Any) -> str:
    """Bytes as KiB/MiB/GiB/TiB."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return _NONE
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _error(reply: TargetReply) -> Text:
    return Text(reply.error or "failed", style="red")


def _refusal(outcome: CommandOutcome) -> list[RenderableType]:
    return [Text(f"{outcome.command} refused: {outcome.error}", style="bold red")] if outcome.error else []


def replies_view(outcome: CommandOutcome, extra: dict[str, Any] | None = None) -> RenderableType:
    """One row per target: ok or failed, and the reply's fields or its error."""
    table = Table(title=f"{outcome.command}", title_justify="left")
    table.add_column("target")
    table.add_column("result")
    table.add_column("details", overflow="fold")
    for r in outcome.replies:
        if r.ok:
            details = Text("  ".join(f"{k}: {value_text(v)}" for k, v in r.data.items()))
            table.add_row(Text(r.target), Text("ok", style="green"), details)
        else:
            table.add_row(Text(r.target), Text("failed", style="bold red"), _error(r))
    parts: list[RenderableType] = [Text(f"{k}: {value_text(v)}") for k, v in (extra or {}).items()]
    parts += _refusal(outcome)
    if outcome.replies:
        parts.append(table)
    return Group(*parts)


def _progress_cells(progress: dict[str, Any]) -> tuple[str, str, str, str]:
    loss = progress.get("loss")
    return (
        value_text(progress.get("round")),
        value_text(progress.get("epoch")),
        f"{loss:.4f}" if isinstance(loss, (int, float)) and not isinstance(loss, bool) else value_text(loss),
        metrics_text(progress.get("metrics")),
    )


def server_line(server: TargetReply | None) -> Text:
    """ "server: run 1 training, round 2 of rounds 0..4" from the server's status data."""
    if server is None:
        return Text("server: not asked")
    if not server.ok:
        return Text.assemble("server: ", _error(server))
    d = server.data
    if d.get("run_number") is None:
        return Text("server: no run number set (fedadmin set-run N)")
    text = f"server: run {d['run_number']} {d.get('run_status', _NONE)}"
    if d.get("current_round") is not None:
        text += f", round {d['current_round']}"
        if isinstance(d.get("num_rounds"), int):
            first = d.get("start_round") or 0
            text += f" of rounds {first}..{first + d['num_rounds'] - 1}"
    if d.get("aggregator"):
        text += f", {algorithms_text(d.get('aggregator'), d.get('site_algorithms'))}"
    last = d.get("last_global_metrics")
    if isinstance(last, dict) and isinstance(last.get("mean"), dict) and last["mean"]:
        from fedcommon.metrics import primary_metric

        name = primary_metric(last["mean"])
        which = "final global model" if last.get("round") == "final" else f"global model of round {last.get('round')}"
        text += f"; {which}: mean {name} {value_text(last['mean'][name])}"
    return Text(text)


def algorithms_text(aggregator: Any, site_algorithms: Any) -> str:
    """ "FedAdam" or "FedAvg + SCAFFOLD": the run's aggregator and the site algorithms it turns on."""
    names = [str(aggregator or "FedAvg"), *(str(s) for s in site_algorithms or [] if s)]
    return " + ".join(names)


def run_note(outcome: CommandOutcome) -> Text | None:
    """What the operator must know of the run beyond the rows: every site failed, or what it waits for."""
    failed = failed_run_message(outcome)
    if failed:
        return Text(failed, style="bold red")
    waiting = awaited(outcome)
    return Text(f"waiting: {waiting}", style="yellow") if waiting else None


def status_view(outcome: CommandOutcome) -> RenderableType:
    """The server's run, rounds and sites, then one row per site with its status and training progress."""
    parts: list[RenderableType] = [*_refusal(outcome)]
    server = outcome.server
    if server is not None:
        parts.append(server_line(server))
        note = run_note(outcome)
        if note is not None:
            parts.append(note)
        if server.ok:
            parts.append(Text(f"registered sites: {value_text(server.data.get('registered_sites'))}"))
            parts.append(Text(f"connected sites:  {value_text(server.data.get('connected_sites'))}"))
            runs = live_runs(server)
            if len(runs) > 1:
                parts.append(runs_table(runs))
    if outcome.sites:
        parts.append(sites_table(outcome))
    return Group(*parts)


def live_runs(server: TargetReply) -> list[dict[str, Any]]:
    """The server's live runs from its status data (several when it trains runs at once)."""
    runs = server.data.get("runs")
    return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


def _run_cells(run: dict[str, Any]) -> tuple[str, str, str, str]:
    """(run, status, round, sites) of one live run."""
    rounds = f" of {value_text(run.get('num_rounds'))}" if run.get("num_rounds") is not None else ""
    return (
        value_text(run.get("run_number")),
        value_text(run.get("run_status")),
        f"{value_text(run.get('current_round'))}{rounds}",
        value_text(run.get("registered_sites")),
    )


def runs_table(runs: list[dict[str, Any]]) -> Table:
    """One row per live run: its status, round and the sites registered in it."""
    table = Table(title="live runs")
    for name in ("run", "status", "round"):
        table.add_column(name, no_wrap=True)
    table.add_column("registered sites", overflow="fold")
    for run in runs:
        table.add_row(*(Text(cell) for cell in _run_cells(run)))
    return table


def sites_table(outcome: CommandOutcome) -> Table:
    """One row per site: status, run, and the latest round, epoch, loss and metrics it reported."""
    table = Table()
    for name in ("site", "status", "run", "round", "epoch", "loss"):
        table.add_column(name, no_wrap=True)
    table.add_column("metrics or error", overflow="fold")
    for r in outcome.sites:
        if not r.ok:
            table.add_row(Text(r.target), Text("failed", style="bold red"), "", "", "", "", _error(r))
            continue
        code = r.data.get("status_code")
        style = "red" if code == ClientStatus.TRAINING_EXCEPTION else "green" if code in TRAINING_CODES else ""
        *cells, metrics = _progress_cells(site_progress(outcome, r))
        failure = site_failure(outcome, r)
        # What the site's launcher says of a training that has no metrics yet ("queued in Slurm: Resources").
        detail = r.data.get("detail") if code in TRAINING_CODES and isinstance(r.data.get("detail"), str) else ""
        table.add_row(
            Text(r.target),
            Text(value_text(r.data.get("status")), style=style),
            Text(value_text(r.data.get("run_number"))),
            *(Text(c) for c in cells),
            Text(failure, style="red") if failure else Text(metrics or detail),
        )
    return table


def progress_lines(outcome: CommandOutcome) -> list[str]:
    """The same as status_view, one plain line per participant (for logs and pipes)."""
    lines = [str(server_line(outcome.server))] if outcome.server is not None else []
    note = run_note(outcome) if outcome.server is not None else None
    lines += [str(note)] if note is not None else []
    runs = live_runs(outcome.server) if outcome.server is not None and outcome.server.ok else []
    if len(runs) > 1:
        lines += ["run {}: {}, round {}, sites {}".format(*_run_cells(run)) for run in runs]
    for r in outcome.sites:
        if not r.ok:
            lines.append(f"{r.target}: {r.error or 'failed'}")
            continue
        progress = site_progress(outcome, r)
        rnd, epoch, loss, metrics = _progress_cells(progress)
        line = f"{r.target}: {value_text(r.data.get('status'))}, run {value_text(r.data.get('run_number'))}"
        if progress:
            line += f", round {rnd}, epoch {epoch}, loss {loss}"
            line += f", {metrics}" if metrics else ""
        failure = site_failure(outcome, r)
        lines.append(f"{line}: {failure}" if failure else line)
    return lines


_SYSINFO_ROWS = (
    ("host", lambda d: value_text(d.get("hostname"))),
    ("platform", lambda d: value_text(d.get("platform"))),
    ("python", lambda d: value_text(d.get("python"))),
    ("torch", lambda d: value_text(d.get("torch"))),
    ("cpus", lambda d: f"{value_text(d.get('cpu_count'))} ({value_text(d.get('cpu_percent'))}% busy)"),
    ("load 1/5/15 min", lambda d: " / ".join(value_text(x) for x in d.get("load_avg") or []) or _NONE),
    ("memory free", lambda d: f"{size_text(d.get('memory_available'))} of {size_text(d.get('memory_total'))}"),
    ("disk free", lambda d: f"{size_text(d.get('disk_free'))} of {size_text(d.get('disk_total'))}"),
    ("gpus", lambda d: _gpus_text(d.get("gpus"))),
    ("training", lambda d: value_text(d.get("training_status"))),
)


def _gpus_text(gpus: Any) -> str:
    if not isinstance(gpus, list) or not gpus:
        return "none"
    lines = []
    for g in gpus:
        if not isinstance(g, dict):
            continue
        used, total = (_mib(g.get(k)) for k in ("memory_used_mib", "memory_total_mib"))
        lines.append(
            f"{value_text(g.get('index'))}: {value_text(g.get('name'))}, {size_text(used)} of {size_text(total)} "
            f"used, {value_text(g.get('utilization_percent'))}% busy"
        )
    return "\n".join(lines)


def _mib(n: Any) -> Any:
    return n * (1 << 20) if isinstance(n, (int, float)) and not isinstance(n, bool) else None


def sysinfo_view(outcome: CommandOutcome) -> RenderableType:
    """One column per target, one row per resource."""
    table = Table(title="sysinfo", title_justify="left")
    table.add_column("")
    for r in outcome.replies:
        table.add_column(r.target, overflow="fold")
    for label, get in _SYSINFO_ROWS:
        table.add_row(Text(label, style="bold"), *(Text(get(r.data)) if r.ok else Text("") for r in outcome.replies))
    if any(not r.ok for r in outcome.replies):
        table.add_row(Text("error", style="bold"), *(Text("") if r.ok else _error(r) for r in outcome.replies))
    return Group(*_refusal(outcome), table)


def shell_view(outcome: CommandOutcome) -> RenderableType:
    """Each target's output, under a line naming it and the command's exit code."""
    from rich.rule import Rule

    parts: list[RenderableType] = [*_refusal(outcome)]
    for r in outcome.replies:
        if not r.ok:
            parts.append(Text.assemble(f"{r.target}: ", _error(r)))
            continue
        parts.append(Rule(f"{r.target} (exit {value_text(r.data.get('exit_code'))})", align="left"))
        parts.append(Text(str(r.data.get("stdout", "")).rstrip("\n")))
        if r.data.get("truncated"):
            parts.append(Text("[output truncated by the site]", style="yellow"))
    return Group(*parts)


def failure_line(command: str, error: str) -> Text:
    """ "validate: run 7 does not exist" in red: a command that has nothing else to show."""
    return Text(f"{command}: {error}", style="bold red")


def validation_view(data: dict[str, Any], metric: str | None) -> RenderableType:
    """The cross-site matrix: one row per validating site, one column per model owner, each cell one metric."""
    title = f"Cross-site validation, run {value_text(data.get('run_number'))}"
    table = Table()
    owners = data.get("owners") or []
    table.add_column(Text("site \\ owner"), no_wrap=True)
    for owner in owners:
        table.add_column(Text(owner), justify="right", no_wrap=True)
    results = data.get("results") or {}
    for site in data.get("validating_sites") or []:
        row = results.get(site) or {}
        table.add_row(Text(site), *(_cell_text(row.get(owner), metric) for owner in owners))
    notes = [
        f"run status: {value_text(data.get('run_status'))}; rows validate the columns' models; "
        f"{_NOT_VALIDATED} not validated yet"
    ]
    if data.get("declined"):
        notes.append(f"did not share their model: {value_text(data['declined'])}")
    if data.get("enabled") is False and not results:
        notes.append(
            f"cross-site validation was not turned on for run {value_text(data.get('run_number'))} "
            "(cross_site_validate in config_fed_client.json): start it with `fedadmin validate --start`"
        )
    elif data.get("pending_owners"):
        notes.append(f"models not arrived yet: {value_text(data['pending_owners'])}")
    heading = Text(f"{title} ({metric})" if metric else title, style="bold")
    return Group(heading, table, *(Text(n, style="dim") for n in notes))


def _cell_text(metrics: dict[str, Any] | None, metric: str | None) -> Text:
    if metrics is None:
        return Text(_NOT_VALIDATED, style="dim")
    if metric is not None and metric in metrics:
        return Text(_metric(metrics[metric]))
    return Text(metrics_text(metrics) or "no metrics", style="yellow")


def validation_cell_view(run_number: Any, cell: dict[str, Any]) -> RenderableType:
    """One cell of the matrix: every metric the site measured on the owner's model."""
    heading = Text(
        f"Cross-site validation, run {value_text(run_number)}: "
        f"{value_text(cell.get('site'))} on {value_text(cell.get('owner'))}'s model",
        style="bold",
    )
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in (cell.get("metrics") or {}).items():
        table.add_row(Text(name), Text(_metric(value)))
    return Group(heading, table)


def round_lines(record: dict[str, Any]) -> list[str]:
    """A round as `metrics` answers it, as the demo prints it: contributors, duration, then each site's metrics."""
    lines = [
        f"round {record.get('round')}: contributors {', '.join(record.get('contributors', []))} "
        f"({float(record.get('duration_s', 0.0)):.1f}s); global model as each site measured it:"
    ]
    lines += [f"    {site}: {metrics_text(m)}" for site, m in (record.get("sites") or {}).items()]
    lines += [f"    refused {x.get('site')}: {x.get('reason')}" for x in record.get("rejected") or []]
    return lines


def summary_view(record: dict[str, Any]) -> RenderableType:
    """A run as `metrics` answers it: per round the sites and the metrics each reported; then the final metrics."""
    rounds = record.get("rounds") or []
    final = (record.get("final") or {}).get("sites") or {}
    names = sorted(
        {k for r in rounds for m in (r.get("sites") or {}).values() for k in m} | {k for m in final.values() for k in m}
    )
    table = Table(title=f"run {record.get('run_number')}: {record.get('run_status')}", title_justify="left")
    for col in ("round", "site", *names, "weight", "seconds"):
        table.add_column(col, justify="left" if col in ("round", "site") else "right")
    for r in rounds:
        weights = r.get("weights") or {}
        for i, site in enumerate(r.get("contributors") or []):
            m = (r.get("sites") or {}).get(site, {})
            table.add_row(
                str(r.get("round")) if i == 0 else "",
                site,
                *(_metric(m.get(n)) for n in names),
                value_text(weights.get(site)),
                f"{float(r.get('duration_s', 0.0)):.1f}" if i == 0 else "",
            )
        table.add_section()
    for i, (site, m) in enumerate(sorted(final.items())):
        table.add_row("final" if i == 0 else "", site, *(_metric(m.get(n)) for n in names), "", "")
    return table


def _metric(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else value_text(v)


def line_chart(points: list[tuple[int, float]], height: int = 8, width: int = 60) -> Text:
    """A small chart of (round, value) points in text: one column per round (thinned past `width`)."""
    if not points:
        return Text("")
    step = max(1, -(-len(points) // width))
    shown = points[::step]
    if shown[-1] != points[-1]:
        shown.append(points[-1])
    low, high = min(v for _, v in shown), max(v for _, v in shown)
    span = high - low or 1.0
    gap = max(1, min(3, width // len(shown)))  # columns per point: few rounds are spread out
    rows = [[" "] * (len(shown) * gap) for _ in range(height)]
    for col, (_, value) in enumerate(shown):
        level = round((value - low) / span * (height - 1))
        rows[height - 1 - level][col * gap] = "●"
    label = max(len(f"{high:.4g}"), len(f"{low:.4g}"))
    lines = []
    for i, row in enumerate(rows):
        tick = f"{high:.4g}" if i == 0 else f"{low:.4g}" if i == height - 1 else ""
        lines.append(f"{tick:>{label}} ┤{''.join(row)}")
    lines.append(" " * label + " └" + "─" * (len(shown) * gap))
    first, last = str(shown[0][0]), str(shown[-1][0])
    room = (len(shown) - 1) * gap + 1 - len(first) - len(last) + (len(last) - 1)
    lines.append(" " * (label + 2) + first + " " * max(1, room) + last + "  (round)")
    return Text("\n".join(lines))


def metrics_view(
    run_number: Any,
    run_status: Any,
    records: list[dict[str, Any]],
    metric: str | None,
    png: Any = None,
    algorithms: str = "",
) -> RenderableType:
    """Per round: each site's value of `metric` for the global model it received, their mean; then a chart."""
    title = f"Run {value_text(run_number)} ({value_text(run_status)}): {metric or 'no metrics'}"
    if not records:
        return Text(f"{title}: no round has closed yet", style="yellow")
    sites = sorted({s for r in records for s in (r.get("sites") or {})})
    table = Table(title=title, title_justify="left")
    table.add_column("round", justify="right")
    for site in sites:
        table.add_column(site, justify="right")
    table.add_column("mean", justify="right", style="bold")
    for r in records:
        cells = [value_text((r.get("sites") or {}).get(s, {}).get(metric)) for s in sites]
        table.add_row(str(r.get("round")), *cells, value_text((r.get("mean") or {}).get(metric)))
    parts: list[RenderableType] = [Text(f"algorithms: {algorithms}")] if algorithms else []
    parts.append(table)
    curve = [
        (r["round"], r["mean"][metric])
        for r in records
        if isinstance(r.get("round"), int) and metric in (r.get("mean") or {})
    ]
    if len(curve) > 1:
        parts += [Text(f"mean {metric} by round", style="bold"), line_chart(curve)]
    parts.append(
        Text(
            "Each round's row scores the global model the sites received at its start; final: the model "
            "after the last round.",
            style="dim",
        )
    )
    if png is not None:
        parts.append(Text(f"learning curves written to {png}"))
    return Group(*parts)
