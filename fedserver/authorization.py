"""The server's authorization policy: what each admin role may run, and on whose sites (DESIGN §10)."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from fedcommon.admin_defs import ADMIN_ROLES, AdminIdentity
from fedcommon.commands import COMMANDS, SERVER, Right
from fedcommon.deployed_code import archive_code, shown

POLICY_FILE = Path("local") / "authorization.json"
RIGHTS = Right.ALL
SCOPES = ("any", "own_org", "none")

# A command is allowed when any one of its rights allows it on every target (its declaration names them).
COMMAND_RIGHTS: dict[str, tuple[str, ...]] = {name: c.rights for name, c in COMMANDS.items()}

# member looks; lead runs training and reads its own org's sites; org_admin operates its own org's sites;
# project_admin does everything. "own_org" never covers the server, which belongs to no org. `code` (deploying an
# MMAR with custom/ code) is needed besides train: a lead deploys code to its own org's sites only.
DEFAULT_POLICY: dict[str, dict[str, str]] = {
    "project_admin": {"view": "any", "train": "any", "operate": "any", "shell": "any", "code": "any"},
    "org_admin": {"view": "any", "train": "none", "operate": "own_org", "shell": "own_org", "code": "none"},
    "lead": {"view": "any", "train": "any", "operate": "none", "shell": "own_org", "code": "own_org"},
    "member": {"view": "any", "train": "none", "operate": "none", "shell": "none", "code": "none"},
}
# What an extra right lets a caller do, as its refusal says it ("may not deploy code to the server").
_EXTRA_ACTS = {Right.CODE: "deploy code"}


class Need(NamedTuple):
    """A right that a command's arguments need besides one of the command's own, and why (it names the files)."""

    right: str
    why: str


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the key."""


class Refused(Exception):
    """A command the policy does not allow; the message names the rule."""


class Policy:
    """role → right → scope; checks one command of one caller on its targets."""

    def __init__(self, rules: Mapping[str, Mapping[str, str]], source: str = "the server's default policy"):
        self.rules = {role: dict(rights) for role, rights in rules.items()}
        self.source = source

    def scope(self, role: str, right: str) -> str:
        """The scope `role` has for `right` ("none" for an unknown role)."""
        return self.rules.get(role, {}).get(right, "none")

    def precheck(self, caller: AdminIdentity, command: str) -> None:
        """Refuse at once when no right of the command is granted to the caller's role at all."""
        rights = COMMAND_RIGHTS.get(command)
        if rights is None:
            return  # an unknown command is refused by the hub, naming the command
        if all(self.scope(caller.role, r) == "none" for r in rights):
            rule = " and ".join(f"{caller.role}.{r} = none" for r in rights)
            raise Refused(
                f"refused by {self.source}: {caller.role} {caller.name!r} may not run {command!r} (rule {rule})"
            )

    def check(
        self,
        caller: AdminIdentity,
        command: str,
        targets: list[str],
        site_orgs: Mapping[str, str],
        also: Sequence[Need] = (),
    ) -> None:
        """Refuse (Refused, naming the rule) unless one right of the command covers every target, and so does
        each right its arguments need besides (`also`: code, for a deploy that brings code)."""
        self.precheck(caller, command)
        self._check_any(caller, command, targets, site_orgs)
        for need in also:
            self._check_extra(caller, need, targets, site_orgs)

    def _check_extra(self, caller: AdminIdentity, need: Need, targets: list[str], site_orgs: Mapping[str, str]) -> None:
        scope = self.scope(caller.role, need.right)
        if scope == "any":
            return
        act = _EXTRA_ACTS.get(need.right, f"use right {need.right!r}")
        rule = f"rule {caller.role}.{need.right}"
        if scope == "none":
            raise Refused(
                f"refused by {self.source}: {caller.role} {caller.name!r} may not {act} ({rule} = none): {need.why}"
            )
        outside = _outside(caller, targets, site_orgs)
        if outside:
            raise Refused(
                f"refused by {self.source}: {caller.role} {caller.name!r} may not {act} to "
                f"{_shown(outside, site_orgs)} ({rule} = own_org allows only sites of org {caller.org!r}): "
                f"{need.why}"
            )

    def _check_any(self, caller: AdminIdentity, command: str, targets: list[str], site_orgs: Mapping[str, str]) -> None:
        reasons = []
        for right in COMMAND_RIGHTS.get(command, ()):
            scope = self.scope(caller.role, right)
            if scope == "any":
                return
            if scope == "none":
                continue
            outside = _outside(caller, targets, site_orgs)
            if not outside:
                return
            reasons.append(
                f"rule {caller.role}.{right} = own_org allows only sites of org {caller.org!r}, "
                f"not {_shown(outside, site_orgs)}"
            )
        raise Refused(
            f"refused by {self.source}: {caller.role} {caller.name!r} may not run {command!r} here: "
            + "; ".join(reasons)
        )


