"""Remote text on the operator's terminal: every string a reply carries is shown escaped, its markup literal.

Hardening issue 18 item 5: metric names and shell output from a site carried OSC 0 (title), OSC 52 (clipboard
write) and CSI 2J (clear screen) into `fedadmin status`, `validate` and `shell cat` on a real terminal; only
`logs` escaped them.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
from typing import Any

import grpc
import pytest
from conftest import run_fedadmin
from test_console_remote import fake, reply, ws  # noqa: F401  (fixtures)

from fedadmin import render
from fedadmin.commands.logs import LogsResult
from fedadmin.commands.metrics import MetricsResult
from fedadmin.commands.shell import ShellResult
from fedadmin.commands.status import StatusResult
from fedadmin.commands.sysinfo import SysinfoResult
from fedadmin.commands.validate import ValidationResult
from fedadmin.commands.wait import WaitResult
from fedadmin.replies import RepliesResult
from fedcommon.outcome import CommandOutcome, TargetReply
from fedcommon.wire import admin_pb2

# What a hostile site sends: set the terminal's title, write the clipboard, clear the screen, and Rich markup.
PAYLOAD = "\x1b]0;owned\x07\x1b]52;c;cm0gLXJmIH4K\x07\x1b[2J[bold red]alarm[/bold red]:smile:"
SEQUENCES = ("\x1b]0;", "\x1b]52;", "\x1b[2J")
LITERAL = "[bold red]alarm[/bold red]:smile:"


def _server(command: str, data: dict[str, Any]) -> CommandOutcome:
    return CommandOutcome(command, True, [TargetReply("server", True, data)])


def _results() -> dict[str, Any]:
    metrics = {PAYLOAD: 0.5}
    status = CommandOutcome(
        "status",
        False,
        [
            TargetReply("server", True, {"run_number": 1, "run_status": PAYLOAD, "registered_sites": [PAYLOAD]}),
            TargetReply(
                "site-1",
                True,
                {
                    "status": "training started",
                    "status_code": 2,
                    "run_number": 1,
                    "progress": {"round": 1, "epoch": 2, "loss": 0.5, "metrics": metrics},
                },
            ),
            TargetReply("site-2", False, error=PAYLOAD),
        ],
        error=PAYLOAD,
    )
    matrix = {
        "run_number": 1,
        "run_status": "completed",
        "validating_sites": ["site-1"],
        "owners": [PAYLOAD],
        "results": {"site-1": {PAYLOAD: metrics}},
        "declined": [PAYLOAD],
    }
    rounds = {
        "run_number": 1,
        "run_status": "training",
        "rounds": [{"round": r, "sites": {"site-1": metrics}, "mean": metrics} for r in (0, 1)],
    }
    logs = _server("logs", {"file": PAYLOAD, "lines": [f"2026-12-06 01:00:00,000 ERROR x: {PAYLOAD}"]})
    return {
        "status": StatusResult(status),
        "shell": ShellResult(
            CommandOutcome("shell", True, [TargetReply("site-1", True, {"exit_code": 0, "stdout": PAYLOAD})])
        ),
        "sysinfo": SysinfoResult(
            CommandOutcome("sysinfo", True, [TargetReply("site-1", True, {"hostname": PAYLOAD, "gpus": []})])
        ),
        "replies": RepliesResult(CommandOutcome("deploy", True, [TargetReply("site-1", True, {PAYLOAD: PAYLOAD})])),
        "validate": ValidationResult(_server("validate", matrix)),
        "validate cell": ValidationResult(
            _server("validate", {"run_number": 1, "cell": {"site": "site-1", "owner": PAYLOAD, "metrics": metrics}})
        ),
        "metrics": MetricsResult(_server("metrics", rounds)),
        "logs": LogsResult(logs, "server", None),
        "wait": WaitResult(status, False, f"site-2: {PAYLOAD} in run 1"),
    }


@pytest.mark.parametrize("name", list(_results()))
def test_every_result_shows_remote_text_escaped_and_its_markup_literally(name):
    """Hardening issue 18 item 5: the console renders no control character a reply carries, and reads no markup."""
    out = io.StringIO()
    # Colour off: any ESC in the output can only come from the payload.
    render.show(_results()[name], file=out, force_terminal=True, color_system=None, width=400)
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text, repr(text)
    assert "\\x1b]52;c;cm0gLXJmIH4K\\x07" in text and LITERAL in text, text


def test_shown_escapes_keys_and_values_and_leaves_the_result_json_exact():
    """Hardening issue 18 item 5: escaping is for the terminal only; --json carries the site's text exactly."""
    result = _results()["status"]
    shown = render.shown(result)
    site = shown.outcome.reply("site-1").data["progress"]["metrics"]
    assert list(site) == [PAYLOAD.replace("\x1b", "\\x1b").replace("\x07", "\\x07")]
    assert render.shown(shown) == shown, "escaping twice changes nothing"
    assert result.outcome.error == PAYLOAD, "the result itself (what --json prints) is left as it came"
    assert list(result.to_json()["replies"][1]["progress"]["metrics"]) == [PAYLOAD]


