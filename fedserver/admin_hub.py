"""The admin hub: per-site request queues, fan-out of operator commands, reply gathering, server-side commands."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcommon.admin_defs import AdminIdentity, Message, MsgHeader, ReturnCode
from fedcommon.audit import JsonLinesLog
from fedcommon.logs import PROCESS_LOG, LogQuery, LogRequestError, read_log
from fedcommon.restart_guard import RestartRefused, check_restart
from fedcommon.safe_shell import run_shell
from fedcommon.sysinfo import collect_sysinfo
from fedserver.authorization import DEFAULT_POLICY, Policy, Refused
from fedserver.blob_store import BlobError, check_blob_id
from fedserver.cross_site import CrossSiteError

if TYPE_CHECKING:
    from fedserver.server import FederationServer

log = logging.getLogger(__name__)

SERVER = "server"
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 3600.0
CONNECTED_WINDOW_S = 45.0
AUDIT_FILE = "audit.log"
MAX_AUDITED_ARGS = 4096
MAX_AUDITED_TARGETS = 64
RESULT_TOPICS = ("progress", "training_ended")
MAX_GPUS = 64  # ranks on one node


class AdminError(Exception):
    """A refusal of a command or of one target, in words an operator can act on."""


@dataclass(frozen=True)
class TargetResult:
    """One target's answer: its data (ok) or what went wrong (not ok)."""

    target: str
    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class CommandResult:
    """The answer to one command: one TargetResult per target, or a refusal of the whole command."""

    command: str
    ok: bool
    replies: list[TargetResult]
    error: str = ""


@dataclass
class _Agent:
    # One condition per site over the hub's lock: a request for one site wakes that site's long-poll only,
    # not every site's (with a thousand sites, notify_all on a shared condition costs a thousand wake-ups).
    wakeup: threading.Condition
    polls: int = 0  # Retrieve calls in flight
    last_poll: float = -math.inf
    org: str | None = None  # from the site's certificate
    serial: int | None = None  # of the certificate its last Retrieve came with
    queue: deque[Message] = field(default_factory=deque)
    gone: bool = False  # shut out (revoked): a long-poll in flight returns empty


@dataclass
class _Waiter:
    site: str
    message: Message
    done: threading.Event = field(default_factory=threading.Event)
    reply: TargetResult | None = None


class AuditLog:
    """Append-only JSON lines: who ran what on which targets, and whether it worked (DESIGN §10)."""

    def __init__(self, path: Path):
        self._log = JsonLinesLog(path)
        self.path = self._log.path

    def record(self, caller: AdminIdentity, command: str, targets: list[str], ok: bool, args: Any = None,
               error: str = "") -> None:
        """Append one entry; a failure to write is logged, never raised at the operator."""
        entry: dict[str, Any] = {"admin": caller.name, "role": caller.role, "org": caller.org, "command": command[:200],
                                 "targets": [t[:200] for t in targets[:MAX_AUDITED_TARGETS]], "ok": ok}
        if args:
            shown = json.dumps(args)
            # An admin must not be able to fill the server's disk through the audit log.
            entry["args"] = args if len(shown) <= MAX_AUDITED_ARGS else {
                "truncated": shown[:MAX_AUDITED_ARGS], "length": len(shown)}
        if error:
            entry["error"] = error[:MAX_AUDITED_ARGS]
        self._log.append(entry)

    def record_refused_peer(self, peer: str, kind: str, org: str, port: str, method: str, reason: str) -> None:
        """Append a call refused before any command ran (revoked or wrong kind of certificate)."""
        self._log.append({"event": "refused_connection", "peer": peer, "kind": kind, "org": org, "port": port,
                          "method": method, "ok": False, "error": reason})


