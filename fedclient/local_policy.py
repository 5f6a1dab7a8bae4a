"""A site's own veto: local/authorization.json rules that refuse commands aimed at this site (DESIGN §10).

The file is {"rules": [RULE, ...], "custom_code": false}; "custom_code": false (default true) refuses every MMAR
that brings code (files under custom/), from anyone: deploying an MMAR to a site runs its code there. A RULE is
  {"name": "no-shell-from-outside", "deny": ["shell"], "except_orgs": ["hospital-a"]}
with "deny" a list of admin commands (or "*"), and optional conditions on the sending admin, all of
which must hold for the rule to apply: "admins", "roles", "orgs" (the admin is one of them) and
"except_admins", "except_orgs" (the admin is none of them). The first rule that applies refuses.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from fedcommon.admin_defs import ADMIN_ROLES, AdminIdentity
from fedcommon.commands import COMMANDS, SITE_COMMAND_ALIASES, SITE_COMMANDS
from fedcommon.deployed_code import shown

log = logging.getLogger(__name__)

POLICY_FILE = Path("local") / "authorization.json"
_CONDITIONS = ("admins", "roles", "orgs", "except_admins", "except_orgs")
_RULE_KEYS = ("name", "deny", *_CONDITIONS)
_TOP_KEYS = ("rules", "custom_code")
CUSTOM_CODE_KEY = "custom_code"
_UNREAD = object()


class LocalPolicyError(ValueError):
    """A local/authorization.json that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Rule:
    """One deny rule: which commands, and for which admins."""

    name: str
    deny: frozenset[str]
    conditions: dict[str, frozenset[str]]

    def applies(self, admin: AdminIdentity, command: str) -> bool:
        """Whether this rule refuses `command` from `admin`."""
        if "*" not in self.deny and command not in self.deny:
            return False
        values = {
            "admins": admin.name,
            "roles": admin.role,
            "orgs": admin.org,
            "except_admins": admin.name,
            "except_orgs": admin.org,
        }
        for key, allowed in self.conditions.items():
            inside = values[key] in allowed
            if inside == key.startswith("except_"):
                return False
        return True


def parse_rules(data: object, path: Path) -> list[Rule]:
    """The rules of a parsed policy file; raise LocalPolicyError naming the file and key of the first fault."""
    if (
        not isinstance(data, dict)
        or not data
        or set(data) - set(_TOP_KEYS)
        or not isinstance(data.get("rules", []), list)
    ):
        raise LocalPolicyError(f'{path}: expected {{"rules": [...]}}, "custom_code": false optional beside it')
    if not isinstance(data.get("custom_code", True), bool):
        raise LocalPolicyError(f"{path}: custom_code: must be true or false, got {data['custom_code']!r}")
    rules = []
    for i, raw in enumerate(data.get("rules", [])):
        where = f"{path}: rules[{i}]"
        if not isinstance(raw, dict):
            raise LocalPolicyError(f"{where}: must be an object")
        unknown = sorted(set(raw) - set(_RULE_KEYS))
        if unknown:
            raise LocalPolicyError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(_RULE_KEYS)})")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise LocalPolicyError(f"{where}.name: required, a non-empty string")
        lists = {}
        for key in ("deny", *_CONDITIONS):
            if key not in raw:
                continue
            value = raw[key]
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise LocalPolicyError(f"{where}.{key}: must be a non-empty list of strings")
            lists[key] = frozenset(value)
        if "deny" not in lists:
            raise LocalPolicyError(f'{where}.deny: required, the commands refused (or ["*"])')
        # A misspelt name would never match and leave open what the owner meant to close.
        for key, known in (("deny", (*SITE_COMMANDS, "*")), ("roles", ADMIN_ROLES)):
            for j, value in enumerate(raw.get(key, [])):
                if value not in known:
                    raise LocalPolicyError(
                        f"{where}.{key}[{j}]: unknown {'command' if key == 'deny' else 'role'} "
                        f"{value!r} (one of {', '.join(known)})"
                    )
        # An earlier name ("validate" for run-validation): a rule written with it keeps meaning what its owner meant.
        denied = frozenset(SITE_COMMAND_ALIASES.get(c, c) for c in lists.pop("deny"))
        denied |= {c.name for c in COMMANDS.values() if c.follows in denied}  # logs follows shell
        rules.append(Rule(name, denied, lists))
    return rules


class LocalPolicy:
    """The rules of `workspace`/local/authorization.json, re-read when the file changes.

    No file: nothing is refused. A file that cannot be read or parsed refuses every command until it is
    fixed, so a typo never opens a site its owner meant to close.
    """

    def __init__(self, workspace: Path):
        self.path = Path(workspace) / POLICY_FILE
        self._lock = threading.Lock()
        self._stamp: object = _UNREAD
        self._rules: list[Rule] = []
        self._custom_code = True
        self._error: str | None = None
        self._reload()

    @property
    def error(self) -> str | None:
        """Why the file cannot be used, or None."""
        return self._error

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        except OSError as e:
            self._stamp, self._rules, self._custom_code = _UNREAD, [], False
            self._error = f"{self.path}: cannot be read ({e.strerror})"
            return
        if stamp == self._stamp:
            return
        self._stamp = stamp
        if stamp is None:
            self._rules, self._custom_code, self._error = [], True, None
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self._rules, self._error = parse_rules(data, self.path), None
            self._custom_code = data.get(CUSTOM_CODE_KEY, True)
            log.info(
                "%s: %d rule(s) in force%s",
                self.path,
                len(self._rules),
                "" if self._custom_code else "; custom code refused",
            )
        except (OSError, UnicodeDecodeError, ValueError) as e:
            reason = str(e) if isinstance(e, LocalPolicyError) else f"{self.path}: cannot be read as JSON: {e}"
            self._rules, self._custom_code, self._error = [], False, reason
            log.error("%s; every command is refused until it is fixed", reason)

    def refusal(self, admin: AdminIdentity, command: str) -> str | None:
        """Why this site refuses `command` from `admin`, naming the rule; or None."""
        with self._lock:
            self._reload()
            if self._error is not None:
                return f"refused: {self._error} (every command is refused until it is fixed)"
            for rule in self._rules:
                if rule.applies(admin, command):
                    return f"refused by {POLICY_FILE.as_posix()} rule {rule.name!r}"
        return None

    def code_refusal(self, code: list[str]) -> str | None:
        """Why this site refuses an MMAR that brings the files `code` (under custom/), naming the key; or None."""
        with self._lock:
            self._reload()
            if self._error is not None:
                return f"refused: {self._error} (every command is refused until it is fixed)"
            if code and not self._custom_code:
                return (
                    f'refused by {POLICY_FILE.as_posix()} "{CUSTOM_CODE_KEY}": false: this site runs no deployed '
                    f"code, and the MMAR brings {shown(code)}"
                )
        return None
