"""The Python session API (fedadmin.session): typed errors against a real server, and a notebook-style POC run end
to end with nothing but the API (the worked example of docs/python-api.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import DIGITS, ROOT, copy_mmar, python_env, server_process

from fedadmin.errors import CommandFailed, CommandTimeout, NotConnected, Refused, UsageError, raise_for
from fedadmin.results import Job, Metrics, Status
from fedadmin.session import Session, poc_prepare, poc_start, poc_stop
from fedcommon.outcome import CommandOutcome, TargetReply


@pytest.fixture
def kits(tmp_path):
    """A POC workspace's kits (server, site-1, admin); nothing running."""
    return poc_prepare(tmp_path / "poc", 1)


@pytest.fixture
def lone_server(kits):
    """The POC's server as a real process, whose policy file forbids the shell to everyone."""
    local = kits.workspace / "server" / "local"
    local.mkdir(exist_ok=True)
    (local / "authorization.json").write_text(json.dumps({"roles": {"project_admin": {"shell": "none"}}}))
    with server_process(kits.workspace / "server"):
        yield kits


def audited_commands(kits) -> list[str]:
    path = kits.workspace / "server" / "audit.log"
    return [json.loads(line)["command"] for line in path.read_text().splitlines()] if path.exists() else []


def test_from_fedadmin_import_session_is_the_session_class():
    from fedadmin import Session as exported

    assert exported is Session


def test_importing_the_session_api_loads_neither_rich_nor_numpy_nor_torch():
    code = "import sys, fedadmin.session; print(sorted(m for m in ('rich', 'numpy', 'torch') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], env=python_env(), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_session_without_a_kit_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDADMIN_KIT", raising=False)
    with pytest.raises(UsageError, match="no admin kit") as raised:
        Session()
    assert raised.value.exit_code == 2
    with pytest.raises(UsageError, match="no such folder"):
        Session(tmp_path / "missing")


def test_the_kit_comes_from_fedadmin_kit(monkeypatch, kits):
    monkeypatch.setenv("FEDADMIN_KIT", str(kits.admin_kit))
    with Session() as session:
        assert session.kit == kits.admin_kit
        assert session.admin == "admin"


def test_bad_arguments_are_usage_errors_and_nothing_reaches_the_server(lone_server):
    with Session(lone_server.admin_kit) as session:
        session.status("server")  # the server answers this admin
        for call, says in (
            (lambda: session.set_run(0), "run_number must be a whole number >= 1"),
            (lambda: session.start_mgpu(65, "all"), "gpu_number must be a whole number from 1 to 64"),
            (lambda: session.start("no such/site"), "is not a target"),
            (lambda: session.shell("all", ["ls"]), "shell runs at one participant"),
            (lambda: session.shell("server", "rm -rf /"), "'rm' is not allowed"),
            (lambda: session.validate(owner="site-1"), "owner needs site"),
            (lambda: session.submit(DIGITS, gpus=-1), "gpus must be a whole number from 0 to 64"),
            (lambda: session.deploy(DIGITS.parent, "all"), "has no config/ folder"),
        ):
            with pytest.raises(UsageError, match=says):
                call()
    assert set(audited_commands(lone_server)) == {"status"}


def test_a_command_the_servers_policy_refuses_raises_refused_quoting_the_rule(lone_server):
    with Session(lone_server.admin_kit) as session, pytest.raises(Refused) as raised:
        session.shell("server", ["pwd"])
    refused = raised.value
    assert "rule project_admin.shell = none" in refused.rule
    assert "authorization.json" in str(refused)
    assert isinstance(refused, CommandFailed) and refused.outcome.command == "shell" and not refused.outcome.ok
    assert refused.exit_code == 1


