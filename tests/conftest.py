"""Shared fixtures: free ports, POC workspaces, MMAR copies and real server processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from orphans import TAG_VAR, new_tag, reap_leftovers
from slurm_cluster import SlurmCluster, SlurmSetupError, start_cluster

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"


# How long a test's processes may take to exit after its own teardown before they count as orphans.
ORPHAN_GRACE_S = 15.0
# Processes started outside a test's own scope (module fixtures) carry the session's tag: checked at the end.
SESSION_TAG = new_tag()
os.environ[TAG_VAR] = SESSION_TAG


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = reap_leftovers(SESSION_TAG, ORPHAN_GRACE_S)
    if left:
        shown = "\n".join(f"  {pid}: {cmd}" for pid, cmd in sorted(left.items()))
        print(f"\nprocesses left behind by module or session fixtures (now killed):\n{shown}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def no_orphans(monkeypatch) -> Iterator[None]:
    """After each test (pass or fail), no process it started may be left: fail naming them, and kill them.

    Autouse, so it is set up before and torn down after the test's other function fixtures.
    """
    tag = new_tag()
    monkeypatch.setenv(TAG_VAR, tag)
    yield
    left = reap_leftovers(tag, ORPHAN_GRACE_S)
    if left:
        pytest.fail(
            "processes left behind by this test (now killed):\n"
            + "\n".join(f"  {pid}: {cmd}" for pid, cmd in sorted(left.items())),
            pytrace=False,
        )


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now on 127.0.0.1 and not handed out before in this session (the OS may offer one twice in a
    row once it is closed again: a server's fl_port and admin_port would then be the same)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def prepare_workspace(path: Path, clients: int = 2) -> Path:
    from fedcommon.provision import prepare_poc

    prepare_poc(path, clients, "127.0.0.1", free_port(), free_port(), "test", False)
    return path


def copy_mmar(
    dst: Path,
    server: dict | None = None,
    client: dict | None = None,
    train_args: dict | None = None,
    src: Path = DIGITS,
) -> Path:
    """A copy of an MMAR with some config keys replaced."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for name, changes in (("config_fed_server.json", server), ("config_fed_client.json", client)):
        if changes:
            path = dst / "config" / name
            cfg = json.loads(path.read_text())
            cfg.update(changes)
            path.write_text(json.dumps(cfg))
    if train_args:
        path = dst / "config" / "config_train.json"
        cfg = json.loads(path.read_text())
        cfg["trainer"]["args"].update(train_args)
        path.write_text(json.dumps(cfg))
    return dst


def training_run_files(
    tmp_path: Path, initial_model: dict, clients: int = 2, client: dict | None = None, **server_config
) -> tuple[Path, Path]:
    """A POC workspace (tmp_path/ws) and a digits copy (tmp_path/mmar) whose initial model is `initial_model`
    (config_fed_server.json keys replaced by server_config, config_fed_client.json keys by `client`)."""
    from fedcommon.model_file import save_model

    ws = prepare_workspace(tmp_path / "ws", clients)
    mmar = copy_mmar(
        tmp_path / "mmar", server={"initial_model": {"file": "models/initial.fl"}, **server_config}, client=client
    )
    save_model(mmar / "models" / "initial.fl", initial_model)
    return ws, mmar


def start_training_run(tmp_path: Path, initial_model: dict, clients: int = 2, **server_config):
    """An in-process server on a free fl_port training run 1 of a digits copy from `initial_model` (config keys
    replaced by server_config); returns (server, POC workspace). Stop it with server.stop(0)."""
    from fedcommon.kit import load_kit
    from fedserver.server import FederationServer

    ws, mmar = training_run_files(tmp_path, initial_model, clients, **server_config)
    server = FederationServer(ws / "server", load_kit(ws / "server"), fl_port=0)
    server.start_run(mmar)
    server.start()
    return server, ws


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: by PID, for a process this test started."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def server_process(workspace: Path, *args: str, timeout: float = 60) -> Iterator[subprocess.Popen]:
    """`fedserver start` as a real process; yields once it listens; always stopped afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedserver.cli", "start", "--workspace", str(workspace), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=python_env(),
        cwd=ROOT,
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("fedserver ready"):
                ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not ready.is_set():
            if proc.poll() is not None or time.monotonic() > deadline:
                reader.join(2)
                raise AssertionError("fedserver did not start:\n" + "".join(lines))
            ready.wait(0.1)
        proc.output_lines = lines  # type: ignore[attr-defined]
        yield proc
    finally:
        stop_process(proc)
        reader.join(5)


def start_site(workspace: Path, mmar: Path) -> subprocess.Popen:
    """`fedclient train` for one site, as a real process."""
    return subprocess.Popen(
        [sys.executable, "-m", "fedclient.cli", "train", "--workspace", str(workspace), "--mmar", str(mmar)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=python_env(),
        cwd=ROOT,
    )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; each is stopped at teardown, pass or fail."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        stop_process(proc, grace=5)


def wait_json(path: Path, predicate, timeout: float) -> dict:
    """Poll a JSON file until predicate(content) holds; returns the content."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            last = json.loads(path.read_text())
            if predicate(last):
                return last
        time.sleep(0.1)
    raise AssertionError(f"{path} never reached the expected state; last: {json.dumps(last, indent=1)[:3000]}")


def scrape(url: str) -> dict[str, float]:
    """A Prometheus endpoint's text format as {"name{labels}": value}."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def run_fedadmin(
    *args: str, kit: Path | None = None, env: dict[str, str | None] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -m fedadmin.cli ARGS` with no terminal on stdin, so nothing can prompt.

    kit: the admin kit as FEDADMIN_KIT (one inherited from the caller's environment is never used); env: variables
    to set, or with None to remove (COLUMNS, FORCE_COLOR, NO_COLOR ...).
    """
    full = python_env()
    full.pop("FEDADMIN_KIT", None)
    if kit is not None:
        full["FEDADMIN_KIT"] = str(kit)
    for name, value in (env or {}).items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    return subprocess.run(
        [sys.executable, "-m", "fedadmin.cli", *args],
        cwd=ROOT,
        env=full,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A real single-node Slurm (munged, slurmctld, slurmd) for the session; never skipped: it fails when it cannot
    come up. Its daemons carry the session's tag and are stopped by their PIDs at the end."""
    # Not under pytest's 0700 folders: munged wants every folder above its socket open to all.
    root = Path(tempfile.mkdtemp(prefix="fedlearn-slurm-"))
    root.chmod(0o711)
    try:
        cluster = start_cluster(root, {**os.environ, TAG_VAR: SESSION_TAG})
    except SlurmSetupError as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(str(e), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
