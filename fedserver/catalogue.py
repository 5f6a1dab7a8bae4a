"""The server's side of each admin command: what the server does, and what each site is sent.

Targets, site topic, rights and argument checks are the command's declaration in fedcommon.commands; an entry
here holds only what the server adds to it. Every declared command the server executes has one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedcommon.archive_signature import SignatureError
from fedcommon.commands import COMMANDS, SERVER, ClientStatus, get_status_message
from fedcommon.logs import PROCESS_LOG, LogQuery, read_log
from fedcommon.outcome import TargetReply
from fedcommon.restart_guard import RestartRefused, check_restart
from fedcommon.safe_shell import run_shell
from fedcommon.sysinfo import collect_sysinfo
from fedserver import job_commands
from fedserver.authorization import Need, archive_needs
from fedserver.blob_store import BlobError, BlobStore
from fedserver.errors import AdminError
from fedserver.mailbox import SiteMailbox
from fedserver.registry import ClientRegistry
from fedserver.telemetry import Telemetry

if TYPE_CHECKING:
    from fedserver.cross_site import CrossSiteValidation
    from fedserver.run import FederatedRun
    from fedserver.scheduler import JobScheduler

Args = dict[str, Any]
Gathered = dict[str, TargetReply | None]  # each site's reply, None when it did not answer in time
_EXCEPTION = get_status_message(ClientStatus.TRAINING_EXCEPTION)


class Federation(Protocol):
    """What the commands need of the server (FederationServer is one)."""

    workspace: Path
    blobs: BlobStore
    registry: ClientRegistry
    mailbox: SiteMailbox
    telemetry: Telemetry
    admin_timeout: float
    jobs: JobScheduler

    @property
    def run_number(self) -> int | None: ...
    def set_run_number(self, run_number: int) -> None: ...
    def set_admin_timeout(self, seconds: float) -> None: ...
    def run_report(self) -> dict[str, Any]: ...
    def run_sites(self, run_number: int) -> set[str]: ...
    def run_status(self, run_number: int) -> str: ...
    def run_metrics(self, run_number: int | None = None) -> dict[str, Any]: ...
    def deploy(self, source: Path, run_number: int | None = None) -> Path: ...
    def start_training(self, run_number: int | None = None) -> FederatedRun: ...
    def training_run(self) -> FederatedRun | None: ...
    def training_runs(self) -> list[FederatedRun]: ...
    def run_to_abort(self, run_number: int | None) -> FederatedRun: ...
    def abort_training(self, run_number: int | None = None) -> int: ...
    def delete_run(self, run_number: int) -> Path: ...
    def cross_site(self, run_number: int) -> CrossSiteValidation: ...
    def remove_site(self, name: str) -> None: ...
    def check_shutdown(self, leaving: set[str], connected: set[str] = ...) -> None: ...
    def refuse_finished(self, run_number: int) -> None: ...
    def request_exit(self, restart: bool) -> None: ...


def _no_site_args(fed: Federation, args: Args) -> Args:
    return {}


@dataclass(frozen=True, kw_only=True)
class ServerCommand:
    """The server's side of one declared command.

    act: the server's own action, returning its reply data (raises to refuse). site_args: what each site's
    request carries (checked against the declaration before it leaves); raising refuses every target.
    verify: a check of the arguments only the server can make, before any target is resolved.
    after_sites: the server acts once the sites have answered (act sees their replies).
    touches: what the policy checks the caller's rights on, when not the targets (a site named in the args).
    needs: rights these arguments need besides one of the command's own (code, for a deploy that brings code).
    sites_first: addressed to the server while a run trains, it goes to every connected site as well.
    ends_session: a site that answered ok has stopped training: its training-plane session is over now.
    disconnects: a site that answered ok is no longer connected.
    with_caller: act(fed, args, gathered, caller): the server's action depends on who asks (a job's submitter).
    sending: told the targets (sites, and the server when it is one) just before their requests are queued.
    """

    act: Callable[[Federation, Args, Gathered], dict[str, Any]]
    site_args: Callable[[Federation, Args], Args] = _no_site_args
    verify: Callable[[Federation, Args], None] | None = None
    after_sites: bool = False
    touches: Callable[[Federation, Args], list[str]] | None = None
    needs: Callable[[Federation, Args], list[Need]] | None = None
    sites_first: bool = False
    ends_session: bool = False
    disconnects: bool = False
    sending: Callable[[Federation, Args, list[str]], None] | None = None
    with_caller: bool = False  # act is also given the caller (AdminIdentity): jobs remember their submitter


def _current_run(fed: Federation) -> int:
    number = fed.run_number
    if number is None:
        raise AdminError("no run number set: run `fedadmin set-run N` first")
    return number


def _named_run(fed: Federation, args: Args) -> int:
    """The run a command names (run_number), else the current run."""
    number = args.get("run_number")
    return number if number is not None else _current_run(fed)


def _run_to_launch(fed: Federation, args: Args) -> int:
    """The run a deploy or start acts on; refused when it is a job's run that its scheduler is not starting now
    (a job's run is deployed and started only as the job, by the scheduler)."""
    number = _named_run(fed, args)
    fed.jobs.refuse_by_hand(number)
    return number


def _answered(gathered: Gathered) -> list[str]:
    """The sites that answered ok, sorted."""
    return sorted(site for site, reply in gathered.items() if reply is not None and reply.ok)


# ---- what the server does ---------------------------------------------------------------------------


def _status(fed: Federation, args: Args, gathered: Gathered) -> dict[str, Any]:
    data = fed.run_report()
    registered = sorted(fed.registry.names())
    data["registered_sites"] = registered
    data["connected_sites"] = fed.mailbox.connected_sites()
    data.update(fed.mailbox.site_results())
    number = data["run_number"]
    # A site's training of the current run ended in an exception when that is the latest it reported of that run (a
    # site that trains it again reports progress, which replaces it); its reports of other runs do not count.
    ended = fed.mailbox.ended_in_run(number) if number is not None else {}
    failed = {
        site: str(report.get("error") or report.get("status"))
        for site, report in ended.items()
        if report.get("status") == _EXCEPTION
    }
    data["failed_sites"] = failed
    # Nothing advances a training run whose sites all failed: a failed worker leaves the training plane, so no
    # site is left registered in the run; it stays "training" until an operator aborts it.
    in_run = fed.run_sites(number) if number is not None else set()
    data["stalled"] = data["run_status"] == "training" and bool(failed) and not in_run
    return data


def _set_run(fed: Federation, args: Args, gathered: Gathered) -> dict[str, Any]:
    fed.set_run_number(args["run_number"])
    return {"run_number": args["run_number"]}


def _uploaded(fed: Federation, args: Args) -> None:
    try:
        fed.blobs.get(args["blob_id"])
    except BlobError as e:
        raise AdminError(str(e)) from None


def _deploy_needs(fed: Federation, args: Args) -> list[Need]:
    return archive_needs(fed.blobs.get(args["blob_id"]).path)


def _deploy(fed: Federation, args: Args, gathered: Gathered) -> dict[str, Any]:
    number = _run_to_launch(fed, args)
    blob = fed.blobs.get(args["blob_id"])
    try:
        # Checked again over the file, right before it is extracted: a signer revoked since the upload counts.
        try:
            fed.blobs.verify(blob.blob_id)
        except SignatureError as e:
            raise AdminError(f"deploy refused: {e}") from None
        return {"run_number": number, "path": str(fed.deploy(blob.path, number))}
    finally:
        fed.blobs.taken(SERVER, blob.blob_id)


def _start(fed: Federation, args: Args, gathered: Gathered) -> dict[str, Any]:
    number = _run_to_launch(fed, args)
    fed.start_training(number)
    return {"run_number": number}


def _abort(fed: Federation, args: Args, gathered: Gathered) -> dict[str, Any]:
    number = fed.abort_training(args.get("run_number"))
    return {"run_number": number, "aborted_sites": _answered(gathered)}


def _validate(fed: Federation, args: Args, gathered: Gathered) -> dict[str, Any]:
    number = args.get("run_number") or _current_run(fed)
    data = {
        **fed.cross_site(number).matrix(),
        "run_status": fed.run_status(number),
        "enabled": _cross_site_enabled(fed, number),
    }
    site, owner = args.get("site"), args.get("owner")
    if site is not None and site not in data["validating_sites"]:
        raise AdminError(
            f"{site} did not take part in run {number}; its sites are {', '.join(data['validating_sites']) or 'none'}"
        )
    if owner is not None:
        if owner not in data["owners"]:
            shown = ", ".join(data["owners"]) or "none yet"
            raise AdminError(f"no model of {owner!r} is offered in run {number} (offered: {shown})")
        metrics = data["results"].get(site, {}).get(owner)
        if metrics is None:
            raise AdminError(f"{site} has not validated {owner}'s model of run {number} yet")
        data["cell"] = {"site": site, "owner": owner, "metrics": metrics}
    return data


def _cross_site_enabled(fed: Federation, number: int) -> bool:
    """Whether run N's MMAR turns cross-site validation on (config_fed_client.json `cross_site_validate`)."""
    from fedcommon.mmar import MMARError, load_mmar
    from fedcommon.run_folder import RunFolder

    try:
        return load_mmar(RunFolder.of(fed.workspace, number).mmar).client.cross_site_validate
    except (MMARError, OSError):
        return False


def _sites_only(name: str) -> Callable[[Federation, Args, Gathered], dict[str, Any]]:
    def act(fed: Federation, args: Args, gathered: Gathered) -> dict[str, Any]:
        raise AdminError(f"{name} runs at sites: name sites or `client`, not the server")

    return act


def _sysinfo(fed: Federation, args: Args, gathered: Gathered) -> dict[str, Any]:
    number = fed.run_number
    status = fed.run_status(number) if number is not None else "none"
    return collect_sysinfo(status, fed.workspace)


def _shell(fed: Federation, args: Args, gathered: Gathered) -> dict[str, Any]:
    result = run_shell(args["argv"], fed.workspace)
    return {"stdout": result.stdout, "truncated": result.truncated, "exit_code": result.exit_code}


def _delete_run(fed: Federation, args: Args, gathered: Gathered) -> dict[str, Any]:
    return {"deleted": str(fed.delete_run(args["run_number"]))}


def _restart(fed: Federation, args: Args, gathered: Gathered) -> dict[str, Any]:
    try:
        check_restart(fed.workspace)
    except RestartRefused as e:
        raise AdminError(str(e)) from None
    fed.request_exit(restart=True)
    return {"restarting": True}


def _shutdown(fed: Federation, args: Args, gathered: Gathered) -> dict[str, Any]:
    fed.check_shutdown(set(_answered(gathered)), set(fed.mailbox.connected_sites()))
    fed.request_exit(restart=False)
    return {"shutting_down": True}


def _remove_client(fed: Federation, args: Args, gathered: Gathered) -> dict[str, Any]:
    fed.remove_site(args["site"])
    fed.mailbox.forget(args["site"])
    return {"removed": args["site"]}


def _metrics(fed: Federation, args: Args, gathered: Gathered) -> dict[str, Any]:
    return fed.run_metrics(args.get("run_number"))


def _logs(fed: Federation, args: Args, gathered: Gathered) -> dict[str, Any]:
    if args.get("run_number") is not None:
        raise AdminError(
            f"the server keeps one log ({PROCESS_LOG}), not one per run: drop the run number (a site keeps one per run)"
        )
    return {"file": PROCESS_LOG, **read_log(fed.workspace / PROCESS_LOG, LogQuery.from_args(args))}


def _set_timeout(fed: Federation, args: Args, gathered: Gathered) -> dict[str, Any]:
    fed.set_admin_timeout(args["seconds"])
    return {"timeout": args["seconds"]}


# ---- what the sites are sent ------------------------------------------------------------------------


def _deploy_request(fed: Federation, args: Args) -> Args:
    blob = fed.blobs.get(args["blob_id"])
    number = _run_to_launch(fed, args)
    try:  # no site is sent an archive whose signer the server no longer trusts; each site checks it all again
        fed.blobs.verifier.check_signer(blob.signature)
    except SignatureError as e:
        raise AdminError(f"deploy refused: {e}") from None
    return {
        "run_number": number,
        "blob_id": blob.blob_id,
        "sha256": blob.blob_id,
        "size": blob.size,
        **blob.signature.to_text(),
    }


def _deploy_to(fed: Federation, args: Args, targets: list[str]) -> None:
    fed.blobs.grant(args["blob_id"], targets)  # only the deploy's targets may fetch the blob


def _start_request(fed: Federation, args: Args) -> Args:
    # The server's rule for what may start holds for every target: a run the server ended (completed or aborted)
    # starts nowhere, whether or not the server is among the targets.
    number = _run_to_launch(fed, args)
    fed.refuse_finished(number)
    return {"run_number": number}


def _start_mgpu_request(fed: Federation, args: Args) -> Args:
    return {**_start_request(fed, args), "gpu_number": args["gpu_number"]}


def _run_validation_request(fed: Federation, args: Args) -> Args:
    number = args.get("run_number") or _current_run(fed)
    training = fed.training_run()
    if training is not None:
        # A validating site registers like a training one: it would hold up the training run's rounds.
        raise AdminError(f"run {training.run_number} is training; validate --start waits until it ends")
    fed.cross_site(number)  # refuses a run that does not exist or has not completed
    return {"run_number": number}


def _as_given(fed: Federation, args: Args) -> Args:
    return args


def _abort_request(fed: Federation, args: Args) -> Args:
    number = args.get("run_number")
    if number is None and len(fed.training_runs()) > 1:
        # Sites train several runs too: they are told the one the server aborts (refused when it cannot tell).
        number = fed.run_to_abort(None).run_number
    # Without a run number a site aborts what it trains, as before several runs could train at once.
    return {"run_number": number} if number is not None else {}


CATALOGUE: dict[str, ServerCommand] = {
    "status": ServerCommand(act=_status),
    "set-run": ServerCommand(act=_set_run),
    "deploy": ServerCommand(
        act=_deploy, site_args=_deploy_request, verify=_uploaded, needs=_deploy_needs, sending=_deploy_to
    ),
    "start": ServerCommand(act=_start, site_args=_start_request),
    "start-mgpu": ServerCommand(act=_start, site_args=_start_mgpu_request),
    "abort": ServerCommand(act=_abort, site_args=_abort_request, after_sites=True, sites_first=True, ends_session=True),
    "validate": ServerCommand(act=_validate),
    "run-validation": ServerCommand(act=_sites_only("run-validation"), site_args=_run_validation_request),
    "sysinfo": ServerCommand(act=_sysinfo),
    "shell": ServerCommand(act=_shell, site_args=_as_given),
    "delete-run": ServerCommand(act=_delete_run, site_args=_as_given),
    "restart": ServerCommand(act=_restart, after_sites=True),
    "shutdown": ServerCommand(act=_shutdown, after_sites=True, ends_session=True, disconnects=True),
    "remove-client": ServerCommand(act=_remove_client, touches=lambda fed, args: [args["site"]]),
    "metrics": ServerCommand(act=_metrics),
    "logs": ServerCommand(act=_logs, site_args=_as_given),
    "set-timeout": ServerCommand(act=_set_timeout),
    # Jobs (fedserver/job_commands.py): the server queues and runs them; sites see only the deploy and start.
    "submit": ServerCommand(
        act=job_commands.submit,
        verify=_uploaded,
        needs=_deploy_needs,
        touches=job_commands.submit_touches,
        with_caller=True,
    ),
    "jobs": ServerCommand(act=job_commands.jobs),
    "job-show": ServerCommand(act=job_commands.show),
    "job-abort": ServerCommand(act=job_commands.abort, with_caller=True),
    "job-clone": ServerCommand(act=job_commands.clone, needs=job_commands.clone_needs, with_caller=True),
    "job-delete": ServerCommand(act=job_commands.delete, with_caller=True),
    "job-download": ServerCommand(act=job_commands.download, with_caller=True),
}


def server_side(name: str) -> ServerCommand | None:
    """The server's side of declared command `name`: its catalogue entry; a command the server adds nothing to
    (a site topic and no entry) goes to its sites with its arguments as given; None for no such command."""
    declared = COMMANDS.get(name)
    entry = CATALOGUE.get(name)
    if entry is None and declared is not None and declared.topic is not None:
        return ServerCommand(act=_sites_only(name), site_args=_as_given)
    return entry
