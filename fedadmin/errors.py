"""The errors of the Python session API (fedadmin.session), each with the console's exit code for it."""

from __future__ import annotations

import re
from typing import Any

from fedcommon.commands import ArgumentError
from fedcommon.outcome import CommandOutcome

# How a policy refusal reads: the server's ("refused by the server's default policy: ... (rule member.train = none)")
# and a site's ("site-1: refused by local/policy.json rule 'no-shell'", or its broken policy's "refused: ...").
# A job command another submitter may not run names its rule too ("(rule lead.operate = own_org)").
_POLICY_REFUSAL = re.compile(r"refused by |(^|: )refused: |\(rule [a-z_]+\.[a-z_]+ = ")


class SessionError(Exception):
    """Anything a Session cannot do; `exit_code` is what the console exits with for it."""

    exit_code = 1


class UsageError(SessionError, ArgumentError):
    """Arguments the command's declaration refuses, or a bad kit or MMAR: nothing was sent (exit 2).

    `param` names the argument at fault when it is one (the console's option, e.g. "--host").
    """

    exit_code = 2

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class NotConnected(SessionError):
    """The server's admin port cannot be reached, or it refused this admin's kit (exit 3)."""

    exit_code = 3


class RemoteError(SessionError):
    """The server refused a call (an upload, a download) or its answer was not what was sent (exit 1)."""


class CommandTimeout(RemoteError):
    """No answer within the time allowed: the server's reply deadline, or a wait's timeout (exit 1).

    `last` is the last thing seen before giving up (a Status or a Job), when there was one.
    """

    def __init__(self, message: str, last: Any = None) -> None:
        super().__init__(message)
        self.last = last


class CommandFailed(SessionError):
    """A command the server refused as a whole, or that failed at a target; `outcome` has every target's reply.

    `result` is what the method would have returned (e.g. a Status with a failed site), for a caller that shows it.
    """

    def __init__(self, outcome: CommandOutcome, result: Any = None, message: str = "") -> None:
        super().__init__(message or f"{outcome.command} failed: {'; '.join(outcome.failures()) or 'no reply'}")
        self.outcome = outcome
        self.result = result if result is not None else outcome


class Refused(CommandFailed):
    """A command the server's authorization policy or a site's local policy refused; `rule` quotes the refusal."""

    def __init__(self, outcome: CommandOutcome, rule: str, result: Any = None) -> None:
        super().__init__(outcome, result, f"{outcome.command} {rule}" if rule.startswith("refused") else rule)
        self.rule = rule


def policy_refusal(outcome: CommandOutcome) -> str:
    """The first failure in outcome that is a policy's refusal (the whole command's first), or ""."""
    return next((f for f in outcome.failures() if _POLICY_REFUSAL.search(f)), "")


def raise_for(outcome: CommandOutcome, result: Any = None) -> None:
    """Raise Refused or CommandFailed when the command failed as a whole or at any target."""
    if outcome.ok and not outcome.error:
        return
    rule = policy_refusal(outcome)
    if rule:
        raise Refused(outcome, rule, result)
    raise CommandFailed(outcome, result)
