"""Code from a deployed archive, run on the server: never with the server's identity (DESIGN §10, byoc).

An MMAR whose custom/ holds files brings code. On the server that code runs only in a child process that
works on a copy of the MMAR outside the server's workspace, with a scrubbed environment, and that gives up the
server's user before it imports the code: to `run_as` (nobody by default) when the server runs as root. A
server that cannot change user refuses such code unless its own local/custom_code.json allows it to run
as the server's user (a proof-of-concept on one machine, where every participant is one user anyway).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

POLICY_FILE = Path("local") / "custom_code.json"
CUSTOM_DIR = "custom"
# What the child keeps of the server's environment: how to find Python and the installed packages, nothing else.
_KEPT_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES")


class CodeRefused(Exception):
    """Deployed code the server will not run; the message says why and what would allow it."""


@dataclass(frozen=True)
class CodePolicy:
    """The server's own rules for deployed code (local/custom_code.json)."""

    run_as: str = "nobody"
    allow_as_server_user: bool = False
    source: str = "the server's default"


def load_code_policy(workspace: Path) -> CodePolicy:
    """`workspace`/local/custom_code.json ({"run_as": USER, "allow_as_server_user": bool}), or the defaults."""
    path = Path(workspace) / POLICY_FILE
    if not path.exists():
        return CodePolicy()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CodeRefused(f"{path}: cannot be read as JSON: {e}") from None
    if not isinstance(data, dict):
        raise CodeRefused(f"{path}: expected a JSON object")
    unknown = sorted(set(data) - {"run_as", "allow_as_server_user"})
    if unknown:
        raise CodeRefused(f"{path}: unknown key {unknown[0]!r} (known: run_as, allow_as_server_user)")
    run_as = data.get("run_as", "nobody")
    allow = data.get("allow_as_server_user", False)
    if not isinstance(run_as, str) or not run_as:
        raise CodeRefused(f"{path}: run_as must be a user name, got {run_as!r}")
    if not isinstance(allow, bool):
        raise CodeRefused(f"{path}: allow_as_server_user must be true or false, got {allow!r}")
    return CodePolicy(run_as, allow, str(path))


def custom_code(mmar_dir: Path) -> list[str]:
    """The files under the MMAR's custom/ (relative paths, sorted): what it would run; [] when it brings none."""
    custom = Path(mmar_dir) / CUSTOM_DIR
    if not custom.is_dir():
        return []
    return sorted(str(p.relative_to(mmar_dir)) for p in custom.rglob("*")
                  if (p.is_file() or p.is_symlink()) and "__pycache__" not in p.parts)


@dataclass(frozen=True)
class Sandbox:
    """Where and how the child runs: its copy of the MMAR, its output file, extra arguments and environment."""

    mmar: Path
    out: Path
    argv: list[str]
    env: dict[str, str]
    cwd: Path


def scrubbed_env(home: Path) -> dict[str, str]:
    """The environment a child that runs deployed code gets: no secret, token or kit path of the server's."""
    env = {k: v for k, v in os.environ.items() if k in _KEPT_ENV}
    env.update(HOME=str(home), PYTHONDONTWRITEBYTECODE="1", PYTHONNOUSERSITE="1")
    return env


@contextlib.contextmanager
def code_sandbox(mmar_dir: Path, policy: CodePolicy, what: str) -> Iterator[Sandbox]:
    """A sandbox for a child that may import the MMAR's custom code; CodeRefused when the policy allows none.

    `what` names the run in refusals ("run 3"). The sandbox folder is removed afterwards.
    """
    code = custom_code(mmar_dir)
    if not code:  # nothing of the archive's runs: the child works on the deployed folder itself
        home = Path(mmar_dir)
        yield Sandbox(Path(mmar_dir), Path(mmar_dir).parent / ".initial-model.out", [], scrubbed_env(home), home)
        return
    ids = _target_ids(policy, what, code)
    scratch = Path(tempfile.mkdtemp(prefix="fedlearn-code-"))
    try:
        copy = scratch / "mmar"
        shutil.copytree(mmar_dir, copy, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))
        argv: list[str] = []
        if ids is not None:
            uid, gid = ids
            for path in (scratch, *scratch.rglob("*")):
                os.chown(path, uid, gid, follow_symlinks=False)
            argv = ["--run-as", f"{uid}:{gid}"]
        yield Sandbox(copy, scratch / "initial_model.fl", argv, scrubbed_env(scratch), copy)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _target_ids(policy: CodePolicy, what: str, code: list[str]) -> tuple[int, int] | None:
    """(uid, gid) to drop to, or None to run as the server's user (allowed only by the policy)."""
    shown = ", ".join(code[:3]) + (f" and {len(code) - 3} more" if len(code) > 3 else "")
    if os.geteuid() != 0:
        if policy.allow_as_server_user:
            return None
        raise CodeRefused(
            f"{what} brings code ({shown}) and this server cannot run it as another user (it does not run as "
            f"root), so it would run with the server's identity: deploy the MMAR to sites only, or allow it "
            f'with {{"allow_as_server_user": true}} in the server\'s {POLICY_FILE}')
    try:
        entry = pwd.getpwnam(policy.run_as)
    except KeyError:
        raise CodeRefused(f"{what} brings code ({shown}): run_as user {policy.run_as!r} of {policy.source} does not "
                          "exist on this host") from None
    if entry.pw_uid == 0:
        raise CodeRefused(f"{what} brings code ({shown}): run_as of {policy.source} names root; name an "
                          "unprivileged user")
    return entry.pw_uid, entry.pw_gid


def drop_privileges(run_as: str) -> None:
    """In the child, before it imports deployed code: become uid:gid for good (no way back to root)."""
    uid_text, _, gid_text = run_as.partition(":")
    uid, gid = int(uid_text), int(gid_text)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    try:
        os.setuid(0)
    except PermissionError:
        return
    print("could not give up the server's user", file=sys.stderr)
    sys.exit(1)
