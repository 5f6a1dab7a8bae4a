"""The server's audit log: who ran which admin command on which targets, and whether it worked (DESIGN §10)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedcommon.admin_defs import AdminIdentity
from fedcommon.audit import JsonLinesLog

AUDIT_FILE = "audit.log"
MAX_AUDITED_ARGS = 4096
MAX_AUDITED_TARGETS = 64


class AuditLog:
    """Append-only JSON lines: who ran what on which targets, and whether it worked."""

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
