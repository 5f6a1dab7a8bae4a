"""The site's request processors: one small class per admin topic, replying per docs/admin-protocol.md."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fedclient.admin import RequestProcessor
from fedclient.admin_interface import RequestRefused
from fedcommon.admin_defs import Message, error_reply, ok_reply


def _answer(req: Message, action: Callable[[], dict[str, Any]]) -> Message:
    """The ok reply with action()'s data as JSON, or the error reply with a refusal's text."""
    try:
        data = action()
    except RequestRefused as e:
        return error_reply(str(e), req)
    return ok_reply(json.dumps(data), req)


def _body_text(req: Message) -> str:
    return req.body.decode("utf-8", errors="replace") if isinstance(req.body, bytes) else req.body


class ClientStatusProcessor(RequestProcessor):
    """check_status: the training status, run number and latest progress."""

    def get_topics(self) -> list[str]:
        return ["check_status"]

    def process(self, req: Message, app_ctx) -> Message:
        return _answer(req, app_ctx.client_status)


class DeployProcessor(RequestProcessor):
    """deploy: fetch the uploaded MMAR zip named in the headers and extract it safely into run_N/mmar."""

    def get_topics(self) -> list[str]:
        return ["deploy"]

    def process(self, req: Message, app_ctx) -> Message:
        return _answer(req, lambda: app_ctx.deploy_mmar(req.headers))


class StartClientProcessor(RequestProcessor):
    """start: train the run in the run_number header in a worker process."""

    def get_topics(self) -> list[str]:
        return ["start"]

    def process(self, req: Message, app_ctx) -> Message:
        return _answer(req, lambda: app_ctx.start_client(req.get_header("run_number")))


class StartClientMGpuProcessor(RequestProcessor):
    """start_mgpu: train the run with one rank per GPU (headers run_number, gpu_number)."""

    def get_topics(self) -> list[str]:
        return ["start_mgpu"]

    def process(self, req: Message, app_ctx) -> Message:
        return _answer(req, lambda: app_ctx.start_mgpu_client(req.get_header("run_number"),
                                                              req.get_header("gpu_number")))


class AbortClientProcessor(RequestProcessor):
    """abort: stop the training; no process of it is left."""

    def get_topics(self) -> list[str]:
        return ["abort"]

    def process(self, req: Message, app_ctx) -> Message:
        return _answer(req, app_ctx.abort_client)


class DeleteRunNumberProcessor(RequestProcessor):
    """delete_run_number: delete run_N (refused while it trains)."""

    def get_topics(self) -> list[str]:
        return ["delete_run_number"]

    def process(self, req: Message, app_ctx) -> Message:
        return _answer(req, lambda: app_ctx.delete_run_number(req.get_header("run_number")))


class ShellCommandProcessor(RequestProcessor):
    """shell: one read-only command (ls, cat, head, tail, grep, pwd) inside the site's workspace."""

    def get_topics(self) -> list[str]:
        return ["shell"]

    def process(self, req: Message, app_ctx) -> Message:
        from fedcommon.safe_shell import ShellRefused, run_shell

        try:
            argv = json.loads(_body_text(req) or "{}").get("argv")
        except (ValueError, AttributeError):
            return error_reply('shell: the request body must be JSON {"argv": [...]}', req)
        try:
            result = run_shell(argv, app_ctx.workspace)
        except ShellRefused as e:
            return error_reply(str(e), req)
        return ok_reply(json.dumps({"stdout": result.stdout, "truncated": result.truncated,
                                    "exit_code": result.exit_code}), req)


class SysInfoProcessor(RequestProcessor):
    """sys_info: host, Python, torch, CPU, memory, disk, GPUs and the training status."""

    def get_topics(self) -> list[str]:
        return ["sys_info"]

    def process(self, req: Message, app_ctx) -> Message:
        from fedcommon.sysinfo import collect_sysinfo

        return ok_reply(json.dumps(collect_sysinfo(app_ctx.training_status(), app_ctx.workspace)), req)


class RestartClientProcessor(RequestProcessor):
    """restart: the agent aborts training and starts itself again after replying."""

    def get_topics(self) -> list[str]:
        return ["restart"]

    def process(self, req: Message, app_ctx) -> Message:
        return _answer(req, app_ctx.restart_client)


class ShutdownClientProcessor(RequestProcessor):
    """shutdown: the agent aborts training and exits after replying."""

    def get_topics(self) -> list[str]:
        return ["shutdown"]

    def process(self, req: Message, app_ctx) -> Message:
        return _answer(req, app_ctx.shutdown_client)


class ValidateRequestProcessor(RequestProcessor):
    """validate: cross-site validation of a run already trained (`fedadmin validate --run`)."""

    def get_topics(self) -> list[str]:
        return ["validate"]

    def process(self, req: Message, app_ctx) -> Message:
        return _answer(req, lambda: app_ctx.do_validate(req))


class LogsProcessor(RequestProcessor):
    """logs: the last lines of the agent's log, or of a run's worker log, or what was appended since a cursor.

    Only the site picks the file: the request names a run number at most, never a path.
    """

    def get_topics(self) -> list[str]:
        return ["logs"]

    def process(self, req: Message, app_ctx) -> Message:
        from fedcommon.logs import PROCESS_LOG, WORKER_LOG, LogQuery, LogRequestError, read_log

        try:
            args = json.loads(_body_text(req) or "{}")
            if not isinstance(args, dict):
                raise LogRequestError("the logs request body must be a JSON object")
            query = LogQuery.from_args(args)
            number = args.get("run_number")
            if number is None:
                name = PROCESS_LOG
            elif isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise LogRequestError(f"run_number must be a whole number >= 1, got {number!r}")
            else:
                name = f"run_{number}/logs/{WORKER_LOG}"
                if not (app_ctx.workspace / f"run_{number}").is_dir():
                    raise LogRequestError(f"this site has no run {number}")
        except ValueError as e:  # LogRequestError, or a body that is not JSON
            return error_reply(str(e), req)
        data = read_log(app_ctx.workspace / name, query)
        return ok_reply(json.dumps({"file": name, **data}), req)


def seed_processors() -> list[RequestProcessor]:
    """One instance of each of the seed's eleven processors."""
    return [
        ClientStatusProcessor(), DeployProcessor(), StartClientProcessor(), StartClientMGpuProcessor(),
        AbortClientProcessor(), DeleteRunNumberProcessor(), ShellCommandProcessor(), SysInfoProcessor(),
        RestartClientProcessor(), ShutdownClientProcessor(), ValidateRequestProcessor(),
    ]


def site_processors() -> list[RequestProcessor]:
    """What an agent serves: the seed's eleven, and logs."""
    return [*seed_processors(), LogsProcessor()]