# ---- the real console against a server whose replies carry the payload -------------------------


def _hostile(request: admin_pb2.CommandRequest, context) -> admin_pb2.CommandReply:
    metrics = {PAYLOAD: 0.5}
    data = {
        "status": lambda t: (
            {"run_number": 1, "run_status": "training"}
            if t == "server"
            else {
                "status": "training started",
                "status_code": 2,
                "run_number": 1,
                "progress": {"round": 1, "epoch": 1, "loss": 0.5, "metrics": metrics},
            }
        ),
        "shell": lambda t: {"exit_code": 0, "stdout": PAYLOAD},
        "validate": lambda t: {
            "run_number": 1,
            "run_status": "completed",
            "validating_sites": ["site-1"],
            "owners": ["site-1"],
            "results": {"site-1": {"site-1": metrics}},
        },
        "metrics": lambda t: {
            "run_number": 1,
            "run_status": "training",
            "rounds": [{"round": 0, "sites": {"site-1": metrics}, "mean": metrics}],
        },
    }[request.command]
    return reply(request, data, {"site-2": PAYLOAD})


def _on_a_terminal(workspace, *args: str) -> subprocess.CompletedProcess[str]:
    """fedadmin with Rich forced to a colour terminal, as an operator's xterm would run it."""
    terminal = {"TERM": "xterm-256color", "FORCE_COLOR": "1", "COLUMNS": "250", "NO_COLOR": None}
    return run_fedadmin("--kit", str(workspace / "admin"), *args, env=terminal, timeout=60)


@pytest.mark.parametrize(
    "argv",
    [
        ("status",),
        ("shell", "site-1", "cat", "notes.txt"),
        ("validate",),
        ("metrics",),
        ("--json", "status"),
    ],
)
def test_the_console_on_a_terminal_shows_no_escape_sequence_a_reply_carries(ws, fake, argv):  # noqa: F811
    """Hardening issue 18 item 5: status, shell cat, validate and metrics through the real console process."""
    for command in ("status", "shell", "validate", "metrics"):
        fake.handlers[command] = _hostile
    done = _on_a_terminal(ws, *argv)
    both = done.stdout + done.stderr
    if "--json" in argv:  # exact: JSON escapes control characters itself
        replies = {r["target"]: r for r in json.loads(done.stdout)["replies"]}
        assert list(replies["site-1"]["progress"]["metrics"]) == [PAYLOAD] and replies["site-2"]["error"] == PAYLOAD
        return
    assert "\x1b[" in done.stdout, "Rich styles its output on this terminal"
    assert not [s for s in SEQUENCES if s in both], repr(both)
    flat = re.sub(r"\x1b\[[0-9;]*m|\s", "", both)  # without Rich's own styles and the wrapping of a title
    assert "\\x1b]52;" in flat and re.sub(r"\s", "", LITERAL) in flat, both


def test_an_error_from_the_server_is_shown_escaped(ws, fake):  # noqa: F811
    """Hardening issue 18 item 5: a refusal's text goes to stderr escaped as well."""
    fake.handlers["sysinfo"] = lambda req, ctx: ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, PAYLOAD)
    done = _on_a_terminal(ws, "sysinfo")
    assert done.returncode == 1, done.stderr
    assert not [s for s in SEQUENCES if s in done.stdout + done.stderr] and "\\x1b]0;owned" in done.stderr
