"""The answer to one admin command as typed records: one TargetReply per target, in one CommandOutcome."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedcommon.commands import GROUP_TARGETS, SERVER

__all__ = ["GROUP_TARGETS", "CommandOutcome", "TargetReply"]


@dataclass(frozen=True)
class TargetReply:
    """One target's answer: its data (ok) or what went wrong (not ok).

    `data_json` is the data as it came off the wire (a site's reply body), kept so the server passes a
    site's answer on without encoding it again; None when the data was built here.
    """

    target: str
    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    data_json: str | None = field(default=None, compare=False, repr=False)

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
        return self.reply(SERVER)

    @property
    def sites(self) -> list[TargetReply]:
        """The sites' replies, in the server's order."""
        return [r for r in self.replies if r.target != SERVER]

    def server_failure(self) -> str:
        """Why there is no usable server reply (the whole command's refusal first); "" when it is ok."""
        if self.error:
            return self.error
        server = self.server
        if server is None:
            return "no reply from the server"
        return "" if server.ok else server.error or "failed"

    def failures(self) -> list[str]:
        """ "target: error" for every failed target, the whole command's refusal first."""
        out = [self.error] if self.error else []
        return out + [f"{r.target}: {r.error or 'failed'}" for r in self.replies if not r.ok]

    def expecting(self, targets: list[str]) -> CommandOutcome:
        """This outcome with a "no reply" entry for every named target (or the server) the server left out."""
        wanted = [t for t in targets if t not in ("client", "all")]
        if "all" in targets and SERVER not in wanted:
            wanted.insert(0, SERVER)
        missing = [t for t in wanted if self.reply(t) is None]
        if not missing or self.error:
            return self
        extra = [TargetReply(t, False, error="no reply from the server for this target") for t in missing]
        return CommandOutcome(self.command, False, self.replies + extra, self.error)
