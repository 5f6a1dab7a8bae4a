"""The server's audit log: who ran which admin command on which targets, and whether it worked (DESIGN §10)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedcommon.admin_defs import AdminIdentity
from fedcommon.audit import JsonLinesLog

AUDIT_FILE = "audit.log"


class AuditLog:
    """Append-only JSON lines: who ran what on which targets, and whether it worked."""

    def __init__(self, path: Path):
        self._log = JsonLinesLog(path)
        self.path = self._log.path

    def record(
        self,
        caller: AdminIdentity,
        command: str,
        targets: list[str],
        ok: bool | None,
        args: Any = None,
        error: str = "",
        phase: str = "",
        suppressed_refusals: int = 0,
    ) -> None:
        """Append one entry (bounded whatever the caller sent); a failure to write is logged, never raised.

        phase "intent": written before the command acts (ok is None then); the outcome is a second entry.
        suppressed_refusals: refusals of this caller left out since its last audited one (rate limit).
        """
        entry: dict[str, Any] = {
            "admin": caller.name,
            "role": caller.role,
            "org": caller.org,
            "command": command,
            "targets": targets,
            "ok": ok,
        }
        if phase:
            entry["phase"] = phase
        if args:
            entry["args"] = args
        if error:
            entry["error"] = error
        if suppressed_refusals:
            entry["suppressed_refusals"] = suppressed_refusals
        self._log.append(entry)

    def record_refused_peer(self, peer: str, kind: str, org: str, port: str, method: str, reason: str) -> None:
        """Append a call refused before any command ran (revoked or wrong kind of certificate)."""
        self._log.append(
            {
                "event": "refused_connection",
                "peer": peer,
                "kind": kind,
                "org": org,
                "port": port,
                "method": method,
                "ok": False,
                "error": reason,
            }
        )
