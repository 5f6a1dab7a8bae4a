"""`fedadmin validate`, console side: the matrix view, the metric it shows, its JSON, what it sends, usage errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

import fedadmin.commands.validate as validate_module
from fedadmin.cli import main
from fedadmin.commands.validate import ValidationResult, primary_metric
from fedcommon.outcome import CommandOutcome, TargetReply

MATRIX = {
    "run_number": 1,
    "run_status": "completed",
    "validating_sites": ["hospital-a", "hospital-b"],
    "owners": ["hospital-a", "server"],
    "declined": ["hospital-b"],
    "pending_owners": [],
    "results": {
        "hospital-a": {"hospital-a": {"accuracy": 0.95, "loss": 0.21}, "server": {"accuracy": 0.96, "loss": 0.18}},
        "hospital-b": {"server": {"accuracy": 0.91, "loss": 0.25}},
    },
}
CELL = {"site": "hospital-a", "owner": "server", "metrics": {"accuracy": 0.96, "loss": 0.18}}


def server_ok(data: dict[str, Any]) -> CommandOutcome:
    return CommandOutcome("validate", True, [TargetReply("server", True, data)])


def server_failed(error: str) -> CommandOutcome:
    return CommandOutcome("validate", False, [TargetReply("server", False, error=error)])


def rendered(result: Any) -> str:
    console = Console(record=True, width=120)
    console.print(result)
    return console.export_text()


def table_rows(text: str) -> dict[str, list[str]]:
    """The body rows of a rendered table: first cell -> the other cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[0]] = cells[1:]
    return rows


class FakeServer:
    """Stands in for run_remote: records (command, targets, args) and answers with a canned outcome."""

    def __init__(self, outcome: CommandOutcome) -> None:
        self.outcome = outcome
        self.calls: list[tuple[str, list[str], dict[str, Any]]] = []

    def __call__(self, options, command, targets, args=None) -> CommandOutcome:
        self.calls.append((command, list(targets), dict(args or {})))
        return self.outcome


@pytest.fixture
def server(monkeypatch) -> FakeServer:
    fake = FakeServer(server_ok(MATRIX))
    monkeypatch.setattr(validate_module, "run_remote", fake)
    return fake


def fedadmin(*args: str):
    return CliRunner().invoke(main, ["--kit", "/nonexistent-kit", *args])


# ---- the matrix view -------------------------------------------------------------------------------


def test_matrix_shows_accuracy_per_site_and_owner():
    text = rendered(ValidationResult(server_ok(MATRIX)))
    assert "Cross-site validation, run 1 (accuracy)" in text
    header = next(line for line in text.splitlines() if line.startswith("┃"))
    assert [c.strip() for c in header.strip("┃").split("┃")] == ["site \\ owner", "hospital-a", "server"]
    assert table_rows(text) == {"hospital-a": ["0.9500", "0.9600"], "hospital-b": ["—", "0.9100"]}


def test_matrix_names_declined_sites_and_pending_owners():
    text = rendered(ValidationResult(server_ok({**MATRIX, "pending_owners": ["hospital-c"]})))
    assert "did not share their model: hospital-b" in text
    assert "models not arrived yet: hospital-c" in text


def test_matrix_without_declined_or_pending_sites_does_not_mention_them():
    text = rendered(ValidationResult(server_ok({**MATRIX, "declined": []})))
    assert "did not share" not in text
    assert "not arrived" not in text


def test_naming_a_site_shows_only_its_row():
    text = rendered(ValidationResult(server_ok(MATRIX), site="hospital-b"))
    assert table_rows(text) == {"hospital-b": ["—", "0.9100"]}


def test_one_cell_shows_all_its_metrics():
    text = rendered(ValidationResult(server_ok({**MATRIX, "cell": CELL}), site="hospital-a"))
    assert "hospital-a on server's model" in text
    assert table_rows(text) == {"accuracy": ["0.9600"], "loss": ["0.1800"]}


def test_a_cell_without_the_shown_metric_shows_its_own_metrics_instead_of_a_dash():
    data = {**MATRIX, "results": {"hospital-a": {"server": {"accuracy": 0.9}}, "hospital-b": {"server": {"dice": 0.7}}}}
    rows = table_rows(rendered(ValidationResult(server_ok(data))))
    assert rows["hospital-b"] == ["—", "dice=0.7000"]


def test_a_failed_reply_shows_the_servers_error():
    result = ValidationResult(server_failed("run 7 does not exist"))
    assert not result.ok
    assert "validate: run 7 does not exist" in rendered(result)


def test_a_refused_command_is_a_failure_with_the_refusal():
    result = ValidationResult(CommandOutcome("validate", False, [], error="admin may not view"))
    assert (result.ok, result.error) == (False, "admin may not view")


