"""The admin hub: runs an operator's command on its targets (the server and sites' mailboxes) and audits it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from fedcommon.admin_defs import AdminIdentity, MsgHeader
from fedcommon.audit import RefusalLimiter
from fedcommon.bounded_json import JsonBoundsError, loads_object
from fedcommon.commands import (
    COMMANDS,
    MAX_ARGS_BYTES,
    MAX_NAME,
    MAX_TARGETS,
    MAX_TIMEOUT_BY_ROLE,
    SERVER,
    ArgumentError,
    Command,
    Right,
    Targets,
)
from fedcommon.outcome import CommandOutcome, TargetReply
from fedserver.audit import AuditLog
from fedserver.authorization import Policy, Refused
from fedserver.blob_store import BlobError
from fedserver.catalogue import Federation, Gathered, ServerCommand, server_side
from fedserver.cross_site import CrossSiteError
from fedserver.errors import AdminError, ServerError

log = logging.getLogger(__name__)

MAX_LOGGED_TARGETS = 20
MAX_AUDITED_ARGS = 4096  # of arguments refused at intake, this much is kept in the audit log


class AdminHub:
    """Checks, authorizes and fans out one command at a time; one reply per target, every command audited."""

    def __init__(self, server: Federation, policy: Policy, audit: AuditLog):
        self._server = server
        self._sites = server.mailbox
        self.policy = policy
        self.audit = audit
        self._refusals = RefusalLimiter()

    def execute(
        self,
        caller: AdminIdentity,
        command: str,
        targets: list[str],
        args_json: str,
        timeout: float,
        active: Callable[[], bool] = lambda: True,
    ) -> CommandOutcome:
        """Run one operator command on its targets, if the policy allows it; every command is audited.

        `active` tells whether the caller is still there: a command waiting for sites stops when it is not.
        """
        started = time.monotonic()
        try:
            args = _parse_args(args_json)
            _check_targets(targets)
        except AdminError as e:
            args = {"truncated": args_json[:MAX_AUDITED_ARGS], "length": len(args_json)}
            outcome = CommandOutcome(command, False, [], str(e))
        else:
            try:
                outcome = self._execute(caller, command, list(targets), args, timeout, active)
            except (AdminError, Refused) as e:
                outcome = CommandOutcome(command, False, [], str(e))
            except Exception as e:
                log.exception("command %s failed", command)
                outcome = CommandOutcome(command, False, [], f"internal error: {type(e).__name__}: {e}")
        known = server_side(command) is not None
        self._server.telemetry.command(command if known else "unknown", outcome.ok, time.monotonic() - started)
        suppressed = 0
        if outcome.error and not outcome.replies:  # the whole command refused: a flood of these is rate-limited
            audited, suppressed = self._refusals.admit(caller.name)
            if not audited:
                return outcome
        self.audit.record(
            caller,
            command,
            [r.target for r in outcome.replies] or list(targets),
            outcome.ok,
            args,
            outcome.error,
            suppressed_refusals=suppressed,
        )
        # Commands that consoles poll (status --watch, wait, logs --follow) would fill the log: debug level when ok.
        level = logging.DEBUG if outcome.ok and known and COMMANDS[command].polled else logging.INFO
        log.log(
            level,
            "admin %s (%s): %s %s -> %s (%.2fs)",
            caller.name,
            caller.role,
            command,
            ",".join(targets[:MAX_LOGGED_TARGETS]) or "-",
            "ok" if outcome.ok else outcome.error or "failed",
            time.monotonic() - started,
        )
        return outcome

    def _execute(
        self,
        caller: AdminIdentity,
        command: str,
        targets: list[str],
        args: dict[str, Any],
        timeout: float,
        active: Callable[[], bool],
    ) -> CommandOutcome:
        spec = server_side(command)
        if spec is None:
            raise AdminError(f"unknown command {command[:100]!r}")
        declared = COMMANDS[command]
        self.policy.precheck(caller, command)
        try:
            args = declared.check_args(args)
        except ArgumentError as e:
            raise AdminError(str(e)) from None
        if spec.verify is not None:
            spec.verify(self._server, args)
        wait = self._timeout(timeout, caller.role)
        names = self._resolve(command, declared.targets, targets)
        needs = spec.needs(self._server, args) if spec.needs else []
        self.policy.check(
            caller, command, spec.touches(self._server, args) if spec.touches else names, self._sites.site_orgs(), needs
        )
        if not (declared.polled or declared.rights == (Right.VIEW,)):
            # Written before the command acts, so a command that changes something is on record even if what
            # follows fails; its outcome is the second entry.
            self.audit.record(caller, command, names, None, args, phase="intent")
        connected = set(self._sites.connected_sites())
        results = {
            n: TargetReply(n, False, error=self._sites.not_connected(n))
            for n in names
            if n != SERVER and n not in connected
        }
        live = [n for n in names if n != SERVER and n in connected]
        on_server = SERVER in names
        try:
            headers, body = self._request(declared, spec, args)
        except (AdminError, ArgumentError, BlobError, CrossSiteError, ServerError) as e:
            # A precondition every target shares, e.g. no run number, or a run that has already run.
            replies = [results.get(n) or TargetReply(n, False, error=str(e)) for n in names]
            return CommandOutcome(command, False, replies)
        headers = {
            **headers,
            MsgHeader.ADMIN: caller.name,
            MsgHeader.ADMIN_ROLE: caller.role,
            MsgHeader.ADMIN_ORG: caller.org,
            MsgHeader.COMMAND: command,
        }
        extra: list[str] = []
        if spec.sites_first and on_server and self._server.training_run() is not None:
            extra = sorted(connected - set(live))
            self.policy.check(caller, command, names + extra, self._sites.site_orgs())
        if spec.sending is not None:
            spec.sending(self._server, args, live + extra + ([SERVER] if on_server else []))
        waiters = self._sites.send(live + extra, declared.topic, headers, body) if declared.topic else []
        deadline = time.monotonic() + wait
        if on_server and not spec.after_sites:
            results[SERVER] = self._on_server(command, spec, args, {}, caller)
        gathered = self._sites.gather(waiters, deadline, active)
        for site in live:
            results[site] = gathered[site] or TargetReply(site, False, error=f"no reply within {wait:g}s")
        stopped = [site for site, reply in gathered.items() if reply is not None and reply.ok]
        if spec.ends_session:
            # Its training was stopped: the session it held is over now, not after heart_beat_timeout.
            for site in stopped:
                self._server.registry.remove(site, args.get("run_number"))  # only that run's, when one is named
        if spec.disconnects:
            self._sites.drop(stopped)
        if on_server and spec.after_sites:
            results[SERVER] = self._on_server(command, spec, args, gathered, caller)
        replies = [results[n] for n in names]
        return CommandOutcome(command, all(r.ok for r in replies), replies)

    def _request(self, declared: Command, spec: ServerCommand, args: dict[str, Any]) -> tuple[dict[str, str], str]:
        """(headers, body) of the request each site is sent, checked against the declaration."""
        site_args = spec.site_args(self._server, args)
        return declared.encode_request(site_args) if declared.topic else ({}, "")

    def _timeout(self, requested: float, role: str) -> float:
        """The seconds to wait for sites: what the caller asked (0: the server's setting), at most its role's cap."""
        if not math.isfinite(requested) or requested < 0:
            raise AdminError(f"timeout must be a number of seconds >= 0, got {requested}")
        cap = MAX_TIMEOUT_BY_ROLE.get(role, min(MAX_TIMEOUT_BY_ROLE.values()))
        return min(requested or self._server.admin_timeout, cap)

    def _resolve(self, command: str, kind: str, targets: list[str]) -> list[str]:
        requested = [t.strip() for t in targets if t.strip()]
        if not requested:
            if kind == Targets.REQUIRED:
                raise AdminError(f"{command} needs targets: server, client, all or site names")
            if kind == Targets.ONE:
                raise AdminError(f"{command} needs one target: server or a site name")
            requested = [SERVER] if kind == Targets.SERVER else ["all"]
        if kind == Targets.SERVER and requested != [SERVER]:
            raise AdminError(f"{command} applies to the server only, not {', '.join(requested)}")
        if kind == Targets.ONE and (len(requested) != 1 or requested[0] in ("client", "all")):
            raise AdminError(f"{command} takes one target, server or a site name; got {', '.join(requested)}")
        connected = self._sites.connected_sites()
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

    def _on_server(
        self, command: str, spec: ServerCommand, args: dict[str, Any], gathered: Gathered, caller: AdminIdentity
    ) -> TargetReply:
        try:
            if spec.with_caller:
                return TargetReply(SERVER, True, spec.act(self._server, args, gathered, caller))
            return TargetReply(SERVER, True, spec.act(self._server, args, gathered))
        except (AdminError, ServerError, BlobError, CrossSiteError, ValueError, OSError) as e:
            log.warning("server: %s refused: %s", command, e)
            return TargetReply(SERVER, False, error=str(e))
        except Exception as e:
            log.exception("server: %s failed", command)
            return TargetReply(SERVER, False, error=f"internal error: {type(e).__name__}: {e}")


def _parse_args(args_json: str) -> dict[str, Any]:
    try:
        return loads_object(args_json, "args_json", MAX_ARGS_BYTES)
    except JsonBoundsError as e:
        raise AdminError(str(e)) from None


def _check_targets(targets: list[str]) -> None:
    """Refuse, before any is resolved, more targets than a command may name or a name no participant can have."""
    if len(targets) > MAX_TARGETS:
        raise AdminError(f"{len(targets)} targets; a command may name at most {MAX_TARGETS}")
    long = next((t for t in targets if len(t) > MAX_NAME), None)
    if long is not None:
        raise AdminError(f"target {long[:40]!r}… is {len(long)} characters long; a name has at most {MAX_NAME}")