class AdminHub:
    """Queues requests per site, hands them to the site's Retrieve long-poll, and matches the replies."""

    def __init__(self, server: FederationServer, policy: Policy | None = None):
        self._server = server
        self.policy = policy or Policy(DEFAULT_POLICY)
        self._lock = threading.RLock()
        self._agents: dict[str, _Agent] = {}
        self._waiting: dict[str, _Waiter] = {}
        self._progress: dict[str, dict[str, Any]] = {}
        self._ended: dict[str, dict[str, Any]] = {}
        self._closed = False
        self.audit = AuditLog(server.workspace / AUDIT_FILE)

    # ---- agent plane ----------------------------------------------------------------------------

    def retrieve(self, site: str, wait: float, active: Callable[[], bool] = lambda: True,
                 org: str | None = None, serial: int | None = None) -> list[Message]:
        """Hold until requests for `site` are queued, `wait` seconds pass or the caller goes away.

        `org` is the organisation in the site's certificate, which org-scoped rights are checked against;
        `serial` the certificate's serial, which a revocation is matched against (see revoked_sites).
        """
        deadline = time.monotonic() + wait
        with self._lock:
            agent = self._agent(site)
            agent.polls += 1
            if org is not None:
                agent.org = org
            if serial is not None:
                agent.serial = serial
            try:
                while not self._closed and not agent.gone and active():
                    if agent.queue:
                        out = list(agent.queue)
                        agent.queue.clear()
                        return out
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    agent.wakeup.wait(left)
                return []
            finally:
                agent.polls -= 1
                agent.last_poll = time.monotonic()

    def _agent(self, site: str) -> _Agent:
        """`site`'s record, created on first sight; call with the lock held."""
        agent = self._agents.get(site)
        if agent is None:
            agent = self._agents[site] = _Agent(threading.Condition(self._lock))
        return agent

    def wake(self, site: str) -> None:
        """Let `site`'s long-polls re-check their state (a caller went away)."""
        with self._lock:
            agent = self._agents.get(site)
            if agent is not None:
                agent.wakeup.notify_all()

    def _wake_all(self) -> None:
        for agent in self._agents.values():
            agent.wakeup.notify_all()

    def connected_sites(self) -> list[str]:
        """Sites with a Retrieve in flight or one in the last 45 s."""
        now = time.monotonic()
        with self._lock:
            return sorted(
                name for name, a in self._agents.items() if a.polls > 0 or now - a.last_poll <= CONNECTED_WINDOW_S
            )

    def post_reply(self, site: str, msg: Message) -> str | None:
        """Deliver `site`'s reply to the command waiting for it; returns why it was not taken, or None."""
        ref = msg.get_ref_id() or ""
        with self._lock:
            waiter = self._waiting.get(ref)
            if waiter is None:
                return f"no request {ref!r} is waiting for a reply (it may have timed out)"
            if waiter.site != site:
                log.warning("%s sent a reply to request %s, which was sent to %s", site, ref, waiter.site)
                return f"request {ref} was sent to {waiter.site}, not to {site}"
            del self._waiting[ref]
            # Set under the lock: gather() then sees a reply or none, never half of one.
            waiter.reply = _site_result(site, msg)
            waiter.done.set()
        return None

    def post_result(self, site: str, msg: Message) -> str | None:
        """Keep the latest progress or training_ended report of `site`; returns why it was refused, or None."""
        if msg.topic not in RESULT_TOPICS:
            return f"unknown result topic {msg.topic!r} (expected {' or '.join(RESULT_TOPICS)})"
        try:
            data = json.loads(_text(msg.body) or "{}")
        except ValueError as e:
            return f"{msg.topic} body is not JSON: {e}"
        if not isinstance(data, dict):
            return f"{msg.topic} body must be a JSON object"
        with self._lock:
            (self._progress if msg.topic == "progress" else self._ended)[site] = data
            if msg.topic == "progress":
                self._ended.pop(site, None)  # training again
        if msg.topic == "training_ended":
            log.info("%s: run %s ended: %s (exit code %s) %s", site, data.get("run_number"), data.get("status"),
                     data.get("exit_code"), data.get("error") or "")
        return None

    def site_results(self) -> dict[str, dict[str, Any]]:
        """The latest progress and training_ended report per site."""
        with self._lock:
            return {"site_progress": dict(sorted(self._progress.items())),
                    "training_ended": dict(sorted(self._ended.items()))}

    def forget(self, site: str) -> None:
        """Drop what is kept about `site`'s training (remove-client)."""
        with self._lock:
            self._progress.pop(site, None)
            self._ended.pop(site, None)

    def close(self) -> None:
        """Release every long-poll and every command waiting for replies (server stopping)."""
        with self._lock:
            self._closed = True
            for waiter in self._waiting.values():
                waiter.done.set()
            self._waiting.clear()
            self._wake_all()

    def shut_out(self, site: str, reason: str) -> None:
        """`site` may no longer take requests (its certificate was revoked): it is not connected from now on.

        Requests queued for it are answered at once with `reason` instead of waiting for a reply that cannot come.
        """
        with self._lock:
            self._drop_agent(site)
            for ref, waiter in list(self._waiting.items()):
                if waiter.site == site:
                    del self._waiting[ref]
                    waiter.reply = TargetResult(site, False, error=f"{site} was refused: {reason}")
                    waiter.done.set()

    def _drop_agent(self, site: str) -> None:
        """Forget `site`'s agent and release its long-polls now (a dropped record can no longer be woken);
        call with the lock held."""
        agent = self._agents.pop(site, None)
        if agent is not None:
            agent.gone = True
            agent.queue.clear()
            agent.wakeup.notify_all()

    def not_connected(self, site: str) -> str:
        """Why `site` cannot take a request: never seen, or how long ago its last long-poll ended."""
        with self._lock:
            agent = self._agents.get(site)
            last = None if agent is None or agent.last_poll == -math.inf else time.monotonic() - agent.last_poll
        if last is None:
            return f"{site} is not connected"
        return (f"{site} is not connected: its last long-poll ended {last:.0f}s ago "
                "(the site is reconnecting, or stopped)")

    def revoked_sites(self, revoked: frozenset[int]) -> list[str]:
        """Sites whose last long-poll came with a certificate whose serial is in `revoked`."""
        with self._lock:
            return sorted(name for name, a in self._agents.items() if a.serial is not None and a.serial in revoked)

    def site_orgs(self) -> dict[str, str]:
        """The organisation of each site that has connected, from its certificate."""
        with self._lock:
            return {name: a.org for name, a in self._agents.items() if a.org is not None}

    def send(self, sites: list[str], topic: str, headers: dict[str, Any], body: str) -> list[_Waiter]:
        """Queue one request per site; each gets its own id so a reply names exactly one of them."""
        waiters = []
        with self._lock:
            for site in sites:
                msg = Message(topic, body).set_headers(headers)
                waiter = _Waiter(site, msg)
                self._waiting[msg.id] = waiter
                agent = self._agent(site)
                agent.queue.append(msg)
                agent.wakeup.notify_all()
                waiters.append(waiter)
        return waiters

    def gather(self, waiters: list[_Waiter], deadline: float) -> dict[str, TargetResult | None]:
        """Wait for the replies until `deadline` (monotonic); a site that did not reply maps to None."""
        for waiter in waiters:
            waiter.done.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for waiter in waiters:
                if waiter.done.is_set():
                    continue
                self._waiting.pop(waiter.message.id, None)
                agent = self._agents.get(waiter.site)
                if agent is not None and waiter.message in agent.queue:
                    # Never delivered: dropped, so an abort or shutdown cannot act long after it was reported lost.
                    agent.queue.remove(waiter.message)
        return {w.site: w.reply for w in waiters}

    # ---- admin plane ----------------------------------------------------------------------------

    def execute(self, caller: AdminIdentity, command: str, targets: list[str], args_json: str,
                timeout: float) -> CommandResult:
        """Run one operator command on its targets, if the policy allows it; every command is audited."""
        started = time.monotonic()
        try:
            args = _parse_args(args_json)
        except AdminError as e:
            args, result = args_json, CommandResult(command, False, [], str(e))
        else:
            try:
                result = self._execute(caller, command, list(targets), args, timeout)
            except (AdminError, Refused) as e:
                result = CommandResult(command, False, [], str(e))
            except Exception as e:
                log.exception("command %s failed", command)
                result = CommandResult(command, False, [], f"internal error: {type(e).__name__}: {e}")
        self.audit.record(caller, command, [r.target for r in result.replies] or list(targets), result.ok, args,
                          result.error)
        self._server.telemetry.command(command if command in _COMMANDS else "unknown", result.ok,
                                       time.monotonic() - started)
        # Commands that consoles poll (status --watch, wait, logs --follow) would fill the log: debug level when ok.
        level = logging.DEBUG if result.ok and command in _POLLED else logging.INFO
        log.log(level, "admin %s (%s): %s %s -> %s (%.2fs)", caller.name, caller.role, command,
                ",".join(targets) or "-", "ok" if result.ok else result.error or "failed", time.monotonic() - started)
        return result

    def _execute(self, caller: AdminIdentity, command: str, targets: list[str], args: dict[str, Any],
                 timeout: float) -> CommandResult:
        spec = _COMMANDS.get(command)
        if spec is None:
            raise AdminError(f"unknown command {command[:100]!r}")
        self.policy.precheck(caller, command)
        args = spec.check(self, args)
        wait = self._timeout(timeout)
        names = self._resolve(command, spec.targets, targets)
        # remove-client acts on the server's registry, but what it touches is the named site.
        self.policy.check(caller, command, [args["site"]] if command == "remove-client" else names,
                          self.site_orgs())
        connected = set(self.connected_sites())
        results = {n: TargetResult(n, False, error=self.not_connected(n))
                   for n in names if n != SERVER and n not in connected}
        live = [n for n in names if n != SERVER and n in connected]
        on_server = SERVER in names
        try:
            headers, body = spec.request(self, args)
        except (AdminError, BlobError, CrossSiteError) as e:  # a precondition every target shares, e.g. no run number
            replies = [results.get(n) or TargetResult(n, False, error=str(e)) for n in names]
            return CommandResult(command, False, replies)
        headers = {**headers, MsgHeader.ADMIN: caller.name, MsgHeader.ADMIN_ROLE: caller.role,
                   MsgHeader.ADMIN_ORG: caller.org, MsgHeader.COMMAND: command}
        extra: list[str] = []
        if command == "abort" and on_server and self._server.training_run() is not None:
            extra = sorted(connected - set(live))  # `abort server` aborts every site first
            self.policy.check(caller, command, names + extra, self.site_orgs())
        waiters = self.send(live + extra, spec.topic, headers, body) if spec.topic else []
        deadline = time.monotonic() + wait
        if on_server and not spec.after_sites:
            results[SERVER] = self._on_server(command, spec, args, {})
        gathered = self.gather(waiters, deadline)
        for site in live:
            results[site] = gathered[site] or TargetResult(site, False, error=f"no reply within {wait:g}s")
        if command in ("shutdown", "abort"):
            stopped = [site for site, reply in gathered.items() if reply is not None and reply.ok]
            # Its training was stopped: the session it held is over now, not after heart_beat_timeout.
            for site in stopped:
                self._server.registry.remove(site)
            if command == "shutdown":
                with self._lock:  # a site that agreed to shut down is no longer connected
                    for site in stopped:
                        self._drop_agent(site)
        if on_server and spec.after_sites:
            results[SERVER] = self._on_server(command, spec, args, gathered)
        replies = [results[n] for n in names]
        return CommandResult(command, all(r.ok for r in replies), replies)

    def _timeout(self, requested: float) -> float:
        if requested == 0:
            return self._server.admin_timeout
        if not math.isfinite(requested) or requested < 0:
            raise AdminError(f"timeout must be a number of seconds >= 0, got {requested}")
        return min(requested, MAX_TIMEOUT_S)

    def _resolve(self, command: str, kind: str, targets: list[str]) -> list[str]:
        requested = [t.strip() for t in targets if t.strip()]
        if not requested:
            if kind == "required":
                raise AdminError(f"{command} needs targets: server, client, all or site names")
            if kind == "one":
                raise AdminError(f"{command} needs one target: server or a site name")
            requested = [SERVER] if kind == "server" else ["all"]
        if kind == "server" and requested != [SERVER]:
            raise AdminError(f"{command} applies to the server only, not {', '.join(requested)}")
        if kind == "one" and (len(requested) != 1 or requested[0] in ("client", "all")):
            raise AdminError(f"{command} takes one target, server or a site name; got {', '.join(requested)}")
        connected = self.connected_sites()
        names: list[str] = []
        for target in requested:
            if target == "client":
                names += connected
            elif target == "all":
                names += [SERVER, *connected]
            else:
                names.append(target)
        names = list(dict.fromkeys(names))
        if not names:
            raise AdminError("no site is connected")
        return names

    def _on_server(self, command: str, spec: _Spec, args: dict[str, Any],
                   gathered: dict[str, TargetResult | None]) -> TargetResult:
        from fedserver.server import ServerError  # here: fedserver.server imports this module

        try:
            return TargetResult(SERVER, True, spec.server(self, args, gathered))
        except (AdminError, ServerError, BlobError, CrossSiteError, ValueError, OSError) as e:
            log.warning("server: %s refused: %s", command, e)
            return TargetResult(SERVER, False, error=str(e))
        except Exception as e:
            log.exception("server: %s failed", command)
            return TargetResult(SERVER, False, error=f"internal error: {type(e).__name__}: {e}")

    # ---- the server's side of each command ------------------------------------------------------

    def _run_number(self) -> int:
        number = self._server.run_number
        if number is None:
            raise AdminError("no run number set: run `fedadmin set-run N` first")
        return number

    def _status(self, args: dict, gathered: dict) -> dict[str, Any]:
        data = self._server.run_report()
        data["registered_sites"] = sorted(self._server.registry.names())
        data["connected_sites"] = self.connected_sites()
        data.update(self.site_results())
        return data

    def _set_run(self, args: dict, gathered: dict) -> dict[str, Any]:
        self._server.set_run_number(args["run_number"])
        return {"run_number": args["run_number"]}

    def _deploy(self, args: dict, gathered: dict) -> dict[str, Any]:
        number = self._run_number()
        blob = self._server.blobs.get(args["blob_id"])
        return {"run_number": number, "path": str(self._server.deploy(blob.path, number))}

    def _start(self, args: dict, gathered: dict) -> dict[str, Any]:
        number = self._run_number()
        self._server.start_training(number)
        return {"run_number": number}

    def _abort(self, args: dict, gathered: dict) -> dict[str, Any]:
        number = self._server.abort_training()
        aborted = sorted(site for site, reply in gathered.items() if reply is not None and reply.ok)
        return {"run_number": number, "aborted_sites": aborted}

    def _sysinfo(self, args: dict, gathered: dict) -> dict[str, Any]:
        number = self._server.run_number
        status = self._server.run_status(number) if number is not None else "none"
        return collect_sysinfo(status, self._server.workspace)

    def _shell(self, args: dict, gathered: dict) -> dict[str, Any]:
        result = run_shell(args["argv"], self._server.workspace)
        return {"stdout": result.stdout, "truncated": result.truncated, "exit_code": result.exit_code}

    def _delete_run(self, args: dict, gathered: dict) -> dict[str, Any]:
        return {"deleted": str(self._server.delete_run(args["run_number"]))}

    def _restart(self, args: dict, gathered: dict) -> dict[str, Any]:
        try:
            check_restart(self._server.workspace)
        except RestartRefused as e:
            raise AdminError(str(e)) from None
        self._server.request_exit(restart=True)
        return {"restarting": True}

    def _shutdown(self, args: dict, gathered: dict) -> dict[str, Any]:
        leaving = {site for site, reply in gathered.items() if reply is not None and reply.ok}
        self._server.check_shutdown(leaving, set(self.connected_sites()))
        self._server.request_exit(restart=False)
        return {"shutting_down": True}

    def _remove_client(self, args: dict, gathered: dict) -> dict[str, Any]:
        self._server.remove_site(args["site"])
        self.forget(args["site"])
        return {"removed": args["site"]}

    def _validate(self, args: dict, gathered: dict) -> dict[str, Any]:
        number = args.get("run_number") or self._run_number()
        data = {**self._server.cross_site(number).matrix(), "run_status": self._server.run_status(number)}
        site, owner = args.get("site"), args.get("owner")
        if site is not None and site not in data["validating_sites"]:
            raise AdminError(f"{site} did not take part in run {number}; "
                             f"its sites are {', '.join(data['validating_sites']) or 'none'}")
        if owner is not None:
            if owner not in data["owners"]:
                shown = ", ".join(data["owners"]) or "none yet"
                raise AdminError(f"no model of {owner!r} is offered in run {number} (offered: {shown})")
            metrics = data["results"].get(site, {}).get(owner)
            if metrics is None:
                raise AdminError(f"{site} has not validated {owner}'s model of run {number} yet")
            data["cell"] = {"site": site, "owner": owner, "metrics": metrics}
        return data

    def _metrics(self, args: dict, gathered: dict) -> dict[str, Any]:
        return self._server.run_metrics(args.get("run_number"))

    def _run_validation(self, args: dict, gathered: dict) -> dict[str, Any]:
        raise AdminError("run-validation runs at sites: name sites or `client`, not the server")

    def _logs(self, args: dict, gathered: dict) -> dict[str, Any]:
        if args.get("run_number") is not None:
            raise AdminError(f"the server keeps one log ({PROCESS_LOG}), not one per run: drop the run number "
                             "(a site keeps one per run)")
        return {"file": PROCESS_LOG, **read_log(self._server.workspace / PROCESS_LOG, LogQuery.from_args(args))}

    def _set_timeout(self, args: dict, gathered: dict) -> dict[str, Any]:
        self._server.set_admin_timeout(args["seconds"])
        return {"timeout": args["seconds"]}

    # ---- what the sites are sent ----------------------------------------------------------------

    def _no_request(self, args: dict) -> tuple[dict[str, Any], str]:
        return {}, ""

    def _deploy_request(self, args: dict) -> tuple[dict[str, Any], str]:
        blob = self._server.blobs.get(args["blob_id"])
        number = self._run_number()
        return {"run_number": number, "blob_id": blob.blob_id, "sha256": blob.blob_id, "size": blob.size}, ""

    def _start_request(self, args: dict) -> tuple[dict[str, Any], str]:
        return {"run_number": self._run_number()}, ""

    def _start_mgpu_request(self, args: dict) -> tuple[dict[str, Any], str]:
        return {"run_number": self._run_number(), "gpu_number": args["gpu_number"]}, ""

    def _shell_request(self, args: dict) -> tuple[dict[str, Any], str]:
        return {}, json.dumps({"argv": args["argv"]})

    def _run_validation_request(self, args: dict) -> tuple[dict[str, Any], str]:
        number = args.get("run_number") or self._run_number()
        training = self._server.training_run()
        if training is not None:
            # A validating site registers like a training one: it would hold up the training run's rounds.
            raise AdminError(f"run {training.run_number} is training; validate --run waits until it ends")
        self._server.cross_site(number)  # refuses a run that does not exist or has not completed
        return {"run_number": number}, ""

    def _logs_request(self, args: dict) -> tuple[dict[str, Any], str]:
        return {}, json.dumps(args)

    def _delete_run_request(self, args: dict) -> tuple[dict[str, Any], str]:
        return {"run_number": args["run_number"]}, ""

    # ---- argument checks ------------------------------------------------------------------------

    def _no_args(self, args: dict) -> dict[str, Any]:
        return {}

    def _run_number_arg(self, args: dict) -> dict[str, Any]:
        number = args.get("run_number")
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise AdminError(f"run_number must be a whole number >= 1, got {number!r}")
        return {"run_number": number}

    def _gpus_arg(self, args: dict) -> dict[str, Any]:
        gpus = args.get("gpu_number")
        if isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= MAX_GPUS:
            raise AdminError(f"gpu_number must be a whole number from 1 to {MAX_GPUS}, got {gpus!r}")
        return {"gpu_number": gpus}

    def _optional_run_number_arg(self, args: dict) -> dict[str, Any]:
        return self._run_number_arg(args) if args.get("run_number") is not None else {}

    def _validate_args(self, args: dict) -> dict[str, Any]:
        checked = self._optional_run_number_arg(args)
        for key in ("site", "owner"):
            value = args.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or not value.strip() or len(value) > 200:
                raise AdminError(f"{key} must be a name, got {value!r}")
            checked[key] = value.strip()
        if "owner" in checked and "site" not in checked:
            raise AdminError("owner needs site: validate SITE OWNER shows one cell")
        return checked

    def _blob_arg(self, args: dict) -> dict[str, Any]:
        try:
            blob = self._server.blobs.get(check_blob_id(args.get("blob_id")))
        except BlobError as e:
            raise AdminError(str(e)) from None
        return {"blob_id": blob.blob_id}

    def _argv_arg(self, args: dict) -> dict[str, Any]:
        argv = args.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise AdminError(f"argv must be a non-empty list of strings, got {argv!r}")
        return {"argv": argv}

    def _logs_args(self, args: dict) -> dict[str, Any]:
        try:
            query = LogQuery.from_args(args)
        except LogRequestError as e:
            raise AdminError(str(e)) from None
        return {**query.to_args(), **self._optional_run_number_arg(args)}

    def _site_arg(self, args: dict) -> dict[str, Any]:
        site = args.get("site")
        if not isinstance(site, str) or not site.strip():
            raise AdminError(f"site must be a site name, got {site!r}")
        return {"site": site.strip()}

    def _seconds_arg(self, args: dict) -> dict[str, Any]:
        seconds = args.get("seconds")
        valid = isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds)
        if not valid or not 0 < seconds <= MAX_TIMEOUT_S:
            raise AdminError(f"seconds must be a number in (0, {MAX_TIMEOUT_S:g}], got {seconds!r}")
        return {"seconds": float(seconds)}


