"""Start and stop the processes of a local POC federation; their PIDs are recorded in <workspace>/poc.json.

Each participant runs in its own session (so its process group can be signalled as a whole), writes its
log to <folder>/log.txt itself, and its stdout/stderr go to <folder>/console.txt. Each participant process also
records itself in <folder>/pid.json (fedcommon.pid_file), so one started by hand (a server restarted after a
crash) is stopped too.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from fedcommon.atomic import atomic_write_json
from fedcommon.escape import for_terminal
from fedcommon.pid_file import PID_FILE, live_process, read_pid_file
from fedcommon.readiness import READY_FD_ENV, READY_LINE

RECORD = "poc.json"
STARTUP_CONFIG = Path("startup") / "fed.json"
STOP_GRACE = 15.0
KILL_WAIT = 5.0
_SAME_START = 0.05  # seconds: a PID with another start time is another process
# Start-up: every participant says on its ready pipe when it is ready (fedcommon.readiness); the pipes are waited on
# in slices this long, between which the processes are checked. Then the console confirms with the server that every
# site is connected, asking after 20 ms (a site's long-poll reaches the server milliseconds after it said ready), then
# less often, up to the slice.
LIVENESS_SLICE_S = 0.25
CONFIRM_POLL_S = 0.02
_LAST_WORDS = 300  # characters of a participant's last line of output quoted when it exits during start-up
_TAIL_BYTES = 1 << 16  # where that line is looked for: the end of its output


class FederationError(Exception):
    """The local federation cannot be started or stopped; the message names the logs to read."""


@dataclass(frozen=True)
class Participant:
    """A participant folder holding a startup kit."""

    name: str
    role: str
    folder: Path
    admin_role: str | None = None


@dataclass(frozen=True)
class ProcessRecord:
    """A started participant process, as recorded in poc.json."""

    name: str
    pid: int
    create_time: float
    argv: list[str]
    log: str
    console: str


@dataclass(frozen=True)
class Stopped:
    """What stopping one recorded process took: "stopped" (SIGTERM), "killed" (SIGKILL) or "not running"."""

    name: str
    pid: int
    outcome: str


def participants(workspace: Path) -> list[Participant]:
    """The server, the sites (in name order) and the admins whose kits are in workspace."""
    found = []
    for folder in sorted(p for p in workspace.iterdir() if (p / STARTUP_CONFIG).is_file()):
        try:
            config = json.loads((folder / STARTUP_CONFIG).read_text())
        except (OSError, ValueError) as exc:
            raise FederationError(f"{folder / STARTUP_CONFIG}: unreadable ({exc})") from None
        admin_role = config.get("admin_role")
        found.append(
            Participant(
                str(config.get("name", folder.name)),
                str(config.get("role")),
                folder,
                admin_role if isinstance(admin_role, str) else None,
            )
        )
    order = {"server": 0, "client": 1, "admin": 2}
    found.sort(key=lambda p: (order.get(p.role, 3), _natural(p.name)))
    if not any(p.role == "server" for p in found) or not any(p.role == "client" for p in found):
        raise FederationError(f"{workspace} holds no server and site kits: run `fedadmin poc prepare` first")
    return found


def _natural(name: str) -> tuple:
    head, _, tail = name.rpartition("-")
    return (head, int(tail), "") if tail.isdigit() else (name, 0, name)


def admin_kit(workspace: Path) -> Path:
    """The folder of the admin kit to operate a POC workspace with: a project_admin's if there is one."""
    admins = [p for p in participants(workspace) if p.role == "admin"]
    if not admins:
        raise FederationError(f"{workspace} holds no admin kit: run `fedadmin poc prepare` first")
    return next((p for p in admins if p.admin_role == "project_admin"), admins[0]).folder


def participant_argv(participant: Participant) -> list[str]:
    """`fedserver start` or `fedclient start` for the participant's folder, with this Python."""
    module = "fedserver.cli" if participant.role == "server" else "fedclient.cli"
    return [sys.executable, "-m", module, "start", "--workspace", str(participant.folder)]


def launch(workspace: Path, name: str, argv: list[str], ready_fd: int | None = None) -> ProcessRecord:
    """Start argv for participant `name` in its own session, output to <name>/console.txt; record it.

    ready_fd: the write end of a pipe handed to the participant, on which it says when it is ready.
    """
    folder = workspace / name
    console = folder / "console.txt"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop(READY_FD_ENV, None)
    if ready_fd is not None:
        env[READY_FD_ENV] = str(ready_fd)
    with open(console, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            pass_fds=() if ready_fd is None else (ready_fd,),
        )
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        create_time = time.time()
    record = ProcessRecord(name, proc.pid, create_time, argv, str(folder / "log.txt"), str(console))
    write_records(workspace, [*read_records(workspace), record])
    return record


