"""The server's answer to one admin command as typed records, and the result that prints it per target."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Targets that stand for a set of participants; any other target is one participant's name.
GROUP_TARGETS = ("server", "client", "all")


@dataclass(frozen=True)
class TargetReply:
    """One target's answer: its data (ok) or what went wrong (not ok)."""

    target: str
    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        """{"target", "ok", ...data} or {"target", "ok": false, "error"}."""
        out: dict[str, Any] = {"target": self.target, "ok": self.ok}
        out.update((k, v) for k, v in self.data.items() if k not in out)
        if not self.ok:
            out["error"] = self.error or "failed"
        return out


@dataclass(frozen=True)
class CommandOutcome:
    """Every target's reply to one command, or the server's refusal of the whole command (error)."""

    command: str
    ok: bool
    replies: list[TargetReply]
    error: str = ""

    def reply(self, target: str) -> TargetReply | None:
        """The reply of one target, or None if it is not among the replies."""
        return next((r for r in self.replies if r.target == target), None)

    @property
    def server(self) -> TargetReply | None:
        """The server's own reply, if the command addressed it."""
        return self.reply("server")

    @property
    def sites(self) -> list[TargetReply]:
        """The sites' replies, in the server's order."""
        return [r for r in self.replies if r.target != "server"]

    def server_failure(self) -> str:
        """Why there is no usable server reply (the whole command's refusal first); "" when it is ok."""
        if self.error:
            return self.error
        server = self.server
        if server is None:
            return "no reply from the server"
        return "" if server.ok else server.error or "failed"

    def failures(self) -> list[str]:
        """"target: error" for every failed target, the whole command's refusal first."""
        out = [self.error] if self.error else []
        return out + [f"{r.target}: {r.error or 'failed'}" for r in self.replies if not r.ok]

    def expecting(self, targets: list[str]) -> CommandOutcome:
        """This outcome with a "no reply" entry for every named target (or the server) the server left out."""
        wanted = [t for t in targets if t not in ("client", "all")]
        if "all" in targets and "server" not in wanted:
            wanted.insert(0, "server")
        missing = [t for t in wanted if self.reply(t) is None]
        if not missing or self.error:
            return self
        extra = [TargetReply(t, False, error="no reply from the server for this target") for t in missing]
        return CommandOutcome(self.command, False, self.replies + extra, self.error)


@dataclass(frozen=True)
class RepliesResult:
    """A remote command's outcome as the console prints it: one row (or JSON object) per target."""

    outcome: CommandOutcome
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def command(self) -> str:
        return self.outcome.command

    @property
    def ok(self) -> bool:
        return self.outcome.ok and not self.outcome.error

    def to_json(self) -> dict[str, Any]:
        """Extra fields, the per-target replies, and the whole command's error if it was refused."""
        out: dict[str, Any] = {**self.extra, "replies": [r.to_json() for r in self.outcome.replies]}
        if self.outcome.error:
            out["error"] = self.outcome.error
        return out

    def __rich__(self) -> Any:
        """A table: target, result, and the reply's data or error."""
        from fedadmin import render

        return render.replies_view(self.outcome, self.extra)


class ServerAnswer:
    """For results the server alone answers (validate, metrics): ok when its reply is, its data, its failure."""

    outcome: CommandOutcome

    @property
    def error(self) -> str:
        """Why the result cannot be shown; empty when it can."""
        return self.outcome.server_failure()

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def server_data(self) -> dict[str, Any]:
        server = self.outcome.server
        return dict(server.data) if server is not None and server.ok else {}

    def failure_json(self) -> dict[str, Any]:
        """The error and the replies, like the other commands' failures."""
        return {"error": self.error, "replies": [r.to_json() for r in self.outcome.replies]}
