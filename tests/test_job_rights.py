"""Who may do what with jobs, on an in-process server of a provisioned project (its hub, as each admin): submitting
takes train (and code for custom code), acting on a job takes being its submitter or operate everywhere, members see
jobs but not others' artefacts; a job's run is not started by hand; an upload that broke off queues nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DIGITS, free_port
from signing import signed_upload
from test_hostile import project_yaml, provision

from fedcommon.admin_defs import AdminIdentity
from fedcommon.kit import load_kit
from fedcommon.safe_zip import zip_folder
from fedserver.blob_store import BlobError
from fedserver.server import FederationServer

ADMINS = {
    "alice@a.org": ("a", "lead"),
    "bob@b.org": ("b", "lead"),
    "mia@a.org": ("a", "member"),
    "root@p.org": ("p", "project_admin"),
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jobs-rights")
    yml = root / "project.yml"
    yml.write_text(project_yaml("p", free_port(), free_port(), {"site-a": "a", "site-b": "b"}, ADMINS))
    provision(yml, root / "out")
    return root / "out"


def make_server(project: Path, folder: Path, policy: dict | None = None) -> FederationServer:
    """The project's server, not serving: commands go straight to its hub (the scheduler does not run)."""
    import shutil

    shutil.copytree(project / "server", folder)
    if policy is not None:
        (folder / "local").mkdir(exist_ok=True)
        (folder / "local" / "authorization.json").write_text(json.dumps(policy))
    return FederationServer(folder, load_kit(folder))


@pytest.fixture
def server(project, tmp_path):
    """Leads may deploy code anywhere here (the digits MMAR brings its trainer as code)."""
    return make_server(project, tmp_path / "server", {"roles": {"lead": {"code": "any"}}})


def who(name: str) -> AdminIdentity:
    org, role = ADMINS[name]
    return AdminIdentity(name, role, org)


def run(server: FederationServer, admin: str, command: str, args: dict | None = None):
    return server.hub.execute(who(admin), command, ["server"], json.dumps(args or {}), 5)


def answer(outcome) -> dict:
    assert outcome.ok, outcome.replies[0].error if outcome.replies else outcome.error
    return dict(outcome.replies[0].data)


def refusal(outcome) -> str:
    assert not outcome.ok
    return outcome.replies[0].error if outcome.replies else outcome.error


def upload(server: FederationServer, project: Path, admin: str, archive: Path) -> str:
    data = archive.read_bytes()
    return server.blobs.receive(iter(signed_upload(project / admin, data)), admin).blob_id


@pytest.fixture
def archive(tmp_path) -> Path:
    """The digits MMAR (its trainer is custom code)."""
    return zip_folder(DIGITS, tmp_path / "digits.zip")


def submitted(server, project, archive, admin="alice@a.org") -> int:
    blob = upload(server, project, admin, archive)
    return answer(run(server, admin, "submit", {"blob_id": blob, "sites": ["site-a"], "name": "lr-0.01"}))["job_id"]


def test_members_see_jobs_but_not_other_submitters_artefacts(server, project, archive):
    job = submitted(server, project, archive)
    listed = answer(run(server, "mia@a.org", "jobs"))["jobs"]
    assert [(j["job_id"], j["submitter"], j["state"]) for j in listed] == [(job, "alice@a.org", "SUBMITTED")]
    assert answer(run(server, "mia@a.org", "job-show", {"job_id": job}))["name"] == "lr-0.01"
    refused = refusal(run(server, "mia@a.org", "job-download", {"job_id": job}))
    assert "belong to 'alice@a.org'" in refused and "sees the job but not its artefacts" in refused
    # Its submitter is told why there is nothing yet, not refused.
    assert "has not run yet" in refusal(run(server, "alice@a.org", "job-download", {"job_id": job}))


def test_only_its_submitter_or_an_operator_everywhere_may_abort_clone_or_delete_a_job(server, project, archive):
    job = submitted(server, project, archive)
    for command in ("job-abort", "job-clone", "job-delete"):
        refused = refusal(run(server, "bob@b.org", command, {"job_id": job}))
        assert f"job {job} was submitted by 'alice@a.org'" in refused and "rule lead.operate = none" in refused
    assert "may not run 'job-abort'" in refusal(run(server, "mia@a.org", "job-abort", {"job_id": job}))

    clone = answer(run(server, "root@p.org", "job-clone", {"job_id": job}))
    assert clone["clone_of"] == job and clone["submitter"] == "root@p.org" and clone["job_id"] != job
    aborted = answer(run(server, "alice@a.org", "job-abort", {"job_id": job}))
    assert (aborted["state"], aborted["reason"]) == ("ABORTED", "aborted by alice@a.org")
    assert "already ended (ABORTED)" in refusal(run(server, "alice@a.org", "job-abort", {"job_id": job}))
    assert answer(run(server, "alice@a.org", "job-delete", {"job_id": job}))["deleted"] is True
    assert "no job" in refusal(run(server, "alice@a.org", "job-show", {"job_id": job}))