def test_a_failure_at_the_server_raises_command_failed_with_the_outcome(lone_server):
    with Session(lone_server.admin_kit) as session, pytest.raises(CommandFailed) as raised:
        session.job_show(99)
    assert not isinstance(raised.value, Refused)
    assert "99" in str(raised.value)
    assert isinstance(raised.value.result, Job) and raised.value.outcome.command == "job-show"


@pytest.mark.parametrize(
    "error, policy",
    [
        ("site-1: refused by local/authorization.json rule 'no-shell'", True),
        (
            "site-1: refused: local/authorization.json: cannot be read (every command is refused until it is fixed)",
            True,
        ),
        (
            "job 3 was submitted by 'alice': lead 'bob' may abort only their own jobs (rule lead.operate = own_org)",
            True,
        ),
        ("deploy refused: unsigned archive", False),
        ("training exception: CUDA out of memory", False),
    ],
)
def test_a_sites_policy_refusal_is_refused_and_other_failures_are_command_failed(error, policy):
    outcome = CommandOutcome("shell", False, [TargetReply("server", True), TargetReply("site-1", False, error=error)])
    with pytest.raises(CommandFailed) as raised:
        raise_for(outcome)
    assert isinstance(raised.value, Refused) is policy
    assert error in str(raised.value) and raised.value.outcome is outcome
    if policy:
        assert raised.value.rule == f"site-1: {error}"


def test_wait_gives_up_after_its_timeout_with_the_last_status(lone_server):
    with Session(lone_server.admin_kit) as session, pytest.raises(CommandTimeout) as raised:
        session.wait(timeout=1.5, interval=0.5)
    assert str(raised.value).startswith("gave up after 1.5s: the run is none")
    assert isinstance(raised.value.last, Status) and raised.value.last.run_status == "none"


def test_a_closed_port_is_not_connected_naming_the_port(kits):
    admin_port = json.loads((kits.admin_kit / "startup" / "fed.json").read_text())["server"]["admin_port"]
    assert admin_port == kits.admin_port
    with Session(kits.admin_kit, reply_timeout=2) as session, pytest.raises(NotConnected) as raised:
        session.status()
    assert raised.value.exit_code == 3
    assert f"127.0.0.1:{kits.admin_port}" in str(raised.value) and "cannot connect" in str(raised.value)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_notebook_style_script_runs_a_poc_federation_end_to_end(tmp_path):
    mmar = copy_mmar(tmp_path / "digits", server={"num_rounds": 2})  # the docs' example, two rounds instead of three

    # ---- as in docs/python-api.md --------------------------------------------------------------------
    workspace = tmp_path / "poc"
    kits = poc_prepare(workspace, clients=2)
    try:
        poc_start(workspace)
        with Session(kits.admin_kit) as session:
            status = session.status()
            assert sorted(s.name for s in status.sites) == ["site-1", "site-2"]
            job = session.submit(mmar, name="ci")
            job = session.wait_job(job.job_id, timeout=280)
            assert job.completed, job.data
            # A job ends once its sites have reported their final metrics: the final validation is recorded by now.
            metrics = session.metrics(job.run_number)
            accuracy = metrics.final("accuracy")
            assert accuracy is not None and accuracy > 0.8, metrics.records
            # ---- beyond the docs' example: the records say what they hold -------------------------------
            assert isinstance(status, Status) and isinstance(metrics, Metrics)
            assert metrics.metric == "accuracy" and metrics.run_number == job.job_id
            assert [r for r, _ in metrics.series("accuracy")] == [0, 1, "final"]
            listed = session.jobs().job(job.job_id)
            assert listed is not None and listed.state == "COMPLETED" and listed.sites == ("site-1", "site-2")
            log = session.logs("site-1", run_number=job.run_number, lines=200)
            assert log.lines and not log.missing
            downloaded = session.job_download(job.job_id, tmp_path / "results")
            assert (downloaded.folder / "summary.json").is_file(), downloaded.files
    finally:
        stopped = poc_stop(workspace)
    assert {s.name for s in stopped} >= {"server", "site-1", "site-2"}
