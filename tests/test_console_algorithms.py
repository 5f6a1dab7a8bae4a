"""The console names a run's algorithms: `status`'s server line, `metrics` as a table and as JSON."""

from __future__ import annotations

from rich.console import Console

from fedadmin.commands.metrics import MetricsResult
from fedadmin.render import server_line
from fedcommon.outcome import CommandOutcome, TargetReply
from fedserver.run_record import metrics_answer


def _render(renderable) -> str:
    console = Console(width=100, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text()


SUMMARY = {
    "aggregator": {"name": "FedAdam", "args": {"eta": 0.1}},
    "site_algorithms": ["FedProx(mu=0.01)"],
    "rounds": [{"round": 0, "metrics": {"site-1": {"accuracy": 0.5}}}],
    "final_metrics": {},
}


def test_status_names_the_aggregator_and_the_site_algorithms():
    data = {
        "run_number": 1,
        "run_status": "training",
        "current_round": 2,
        "start_round": 0,
        "num_rounds": 3,
        "aggregator": "FedAvg",
        "site_algorithms": ["SCAFFOLD"],
    }
    assert str(server_line(TargetReply("server", True, data))).endswith(", FedAvg + SCAFFOLD")


def test_metrics_name_the_algorithms_recorded_in_summary_json():
    data = metrics_answer(1, "completed", SUMMARY)
    assert data["aggregator"] == "FedAdam" and data["site_algorithms"] == ["FedProx(mu=0.01)"]
    result = MetricsResult(CommandOutcome("metrics", True, [TargetReply("server", True, data)]))
    assert result.to_json()["aggregator"] == "FedAdam"
    assert "algorithms: FedAdam + FedProx(mu=0.01)" in _render(result)


def test_a_run_recorded_before_the_algorithms_were_named_was_fedavg():
    data = metrics_answer(1, "completed", {"rounds": [], "final_metrics": {}})
    assert data["aggregator"] == "FedAvg" and data["site_algorithms"] == []