@dataclass(frozen=True)
class _Spec:
    targets: str  # "all" (the default), "server" (server only), "required" or "one"
    topic: str | None  # the site's topic; None: the server alone
    check: Callable[[AdminHub, dict], dict]
    request: Callable[[AdminHub, dict], tuple[dict[str, Any], str]]
    server: Callable[[AdminHub, dict, dict], dict[str, Any]]
    after_sites: bool = False  # the server acts once the sites have answered


_COMMANDS: dict[str, _Spec] = {
    "status": _Spec("all", "check_status", AdminHub._no_args, AdminHub._no_request, AdminHub._status),
    "set-run": _Spec("server", None, AdminHub._run_number_arg, AdminHub._no_request, AdminHub._set_run),
    "deploy": _Spec("required", "deploy", AdminHub._blob_arg, AdminHub._deploy_request, AdminHub._deploy),
    "start": _Spec("required", "start", AdminHub._no_args, AdminHub._start_request, AdminHub._start),
    "start-mgpu": _Spec("required", "start_mgpu", AdminHub._gpus_arg, AdminHub._start_mgpu_request,
                        AdminHub._start),
    "abort": _Spec("required", "abort", AdminHub._no_args, AdminHub._no_request, AdminHub._abort, after_sites=True),
    "validate": _Spec("server", None, AdminHub._validate_args, AdminHub._no_request, AdminHub._validate),
    "run-validation": _Spec("required", "validate", AdminHub._optional_run_number_arg,
                            AdminHub._run_validation_request, AdminHub._run_validation),
    "sysinfo": _Spec("all", "sys_info", AdminHub._no_args, AdminHub._no_request, AdminHub._sysinfo),
    "shell": _Spec("one", "shell", AdminHub._argv_arg, AdminHub._shell_request, AdminHub._shell),
    "delete-run": _Spec("all", "delete_run_number", AdminHub._run_number_arg, AdminHub._delete_run_request,
                        AdminHub._delete_run),
    "restart": _Spec("required", "restart", AdminHub._no_args, AdminHub._no_request, AdminHub._restart,
                     after_sites=True),
    "shutdown": _Spec("required", "shutdown", AdminHub._no_args, AdminHub._no_request, AdminHub._shutdown,
                      after_sites=True),
    "remove-client": _Spec("server", None, AdminHub._site_arg, AdminHub._no_request, AdminHub._remove_client),
    "metrics": _Spec("server", None, AdminHub._optional_run_number_arg, AdminHub._no_request, AdminHub._metrics),
    "logs": _Spec("one", "logs", AdminHub._logs_args, AdminHub._logs_request, AdminHub._logs),
    "set-timeout": _Spec("server", None, AdminHub._seconds_arg, AdminHub._no_request, AdminHub._set_timeout),
}
COMMANDS = tuple(_COMMANDS)
_POLLED = frozenset({"status", "logs", "metrics"})


def _parse_args(args_json: str) -> dict[str, Any]:
    if not args_json.strip():
        return {}
    try:
        args = json.loads(args_json)
    except ValueError as e:
        raise AdminError(f"args_json is not valid JSON: {e}") from None
    if not isinstance(args, dict):
        raise AdminError("args_json must be a JSON object")
    return args


def _text(body: str | bytes) -> str:
    return body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body


def _site_result(site: str, msg: Message) -> TargetResult:
    body = _text(msg.body)
    if msg.get_header(MsgHeader.RETURN_CODE) != ReturnCode.OK:
        return TargetResult(site, False, error=body or f"{site} reported a failure without a message")
    try:
        data = json.loads(body) if body.strip() else {}
    except ValueError:
        data = None
    if not isinstance(data, dict):
        log.warning("%s replied to %s with a body that is not a JSON object", site, msg.get_ref_id())
        data = {"message": body}
    return TargetResult(site, True, data)