def read_records(workspace: Path) -> list[ProcessRecord]:
    """The processes recorded in workspace/poc.json (none when it is missing)."""
    path = workspace / RECORD
    try:
        content = json.loads(path.read_text())
        return [ProcessRecord(**p) for p in content["processes"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FederationError(f"{path}: unreadable ({exc}); stop the processes by hand and remove it") from None


def write_records(workspace: Path, records: list[ProcessRecord]) -> None:
    """Replace workspace/poc.json atomically."""
    atomic_write_json(workspace / RECORD, {"workspace": str(workspace), "processes": [asdict(r) for r in records]})


def recorded_process(record: ProcessRecord) -> psutil.Process | None:
    """The live process a record names, or None if it ended (a reused PID is not it)."""
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > _SAME_START or _gone(proc):
            return None
        return proc
    except psutil.Error:
        return None


def running(workspace: Path) -> list[ProcessRecord]:
    """The recorded processes that still run, and the participants' own (pid.json) that poc.json does not name."""
    records = [r for r in read_records(workspace) if recorded_process(r) is not None]
    known = {r.pid for r in records}
    return records + [r for r in self_recorded(workspace) if r.pid not in known]


def self_recorded(workspace: Path) -> list[ProcessRecord]:
    """The server and site processes that run from workspace by their own pid.json, however they were started."""
    try:
        found = [p for p in participants(workspace) if p.role in ("server", "client")]
    except FederationError:
        return []
    records = []
    for participant in found:
        own = read_pid_file(participant.folder)
        if own is not None and live_process(own) is not None:
            folder = participant.folder
            records.append(
                ProcessRecord(
                    folder.name,
                    own.pid,
                    own.create_time,
                    list(own.cmdline),
                    str(folder / "log.txt"),
                    str(folder / "console.txt"),
                )
            )
    return records


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process ended (a zombie counts as ended; ours are reaped); returns those left."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in procs:
            if _gone(proc):
                with contextlib.suppress(psutil.Error, ChildProcessError):
                    proc.wait(0)  # reaps it if it is our own child
            else:
                alive.append(proc)
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _group_members(pgid: int, since: float) -> list[psutil.Process]:
    """Live processes in process group pgid that started no earlier than its leader did."""
    members = []
    for proc in psutil.process_iter(["create_time"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["create_time"] >= since - _SAME_START and not _gone(proc):
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop(workspace: Path, grace: float = STOP_GRACE) -> list[Stopped]:
    """SIGTERM every recorded process group and every participant process its pid.json names, wait up to grace,
    SIGKILL what is left; verify none is left.

    The processes' descendants are collected first, so a child in a group of its own (a training
    worker) is killed too if its parent did not stop it. Removes poc.json (and stale pid files) once nothing is left.
    """
    records = read_records(workspace)
    tracked: dict[int, psutil.Process] = {}
    leaders: dict[int, psutil.Process] = {}
    for record in records:
        leader = recorded_process(record)
        members = _group_members(record.pid, record.create_time)
        if leader is not None:
            leaders[record.pid] = leader
            with contextlib.suppress(psutil.Error):
                members += leader.children(recursive=True)
        for proc in ([leader] if leader is not None else []) + members:
            tracked[proc.pid] = proc
        if leader is not None or members:
            _signal_group(record.pid, signal.SIGTERM)
    # A participant started otherwise (by hand, after a crash) shares its starter's process group: it is signalled
    # alone, and its descendants are tracked to be killed one by one if it leaves them behind.
    own = [r for r in self_recorded(workspace) if r.pid not in tracked]
    for record in own:
        proc = recorded_process(record)
        if proc is None:
            continue
        leaders[record.pid] = proc
        with contextlib.suppress(psutil.Error):
            for member in [proc, *proc.children(recursive=True)]:
                tracked[member.pid] = member
            proc.terminate()
    alive = _wait_gone(list(tracked.values()), grace)
    killed = set()
    if alive:
        for record in records:
            if _group_members(record.pid, record.create_time):
                _signal_group(record.pid, signal.SIGKILL)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
            killed.add(proc.pid)
        _wait_gone(alive, KILL_WAIT)
    left = [p for p in tracked.values() if not _gone(p)]
    left += [p for r in records for p in _group_members(r.pid, r.create_time) if p.pid not in tracked]
    if left:
        shown = ", ".join(f"{p.pid}" for p in left)
        raise FederationError(f"processes still running after SIGKILL: {shown}; {workspace / RECORD} is kept")
    with contextlib.suppress(FileNotFoundError):
        (workspace / RECORD).unlink()
    _remove_stale_pid_files(workspace)
    return [
        Stopped(r.name, r.pid, "not running" if r.pid not in leaders else "killed" if r.pid in killed else "stopped")
        for r in records + own
    ]


def _remove_stale_pid_files(workspace: Path) -> None:
    """Remove the participants' pid files that name no running process (one killed could not remove its own)."""
    with contextlib.suppress(FederationError):
        for participant in participants(workspace):
            own = read_pid_file(participant.folder)
            if own is not None and live_process(own) is None:
                with contextlib.suppress(FileNotFoundError):
                    (participant.folder / PID_FILE).unlink()


def free_port(avoid: set[int | None] = frozenset()) -> int:
    """A TCP port free on 127.0.0.1 now, not one of `avoid`."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def _require_roles() -> None:
    """A POC runs the server and the sites here: refuse with the install line when their extras are missing."""
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except ImportError:
            return True

    missing = [m for m in ("numpy", "torch") if absent(m)]
    if missing:
        raise FederationError(
            f"a POC federation runs the server and its sites on this machine, which needs "
            f"{' and '.join(missing)}: pip install 'fedlearn[server,site]'"
        )


def start(
    workspace: Path,
    ready: Callable[[list[str]], str | None],
    timeout: float,
    argv_for: Callable[[Participant], list[str]] = participant_argv,
) -> list[ProcessRecord]:
    """Start the server and every site of workspace; return once each has said it is ready and ready(sites) says
    nothing is missing.

    ready(sites) returns what is not ready yet in words ("site-2 not connected"), or None.
    On a failure or timeout every started process is stopped and FederationError names the logs; a participant that
    exits during start-up is named with the last line it printed.
    """
    workspace = workspace.resolve()
    _require_roles()
    if running(workspace):
        raise FederationError(
            f"a POC federation from {workspace} is already running: `fedadmin poc stop --workspace {workspace}`"
        )
    with contextlib.suppress(FileNotFoundError):
        (workspace / RECORD).unlink()
    found = [p for p in participants(workspace) if p.role in ("server", "client")]
    sites = [p.name for p in found if p.role == "client"]
    records: list[ProcessRecord] = []
    pipes: dict[int, ProcessRecord] = {}  # read end -> the participant that has not said it is ready yet
    offsets: dict[str, int] = {}  # participant -> where its output of this start begins in its console.txt
    try:
        for participant in found:
            console = workspace / participant.folder.name / "console.txt"
            offsets[participant.folder.name] = console.stat().st_size if console.exists() else 0
            read_end, write_end = os.pipe()
            try:
                record = launch(workspace, participant.folder.name, argv_for(participant), write_end)
            except BaseException:
                os.close(read_end)
                raise
            finally:
                os.close(write_end)
            records.append(record)
            pipes[read_end] = record
        deadline = time.monotonic() + timeout
        missing: str | None = "no participant has said it is ready"
        pause = CONFIRM_POLL_S
        while True:
            for record in records:
                if recorded_process(record) is None:
                    raise FederationError(_exited(record, offsets[record.name]))
            if pipes:
                _take_ready_lines(pipes, min(LIVENESS_SLICE_S, max(0.0, deadline - time.monotonic())))
            else:
                missing = ready(sites)
                if missing is None:
                    return records
            if time.monotonic() >= deadline:
                if pipes:
                    missing = ready(sites) or missing
                silent = (
                    f"; not ready by their own account: {', '.join(r.name for r in pipes.values())}" if pipes else ""
                )
                raise FederationError(
                    f"not ready within {timeout:g}s: {missing}; "
                    f"logs: {', '.join(r.log for r in records)} (stdout/stderr beside them in console.txt){silent}"
                )
            if not pipes:
                time.sleep(pause)
                pause = min(2 * pause, LIVENESS_SLICE_S)
    except BaseException:
        with contextlib.suppress(FederationError):
            stop(workspace, grace=5.0)
        raise
    finally:
        for read_end in pipes:
            os.close(read_end)


def _take_ready_lines(pipes: dict[int, ProcessRecord], timeout: float) -> None:
    """Wait up to timeout for the participants' ready lines; drop each pipe that said it (or ended: its process is
    checked by the caller)."""
    readable, _, _ = select.select(list(pipes), [], [], timeout)
    for read_end in readable:
        try:
            line = os.read(read_end, len(READY_LINE))
        except OSError:
            line = b""
        if line == READY_LINE or not line:
            os.close(read_end)
            del pipes[read_end]


def _exited(record: ProcessRecord, offset: int) -> str:
    """Why start-up failed when `record`'s process ended: where to look, and the last line it printed."""
    message = f"{record.name} exited during start-up; see {record.console} and {record.log}"
    try:
        with open(record.console, "rb") as out:
            out.seek(max(offset, out.seek(0, os.SEEK_END) - _TAIL_BYTES))
            lines = out.read(_TAIL_BYTES).decode("utf-8", "replace").strip().splitlines()
    except OSError:
        lines = []
    if not lines:
        return message
    return f"{message}; it said: {for_terminal(lines[-1].strip()[:_LAST_WORDS])}"