def _outside(caller: AdminIdentity, targets: list[str], site_orgs: Mapping[str, str]) -> list[str]:
    """The targets an own_org scope does not cover: the server, and sites of another (or an unknown) org."""
    return [t for t in targets if t == SERVER or site_orgs.get(t) != caller.org]


def _shown(targets: list[str], site_orgs: Mapping[str, str]) -> str:
    return ", ".join(
        "the server"
        if t == SERVER
        else f"{t} (org {site_orgs[t]})"
        if t in site_orgs
        else f"{t} (org unknown: not connected)"
        for t in targets
    )


def load_policy(workspace: Path) -> Policy:
    """The default policy, with the overrides of `workspace`/local/authorization.json if it exists.

    The file is {"roles": {ROLE: {RIGHT: SCOPE}}}; what it does not name keeps its default.
    """
    path = Path(workspace) / POLICY_FILE
    if not path.exists():
        return Policy(DEFAULT_POLICY)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PolicyError(f"{path}: cannot be read as JSON: {e}") from None
    if not isinstance(data, dict) or set(data) - {"roles"}:
        raise PolicyError(
            f'{path}: expected {{"roles": {{ROLE: {{RIGHT: SCOPE}}}}}}, got keys {sorted(data)}'
            if isinstance(data, dict)
            else f"{path}: expected a JSON object"
        )
    roles = data.get("roles", {})
    if not isinstance(roles, dict):
        raise PolicyError(f"{path}: key 'roles' must be an object")
    rules = {role: dict(rights) for role, rights in DEFAULT_POLICY.items()}
    for role, rights in roles.items():
        if role not in ADMIN_ROLES:
            raise PolicyError(f"{path}: roles.{role}: unknown role (one of {', '.join(ADMIN_ROLES)})")
        if not isinstance(rights, dict):
            raise PolicyError(f"{path}: roles.{role} must be an object of RIGHT: SCOPE")
        for right, scope in rights.items():
            if right not in RIGHTS:
                raise PolicyError(f"{path}: roles.{role}.{right}: unknown right (one of {', '.join(RIGHTS)})")
            if scope not in SCOPES:
                raise PolicyError(
                    f"{path}: roles.{role}.{right}: scope must be one of {', '.join(SCOPES)}, got {scope!r}"
                )
            rules[role][right] = scope
    return Policy(rules, source=f"server policy {path}")


def archive_needs(path: Path) -> list[Need]:
    """An archive that brings code (files under custom/) needs the code right on every target it goes to."""
    from fedcommon.safe_zip import UnsafeArchiveError

    try:
        code = archive_code(path)
    except (UnsafeArchiveError, zipfile.BadZipFile, OSError) as e:
        # Every participant refuses it too, each saying why; whoever may deploy code hears that from them.
        return [Need(Right.CODE, f"what the archive brings cannot be told ({e})")]
    return [Need(Right.CODE, f"the archive brings code ({shown(code)})")] if code else []
