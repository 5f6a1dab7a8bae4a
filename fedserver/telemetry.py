"""The server's counters and gauges, and their optional Prometheus endpoint (`fedserver start --metrics-port`).

Counting costs a lock and an add per event (a model stream, a contribution, a command), never per chunk;
prometheus-client is imported only when the endpoint is asked for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

PREFIX = "fedlearn"


@dataclass
class _Command:
    count: int = 0
    failed: int = 0
    seconds: float = 0.0


@dataclass
class Telemetry:
    """What the server counts; `gauges` are read when scraped (registered sites, round, ...)."""

    bytes_received: int = 0
    bytes_sent: int = 0
    contributions_accepted: int = 0
    contributions_refused: int = 0
    bulk_downloads: int = 0  # models sent over the bulk channel
    bulk_uploads: int = 0  # contributions accepted over the bulk channel
    commands: dict[str, _Command] = field(default_factory=dict)
    gauges: Callable[[], dict[str, float]] = lambda: {}
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def received(self, n: int) -> None:
        with self._lock:
            self.bytes_received += n

    def sent(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n

    def contribution(self, accepted: bool) -> None:
        with self._lock:
            if accepted:
                self.contributions_accepted += 1
            else:
                self.contributions_refused += 1

    def bulk_transfer(self, op: str) -> None:
        with self._lock:
            if op == "download":
                self.bulk_downloads += 1
            else:
                self.bulk_uploads += 1

    def command(self, name: str, ok: bool, seconds: float) -> None:
        with self._lock:
            c = self.commands.setdefault(name, _Command())
            c.count += 1
            c.failed += 0 if ok else 1
            c.seconds += seconds

    def snapshot(self) -> dict[str, Any]:
        """Every figure at one instant."""
        with self._lock:
            commands = {k: _Command(v.count, v.failed, v.seconds) for k, v in self.commands.items()}
            counts = {
                "bytes_received": self.bytes_received,
                "bytes_sent": self.bytes_sent,
                "contributions_accepted": self.contributions_accepted,
                "contributions_refused": self.contributions_refused,
                "bulk_downloads": self.bulk_downloads,
                "bulk_uploads": self.bulk_uploads,
            }
        return {**counts, "commands": commands, "gauges": self.gauges()}


_GAUGE_HELP = {
    "registered_sites": "Sites holding a training session.",
    "connected_sites": "Sites whose admin agent is connected (long-polling for commands).",
    "run_number": "The current run number (0: none set).",
    "round": "The open round of the training run (absent when none trains).",
    "training": "1 while a run is training, else 0.",
}


def _families(telemetry: Telemetry) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

    snap = telemetry.snapshot()
    for name, value in snap["gauges"].items():
        yield GaugeMetricFamily(f"{PREFIX}_{name}", _GAUGE_HELP.get(name, name), value=value)
    for name, help_text in (
        ("training_bytes_received", "Tensor bytes of contributions received from sites."),
        ("training_bytes_sent", "Tensor bytes sent to sites (global and validation models)."),
        ("contributions_accepted", "Contributions accepted into a round."),
        ("contributions_refused", "Contributions refused (stale, duplicate, malformed, ...)."),
        ("bulk_downloads", "Global models sent over the bulk channel."),
        ("bulk_uploads", "Contributions accepted over the bulk channel."),
    ):
        key = name.removeprefix("training_")
        yield CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=snap[key])
    latency = SummaryMetricFamily(
        f"{PREFIX}_admin_command_seconds", "Admin commands: how many and how long.", labels=["command"]
    )
    failed = CounterMetricFamily(
        f"{PREFIX}_admin_commands_failed", "Admin commands that failed or were refused.", labels=["command"]
    )
    for command, c in sorted(snap["commands"].items()):
        latency.add_metric([command], count_value=c.count, sum_value=c.seconds)
        failed.add_metric([command], c.failed)
    yield latency
    yield failed


class _Collector:
    def __init__(self, telemetry: Telemetry):
        self.telemetry = telemetry

    def collect(self) -> Iterator[Any]:
        return _families(self.telemetry)


class ExporterError(RuntimeError):
    """The Prometheus endpoint cannot be served; the message says why."""


def start_exporter(telemetry: Telemetry, host: str, port: int) -> tuple[Any, int]:
    """Serve /metrics over HTTP on host:port (0: a free port); returns (the server, the bound port)."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise ExporterError("--metrics-port needs prometheus-client: pip install 'fedlearn[prometheus]'") from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(telemetry))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise ExporterError(f"cannot serve metrics on {host}:{port}: {e}") from None
    return server, server.server_address[1]