# ---- the metric a cell shows -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "cells, metric",
    [
        ([{"loss": 0.2, "accuracy": 0.9}], "accuracy"),
        ([{"dice": 0.8, "val_loss": 0.3}], "val_loss"),
        ([{"dice": 0.8}, {"auc": 0.7, "loss": 0.2}], "loss"),
        ([{"dice": 0.8, "auc": 0.7}], "dice"),
        ([{"dice": 0.8}, {"accuracy": 0.9}], "accuracy"),
        ([], None),
    ],
)
def test_primary_metric_prefers_accuracy_then_a_loss_then_the_first(cells, metric):
    results = {"a": {f"owner-{i}": m for i, m in enumerate(cells)}}
    assert primary_metric(results) == metric


def test_title_names_the_loss_when_no_cell_has_accuracy():
    data = {**MATRIX, "results": {"hospital-a": {"server": {"loss": 0.18}}}}
    text = rendered(ValidationResult(server_ok(data)))
    assert "Cross-site validation, run 1 (loss)" in text
    assert table_rows(text)["hospital-a"] == ["—", "0.1800"]


# ---- JSON -------------------------------------------------------------------------------------------


def test_json_has_the_servers_matrix_at_top_level(server):
    result = fedadmin("--json", "validate")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"command": "validate", "ok": True, **MATRIX}


def test_json_of_one_cell_has_the_cell_and_only_that_sites_row(server):
    server.outcome = server_ok({**MATRIX, "cell": CELL})
    report = json.loads(fedadmin("--json", "validate", "hospital-a", "server").stdout)
    assert report["cell"] == CELL
    assert report["validating_sites"] == ["hospital-a"]
    assert report["results"] == {"hospital-a": MATRIX["results"]["hospital-a"]}
    assert report["owners"] == MATRIX["owners"]


def test_a_failed_reply_exits_1_with_the_error_in_json(server):
    server.outcome = server_failed("run 7 does not exist")
    result = fedadmin("--json", "validate", "-r", "7")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert (report["command"], report["ok"], report["error"]) == ("validate", False, "run 7 does not exist")


def test_a_failed_reply_exits_1_with_the_error_in_the_table(server):
    server.outcome = server_failed("hospital-a has not validated server's model yet")
    result = fedadmin("validate", "hospital-a", "server")
    assert result.exit_code == 1
    assert "hospital-a has not validated server's model yet" in result.stdout


# ---- what is sent -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, call",
    [
        ([], ("validate", ["server"], {})),
        (["-r", "2"], ("validate", ["server"], {"run_number": 2})),
        (["hospital-a"], ("validate", ["server"], {"site": "hospital-a"})),
        (
            ["--run", "3", "hospital-a", "server"],
            ("validate", ["server"], {"run_number": 3, "site": "hospital-a", "owner": "server"}),
        ),
        (["--start"], ("run-validation", ["client"], {})),
        (
            ["--start", "-r", "4", "hospital-a", "hospital-b", "hospital-c"],
            ("run-validation", ["hospital-a", "hospital-b", "hospital-c"], {"run_number": 4}),
        ),
    ],
)
def test_validate_sends_the_command_targets_and_arguments(server, argv, call):
    server.outcome = CommandOutcome(call[0], True, [TargetReply(t, True, {"run_number": 1}) for t in call[1]])
    result = fedadmin("--json", "validate", *argv)
    assert result.exit_code == 0, result.output
    assert server.calls == [call]


def test_run_prints_each_sites_reply_and_fails_if_one_failed(server):
    server.outcome = CommandOutcome(
        "run-validation",
        False,
        [
            TargetReply("hospital-a", True, {"run_number": 1, "pid": 1234}),
            TargetReply("hospital-b", False, error="run 1 is not deployed"),
        ],
    )
    result = fedadmin("--json", "validate", "--start")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["replies"] == [
        {"target": "hospital-a", "ok": True, "run_number": 1, "pid": 1234},
        {"target": "hospital-b", "ok": False, "error": "run 1 is not deployed"},
    ]


# ---- usage errors (exit 2, before connecting) ------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["a", "b", "c"], "at most SITE and OWNER"),
        (["-r", "0"], "0 is not in the range"),
        (["--run", "-1"], "-1 is not in the range"),
        (["no/such/site"], "is not a site name"),
        (["--start", "site-1", "bad/target"], "is not a target"),
    ],
)
def test_usage_errors_exit_2_without_contacting_the_server(server, argv, message):
    result = fedadmin("validate", *argv)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert server.calls == []


def test_usage_error_under_json_prints_one_json_failure(server):
    result = fedadmin("--json", "validate", "a", "b", "c")
    assert result.exit_code == 2
    report = json.loads(result.stdout.strip().splitlines()[0])
    assert (report["command"], report["ok"]) == ("validate", False)
    assert "at most SITE and OWNER" in report["error"]


def test_start_accepts_more_than_two_targets_and_goes_on_to_connect(tmp_path):
    result = CliRunner().invoke(main, ["--kit", str(tmp_path), "validate", "--start", "site-1", "site-2", "site-3"])
    assert result.exit_code == 3, result.output  # the folder is no kit: a connection failure, not usage
