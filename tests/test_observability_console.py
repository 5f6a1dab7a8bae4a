"""The console's side of `metrics` and `logs`: results, JSON, the text chart (the e2e tests run them for real)."""

from __future__ import annotations

import json

from click.testing import CliRunner
from rich.console import Console

from fedadmin import render
from fedadmin.cli import main
from fedadmin.commands.logs import LogsResult
from fedadmin.commands.metrics import MetricsResult
from fedadmin.render import line_chart
from fedcommon.outcome import CommandOutcome, TargetReply


def _metrics_outcome(rounds: int = 3) -> CommandOutcome:
    records = [
        {
            "round": r,
            "sites": {"site-1": {"accuracy": 0.5 + r / 10, "loss": 1.0 - r / 10}, "site-2": {"accuracy": 0.4 + r / 10}},
            "mean": {"accuracy": 0.45 + r / 10, "loss": 1.0 - r / 10},
        }
        for r in range(rounds)
    ]
    data = {
        "run_number": 4,
        "run_status": "completed",
        "rounds": records,
        "final": {"sites": {"site-1": {"accuracy": 0.9}}, "mean": {"accuracy": 0.9}},
    }
    return CommandOutcome("metrics", True, [TargetReply("server", True, data)])


def _render(renderable) -> str:
    console = Console(width=100, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text()


def test_metrics_json_has_one_record_per_round_then_final_with_every_site_and_the_mean():
    out = MetricsResult(_metrics_outcome()).to_json()
    assert out["metric"] == "accuracy" and out["run_number"] == 4
    assert [r["round"] for r in out["records"]] == [0, 1, 2, "final"]
    assert out["records"][1]["sites"]["site-2"]["accuracy"] == 0.5


def test_metrics_table_shows_each_site_the_mean_and_a_chart_of_the_mean():
    text = _render(MetricsResult(_metrics_outcome()))
    assert "site-1" in text and "site-2" in text and "mean accuracy by round" in text
    assert text.count("●") == 3 and "0.65" in text and "final" in text


def test_metrics_of_another_metric_and_of_one_nobody_reported():
    assert "mean loss by round" in _render(MetricsResult(_metrics_outcome(), metric="loss"))
    missing = MetricsResult(_metrics_outcome(), metric="dice")
    assert not missing.ok and missing.to_json()["error"] == "no site reported 'dice' in run 4"


def test_metrics_before_any_round_closed_says_so():
    outcome = CommandOutcome("metrics", True, [TargetReply("server", True, {"run_number": 1, "rounds": []})])
    result = MetricsResult(outcome)
    assert result.ok and "no round has closed yet" in _render(result)


def test_the_chart_thins_long_runs_and_marks_the_extremes():
    chart = str(line_chart([(i, float(i % 7)) for i in range(500)], height=5, width=40)).splitlines()
    assert chart[0].startswith("6 ┤") and chart[4].startswith("0 ┤")
    assert max(len(line) for line in chart[:5]) <= 4 + 2 + 42
    assert chart[-1].strip().startswith("0") and "499" in chart[-1]


def test_logs_result_shows_lines_and_names_the_file_or_the_failure():
    ok = CommandOutcome(
        "logs",
        True,
        [
            TargetReply(
                "site-1",
                True,
                {"file": "log.txt", "lines": ["2026-11-29 10:00:00,000 ERROR x: boom", "plain"], "truncated": True},
            )
        ],
    )
    text = _render(LogsResult(ok, "site-1", "error"))
    assert "site-1: log.txt, last 2 lines at error or above (older lines left out)" in text and "boom" in text
    failed = CommandOutcome("logs", False, [TargetReply("site-9", False, error="site-9 is not connected")])
    result = LogsResult(failed, "site-9", None)
    assert not result.ok and result.to_json() == {"target": "site-9", "error": "site-9 is not connected"}
    missing = CommandOutcome(
        "logs", True, [TargetReply("site-1", True, {"file": "run_2/logs/worker.log", "lines": [], "missing": True})]
    )
    assert not LogsResult(missing, "site-1", None).ok


def test_logs_arguments_that_are_paths_or_groups_are_usage_errors(tmp_path):
    runner = CliRunner()
    for args in (
        ["logs", "client"],
        ["logs", "../site-1"],
        ["logs", "site-1", "run_1/logs/worker.log"],
        ["logs", "site-1", "--run", "x"],
        ["logs", "site-1", "--level", "verbose"],
    ):
        result = runner.invoke(main, ["--json", "--kit", str(tmp_path), *args])
        assert result.exit_code == 2, (args, result.output)
        assert json.loads(result.output.splitlines()[0])["ok"] is False


def test_metrics_png_without_matplotlib_is_a_usage_error_naming_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = CliRunner().invoke(main, ["--kit", str(tmp_path), "metrics", "--png", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "fedlearn[plot]" in result.output


def test_the_status_line_shows_the_last_global_metric_of_a_live_or_finished_run():
    from fedadmin.render import server_line

    live = {
        "run_number": 1,
        "run_status": "training",
        "current_round": 3,
        "start_round": 0,
        "num_rounds": 5,
        "last_global_metrics": {"round": 2, "mean": {"accuracy": 0.8731, "loss": 0.3}},
    }
    assert str(server_line(TargetReply("server", True, live))) == (
        "server: run 1 training, round 3 of rounds 0..4; global model of round 2: mean accuracy 0.8731"
    )
    done = {
        "run_number": 1,
        "run_status": "completed",
        "last_global_metrics": {"round": "final", "mean": {"loss": 0.25}},
    }
    assert str(server_line(TargetReply("server", True, done))).endswith("final global model: mean loss 0.25")


def test_control_characters_in_log_lines_never_reach_the_terminal():
    ok = CommandOutcome(
        "logs",
        True,
        [
            TargetReply(
                "site-1", True, {"file": "log.txt", "lines": ["evil \x1b]52;c;cGF5bG9hZA==\x07 title \x1b[2J bell\x07"]}
            )
        ],
    )
    text = _render(render.shown(LogsResult(ok, "site-1", None)))  # as emit renders every result: escaped once
    assert "\x1b" not in text and "\x07" not in text and "\\x1b]52;c;" in text
