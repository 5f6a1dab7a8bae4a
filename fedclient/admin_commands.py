"""The site's request processors: one small class per admin topic, replying per docs/admin-protocol.md."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fedclient.admin import RequestProcessor
from fedclient.admin_interface import RequestRefused, request_args
from fedcommon.admin_defs import Message, error_reply, ok_reply
from fedcommon.commands import Topic


def _answer(req: Message, action: Callable[[], dict[str, Any]]) -> Message:
    """The ok reply with action()'s data as JSON, or the error reply with a refusal's text."""
    try:
        data = action()
    except RequestRefused as e:
        return error_reply(str(e), req)
    return ok_reply(json.dumps(data), req)


class ClientStatusProcessor(RequestProcessor):
    """check_status: the training status, run number and latest progress."""

    def get_topics(self) -> list[str]:
        return [Topic.CHECK_STATUS]

    def process(self, req: Message, app_ctx) -> Message:
        return _answer(req, app_ctx.client_status)


class DeployProcessor(RequestProcessor):
    """deploy: fetch the uploaded MMAR zip named in the headers and extract it safely into run_N/mmar."""

    def get_topics(self) -> list[str]:
        return [Topic.DEPLOY]

    def process(self, req: Message, app_ctx) -> Message:
        return _answer(req, lambda: app_ctx.deploy_mmar(request_args(req, Topic.DEPLOY)))


class StartClientProcessor(RequestProcessor):
    """start: train the run in the run_number header in a worker process."""

    def get_topics(self) -> list[str]:
        return [Topic.START]

    def process(self, req: Message, app_ctx) -> Message:
        return _answer(req, lambda: app_ctx.start_client(request_args(req, Topic.START)["run_number"]))


class StartClientMGpuProcessor(RequestProcessor):
    """start_mgpu: train the run with one rank per GPU (headers run_number, gpu_number)."""

    def get_topics(self) -> list[str]:
        return [Topic.START_MGPU]

    def process(self, req: Message, app_ctx) -> Message:
        def start() -> dict[str, Any]:
            args = request_args(req, Topic.START_MGPU)
            return app_ctx.start_mgpu_client(args["run_number"], args["gpu_number"])

        return _answer(req, start)


class AbortClientProcessor(RequestProcessor):
    """abort: stop the training of the run in the optional run_number header, else of every run; no process of it
    is left."""

    def get_topics(self) -> list[str]:
        return [Topic.ABORT]

    def process(self, req: Message, app_ctx) -> Message:
        def abort() -> dict[str, Any]:
            number = request_args(req, Topic.ABORT).get("run_number")
            return app_ctx.abort_client() if number is None else app_ctx.abort_run(number)

        return _answer(req, abort)


class DeleteRunNumberProcessor(RequestProcessor):
    """delete_run_number: delete run_N (refused while it trains)."""

    def get_topics(self) -> list[str]:
        return [Topic.DELETE_RUN]

    def process(self, req: Message, app_ctx) -> Message:
        return _answer(req, lambda: app_ctx.delete_run_number(request_args(req, Topic.DELETE_RUN)["run_number"]))


class ShellCommandProcessor(RequestProcessor):
    """shell: one read-only command (ls, cat, head, tail, grep, pwd) inside the site's workspace."""

    def get_topics(self) -> list[str]:
        return [Topic.SHELL]

    def process(self, req: Message, app_ctx) -> Message:
        from fedcommon.safe_shell import ShellRefused, run_shell

        def shell() -> dict[str, Any]:
            argv = request_args(req, Topic.SHELL)["argv"]
            try:
                result = run_shell(argv, app_ctx.workspace)
            except ShellRefused as e:
                raise RequestRefused(str(e)) from None
            return {"stdout": result.stdout, "truncated": result.truncated, "exit_code": result.exit_code}

        return _answer(req, shell)


class SysInfoProcessor(RequestProcessor):
    """sys_info: host, Python, torch, CPU, memory, disk, GPUs, the training status and the site's resources."""

    def get_topics(self) -> list[str]:
        return [Topic.SYS_INFO]

    def process(self, req: Message, app_ctx) -> Message:
        from fedcommon.sysinfo import collect_sysinfo

        info = collect_sysinfo(app_ctx.training_status(), app_ctx.workspace, app_ctx.resources_report())
        cluster = app_ctx.client_executor.cluster_info()
        if cluster is not None:
            info["cluster"] = cluster  # where training runs: the site's Slurm partition
        return ok_reply(json.dumps(info), req)


class RestartClientProcessor(RequestProcessor):
    """restart: the agent aborts training and starts itself again after replying."""

    def get_topics(self) -> list[str]:
        return [Topic.RESTART]

    def process(self, req: Message, app_ctx) -> Message:
        return _answer(req, app_ctx.restart_client)


class ShutdownClientProcessor(RequestProcessor):
    """shutdown: the agent aborts training and exits after replying."""

    def get_topics(self) -> list[str]:
        return [Topic.SHUTDOWN]

    def process(self, req: Message, app_ctx) -> Message:
        return _answer(req, app_ctx.shutdown_client)


class ValidateRequestProcessor(RequestProcessor):
    """validate: cross-site validation of a run already trained (`fedadmin validate --start`)."""

    def get_topics(self) -> list[str]:
        return [Topic.VALIDATE]

    def process(self, req: Message, app_ctx) -> Message:
        return _answer(req, lambda: app_ctx.do_validate(req))


class LogsProcessor(RequestProcessor):
    """logs: the last lines of the agent's log, or of a run's worker log, or what was appended since a cursor.

    Only the site picks the file: the request names a run number at most, never a path.
    """

    def get_topics(self) -> list[str]:
        return [Topic.LOGS]

    def process(self, req: Message, app_ctx) -> Message:
        from fedcommon.logs import PROCESS_LOG, LogQuery, read_log
        from fedcommon.run_folder import RunFolder

        def logs() -> dict[str, Any]:
            args = request_args(req, Topic.LOGS)
            number = args.get("run_number")
            if number is None:
                name = PROCESS_LOG
            else:
                folder = RunFolder.of(app_ctx.workspace, number)
                if not folder.root.is_dir():
                    raise RequestRefused(f"this site has no run {number}")
                name = str(folder.worker_log.relative_to(app_ctx.workspace))
            return {"file": name, **read_log(app_ctx.workspace / name, LogQuery.from_args(args))}

        return _answer(req, logs)


def seed_processors() -> list[RequestProcessor]:
    """One instance of each of the seed's eleven processors."""
    return [
        ClientStatusProcessor(),
        DeployProcessor(),
        StartClientProcessor(),
        StartClientMGpuProcessor(),
        AbortClientProcessor(),
        DeleteRunNumberProcessor(),
        ShellCommandProcessor(),
        SysInfoProcessor(),
        RestartClientProcessor(),
        ShutdownClientProcessor(),
        ValidateRequestProcessor(),
    ]


def site_processors() -> list[RequestProcessor]:
    """What an agent serves: the seed's eleven, and logs."""
    return [*seed_processors(), LogsProcessor()]