def test_a_queued_job_is_deleted_without_starting(server, project, archive):
    job = submitted(server, project, archive)
    assert answer(run(server, "alice@a.org", "job-delete", {"job_id": job})) == {
        "job_id": job,
        "deleted": True,
        "sites": {},
    }
    assert answer(run(server, "alice@a.org", "jobs"))["jobs"] == []
    assert not (server.workspace / "jobs" / str(job)).exists()


def test_a_job_with_custom_code_needs_the_code_right_on_its_sites(project, archive, tmp_path):
    server = make_server(project, tmp_path / "default-policy")
    blob = upload(server, project, "alice@a.org", archive)
    refused = refusal(run(server, "alice@a.org", "submit", {"blob_id": blob, "sites": ["site-a"]}))
    # The default lead.code = own_org: never the server, which every job's archive reaches too.
    assert "may not deploy code to the server" in refused and "custom/trainer.py" in refused
    blob = upload(server, project, "root@p.org", archive)
    assert answer(run(server, "root@p.org", "submit", {"blob_id": blob, "sites": ["site-a"]}))["job_id"] >= 1


def test_a_jobs_run_is_not_deployed_or_started_by_hand(server, project, archive):
    job = submitted(server, project, archive)
    refused = refusal(run(server, "root@p.org", "start", {"run_number": job}))
    assert f"run {job} is job {job}" in refused and "the scheduler deploys and starts it" in refused


def test_an_upload_that_broke_off_queues_no_job(server, project, archive):
    data = archive.read_bytes()
    chunks = signed_upload(project / "alice@a.org", data)
    header, body = chunks[0], chunks[1:]
    cut = [header, *body[:-1]] if len(body) > 1 else [header]
    with pytest.raises(BlobError):
        server.blobs.receive(iter(cut), "alice@a.org")
    refused = refusal(run(server, "alice@a.org", "submit", {"blob_id": header.header.sha256}))
    assert "is not uploaded" in refused
    assert answer(run(server, "alice@a.org", "jobs"))["jobs"] == []


def test_an_archive_that_is_not_an_mmar_is_refused_at_submit(server, project, tmp_path):
    import zipfile

    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("config/config_train.json", "{not json")
    blob = upload(server, project, "alice@a.org", bad)
    refused = refusal(run(server, "alice@a.org", "submit", {"blob_id": blob, "sites": ["site-a"]}))
    assert refused.startswith("submit refused: not a valid MMAR")
    assert answer(run(server, "alice@a.org", "jobs"))["jobs"] == []


@pytest.mark.e2e
def test_a_site_refuses_jobs_from_an_organisation_its_local_policy_names(tmp_path, archive):
    """site-b's own policy refuses deploys by admins of org p: a job of root@p.org fails there, saying so; the
    server and site-a had taken it."""
    import time

    from provisioned import ProvisionedFederation, running

    policy = {"rules": [{"name": "no-jobs-from-p", "deny": ["deploy"], "orgs": ["p"]}]}
    sites = {"site-a": "a", "site-b": "b"}
    with running(tmp_path, "p", sites, ADMINS, "root@p.org", {"site-b": policy}) as out:
        fed = ProvisionedFederation(out)
        blob = fed.upload("root@p.org", archive.read_bytes())
        reply = fed.execute("root@p.org", "submit", ["server"], {"blob_id": blob, "sites": ["site-a", "site-b"]})
        job = json.loads(reply.replies[0].data_json)["job_id"]
        deadline = time.monotonic() + 120
        while True:
            shown = json.loads(fed.execute("root@p.org", "job-show", ["server"], {"job_id": job}).replies[0].data_json)
            if shown["state"] in ("FAILED", "COMPLETED", "ABORTED"):
                break
            assert time.monotonic() < deadline, shown
            time.sleep(0.5)
    assert shown["state"] == "FAILED"
    assert shown["reason"].startswith("deploy refused: site-b: ")
    assert "no-jobs-from-p" in shown["errors"]["site-b"]
    assert "site-a" not in shown["errors"]
