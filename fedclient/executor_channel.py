"""The channel between a ProcessExecutor and its worker: JSON events over an authenticated multiprocessing.connection.

The event codec serves both sides; the rest is the worker's side: connecting back to the agent with the
per-launch key, obeying its abort, and leaving when it is gone. Never pickle: only JSON bytes cross.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection
from typing import Any

log = logging.getLogger(__name__)

# Where the worker reads the per-launch key: "fd:N", a pipe the agent wrote it to, or the path of a 0600 file in a
# private folder (torchrun's ranks inherit no descriptor: it starts them with close_fds). The key itself is never in
# an environment, which /proc/PID/environ shows for the process's life, nor on a command line.
KEY_SOURCE_ENV = "FEDLEARN_PARENT_KEY_FROM"
_MAX_KEY_TEXT = 1024
MAX_EVENT_BYTES = 1 << 20
PARENT_POLL_S = 0.5


def send_event(conn: Connection, kind: str, **fields: Any) -> None:
    """Send one event {"kind": kind, ...} as JSON bytes."""
    conn.send_bytes(json.dumps({"kind": kind, **fields}).encode("utf-8"))


def read_event(conn: Connection) -> dict[str, Any]:
    """Receive one JSON event; EOFError/OSError when the peer is gone; ValueError for a malformed one."""
    event = json.loads(conn.recv_bytes(MAX_EVENT_BYTES).decode("utf-8"))
    if not isinstance(event, dict) or not isinstance(event.get("kind"), str):
        raise ValueError(f"not an event object: {str(event)[:200]}")
    return event


def serve_events(
    conn: Connection, handle: Callable[[dict[str, Any]], None], peer: str, keep_going: Callable[[], bool] | None = None
) -> None:
    """Pass each event from `conn` to `handle` until the peer is gone, or until keep_going(), asked between polls,
    says no; a malformed event is logged and skipped."""
    while True:
        try:
            if keep_going is not None and not conn.poll(PARENT_POLL_S):
                if not keep_going():
                    return
                continue
            event = read_event(conn)
        except (EOFError, OSError):
            return
        except ValueError as e:
            log.warning("ignoring a malformed message from the %s: %s", peer, e)
            continue
        handle(event)


class KeyHandoff:
    """The agent's side of passing a per-launch key to a worker: a pipe it inherits, or a private file for ranks.

    `env` goes into the worker's environment and `pass_fds` to Popen; call `launched()` once Popen returned and
    `close()` once every rank has connected or the launch ended (it deletes the file).
    """

    def __init__(self, key: bytes, by_file: bool):
        self._fd: int | None = None
        self._folder: str | None = None
        if by_file:
            self._folder = tempfile.mkdtemp(prefix="fedlearn-worker-key-")  # 0700, outside any workspace
            path = os.path.join(self._folder, "key")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key.hex())
            self.env, self.pass_fds = {KEY_SOURCE_ENV: path}, ()
        else:
            read, write = os.pipe()
            os.write(write, key.hex().encode())  # 64 bytes: far below a pipe's buffer
            os.close(write)
            self._fd = read
            self.env, self.pass_fds = {KEY_SOURCE_ENV: f"fd:{read}"}, (read,)

    def launched(self) -> None:
        """The worker holds its copy of the pipe now: the agent's end is closed."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Nothing of the key is left outside the agent (idempotent)."""
        self.launched()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def read_parent_key() -> bytes:
    """The worker's per-launch key from where KEY_SOURCE_ENV says; the descriptor is closed, the variable removed."""
    source = os.environ.pop(KEY_SOURCE_ENV, None)
    if not source:
        raise ValueError(f"--parent needs the agent's key: {KEY_SOURCE_ENV} names a descriptor (fd:N) or a file")
    try:
        if source.startswith("fd:") and source[3:].isdigit():
            with os.fdopen(int(source[3:]), "rb") as f:
                text = f.read(_MAX_KEY_TEXT)
        else:
            with open(source, "rb") as f:
                text = f.read(_MAX_KEY_TEXT)
        return bytes.fromhex(text.decode("ascii").strip())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the agent's key from {source}: {e}") from None


def connect_parent(address: str) -> Connection:
    """The worker's connection to the agent at "host:port", authenticated with the per-launch key (read_parent_key)."""
    key = read_parent_key()
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--parent must be HOST:PORT, got {address!r}")
    return Client((host, int(port)), authkey=key)


def listen_command(client, conn: Connection, parent_pid: int | None = None) -> str:
    """Worker side: abort `client` when the parent says so; return "parent gone" (after aborting) once it is."""

    def obey(event: dict[str, Any]) -> None:
        if event["kind"] == "abort":
            log.info("abort requested by the agent")
            client.abort()
        else:
            log.warning("ignoring an unknown message kind %r from the agent", event["kind"])

    # The parent may be torchrun rather than the agent: its end does not close the connection, so it is watched.
    serve_events(conn, obey, "agent", lambda: parent_pid is None or os.getppid() == parent_pid)
    client.abort()
    return "parent gone"


def start_command_listener(
    client, conn: Connection, parent_pid: int | None = None, grace: float = 2.0
) -> threading.Thread:
    """Run listen_command in a thread; when the parent dies, give `client` `grace` seconds, then kill this group."""

    def run() -> None:
        listen_command(client, conn, parent_pid)
        log.error("the agent that started this worker is gone; stopping the training")
        time.sleep(grace)
        logging.shutdown()
        if os.getpgrp() == os.getpid():
            # The worker leads its own process group: this takes every process the training started with it.
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os._exit(1)  # not a group leader (started by hand): never signal someone else's group

    thread = threading.Thread(target=run, name="parent-listener", daemon=True)
    thread.start()
    return thread
