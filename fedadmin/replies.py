"""The console's results over a command's outcome (fedcommon.outcome): per target, or the server's answer alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedcommon.outcome import CommandOutcome


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
