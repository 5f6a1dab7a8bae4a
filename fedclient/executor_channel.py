"""The channel between a ProcessExecutor and its worker: JSON events over an authenticated multiprocessing.connection.

The event codec serves both sides; the rest is the worker's side: connecting back to the agent with the
per-launch key, obeying its abort, and leaving when it is gone. Never pickle: only JSON bytes cross.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection
from typing import Any

log = logging.getLogger(__name__)

# The per-launch key travels to the worker in this environment variable (never on its command line).
AUTHKEY_ENV = "FEDLEARN_PARENT_AUTHKEY"
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


def serve_events(conn: Connection, handle: Callable[[dict[str, Any]], None], peer: str,
                 keep_going: Callable[[], bool] | None = None) -> None:
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


def connect_parent(address: str) -> Connection:
    """The worker's connection to the agent at "host:port", authenticated with the key in FEDLEARN_PARENT_AUTHKEY.

    The key is removed from the environment so that the MMAR's code and its children never see it.
    """
    key_hex = os.environ.pop(AUTHKEY_ENV, None)
    if not key_hex:
        raise ValueError(f"--parent needs the authentication key in the environment variable {AUTHKEY_ENV}")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--parent must be HOST:PORT, got {address!r}")
    return Client((host, int(port)), authkey=bytes.fromhex(key_hex))


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


def start_command_listener(client, conn: Connection, parent_pid: int | None = None,
                           grace: float = 2.0) -> threading.Thread:
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
