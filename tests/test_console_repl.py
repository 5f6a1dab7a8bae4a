"""`fedadmin console`, the interactive prompt, driven through a pseudo-terminal against a real server."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
from conftest import ROOT, prepare_workspace, python_env, server_process, stop_process

pytestmark = pytest.mark.e2e

PROMPT = "fedadmin> "


class Terminal:
    """A process on a pty: type lines, wait for text on the screen."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, start_new_session=True
        )
        os.close(slave)
        self.screen = ""

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, pattern: str, timeout: float = 60, after: int = 0) -> int:
        """Wait until `pattern` (a regex) shows at or after offset `after`; returns where its match ends."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.compile(pattern).search(self.screen, after)
            if found:
                return found.end()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} never showed; the screen:\n{self.screen[-3000:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # the process ended and the pty closed
                    data = b""
                if not data and self.proc.poll() is not None:
                    raise AssertionError(f"the console ended before {pattern!r} showed:\n{self.screen[-3000:]}")
                self.screen += data.decode(errors="replace").replace("\r\n", "\n")

    def command(self, line: str, at: int) -> tuple[str, int]:
        """Type one line at the prompt; (what it printed, where the next prompt ends)."""
        self.type(line + "\n")
        end = self.expect(re.escape(PROMPT), after=at)
        return self.screen[at:end], end

    def close(self) -> None:
        stop_process(self.proc, grace=5)
        os.close(self.master)


def test_the_console_runs_commands_typed_at_its_prompt_completes_names_and_keeps_history(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    home = tmp_path / "home"
    home.mkdir()
    env = {**python_env(), "HOME": str(home), "FEDADMIN_KIT": str(ws / "admin"), "TERM": "xterm"}
    with server_process(ws / "server"):
        term = Terminal([sys.executable, "-m", "fedadmin.cli", "--json", "console"], env)
        try:
            at = term.expect(re.escape(PROMPT))
            out, at = term.command("set-run 3", at)
            assert re.search(r'"ok":\s*true', out), out
            out, at = term.command("status server", at)
            assert re.search(r'"run_number":\s*3', out), out
            # Tab completes a command name: "set-ti<TAB>" becomes "set-timeout ".
            out, at = term.command("set-ti\t 12", at)
            assert re.search(r'"timeout":\s*12', out), out
            out, at = term.command("console", at)
            assert "already in the console" in out
            out, at = term.command("frobnicate", at)
            assert "frobnicate" in out and "Traceback" not in out
            out, at = term.command("  # a comment, and an empty line next", at)
            out, at = term.command("", at)
            term.type("exit\n")
            assert term.proc.wait(30) == 0
        finally:
            term.close()
    history = (home / ".fedadmin_history").read_text()
    assert "set-run 3" in history and "status server" in history
