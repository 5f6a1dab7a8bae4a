"""Code from a deployed archive, run on the server: never with the server's identity (DESIGN §10, the code right).

An MMAR whose custom/ holds files brings code. On the server that code runs only in a child process that works on
a copy of the MMAR outside the server's (private) workspace, with a scrubbed environment, and that gives up the
server's user before it imports the code: to `run_as` (nobody by default) when the server runs as root. A server
that cannot change user refuses such code unless its own local/custom_code.json allows it to run as the server's
user (a proof-of-concept on one machine, where every participant is one user anyway).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedcommon.deployed_code import SERVER_CODE_POLICY as POLICY_FILE
from fedcommon.deployed_code import custom_code, shown

DEFAULT_RUN_AS = "nobody"
_KEYS = ("run_as", "allow_as_server_user")
# What the child keeps of the server's environment: how to find Python and the installed packages, nothing else.
_KEPT_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES")
_COPY_CHUNK = 1 << 20
_CANCEL_CHECK_S = 0.1


class CodePolicyError(ValueError):
    """A local/custom_code.json the server cannot use; the message names the file and the key."""


class CodeRefused(Exception):
    """Deployed code the server will not run; the message says why and what would allow it."""


@dataclass(frozen=True)
class CodePolicy:
    """The server's own rules for deployed code (local/custom_code.json)."""

    run_as: str = DEFAULT_RUN_AS
    allow_as_server_user: bool = False
    source: str = "the server's default"


def load_code_policy(workspace: Path) -> CodePolicy:
    """`workspace`/local/custom_code.json ({"run_as": USER, "allow_as_server_user": bool}), or the defaults.

    CodePolicyError names the key of the first fault; a server that runs as root checks run_as names an
    unprivileged user of this host.
    """
    path = Path(workspace) / POLICY_FILE
    if not path.exists():
        return CodePolicy()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CodePolicyError(f"{path}: cannot be read as JSON: {e}") from None
    if not isinstance(data, dict):
        raise CodePolicyError(f'{path}: expected {{"run_as": USER, "allow_as_server_user": true|false}}')
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise CodePolicyError(f"{path}: {unknown[0]}: unknown key (known: {', '.join(_KEYS)})")
    run_as = data.get("run_as", DEFAULT_RUN_AS)
    allow = data.get("allow_as_server_user", False)
    if not isinstance(run_as, str) or not run_as:
        raise CodePolicyError(f"{path}: run_as: must be a user name, got {run_as!r}")
    if not isinstance(allow, bool):
        raise CodePolicyError(f"{path}: allow_as_server_user: must be true or false, got {allow!r}")
    policy = CodePolicy(run_as, allow, str(path))
    if os.geteuid() == 0:
        try:
            _user_ids(run_as)
        except CodeRefused as e:
            raise CodePolicyError(f"{path}: run_as: {e}") from None
    return policy


def _user_ids(name: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise CodeRefused(f"no user {name!r} on this host") from None
    if entry.pw_uid == 0:
        raise CodeRefused(f"{name!r} is root (uid 0): name an unprivileged user")
    return entry.pw_uid, entry.pw_gid


@dataclass(frozen=True)
class Sandbox:
    """Where and how the child runs: the MMAR it reads, the file it writes, its extra arguments and environment.

    user: whom the child runs as when it is not the server's user (for messages), else None.
    """

    mmar: Path
    out: Path
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    user: str | None


def scrubbed_env(home: Path) -> dict[str, str]:
    """The environment of a child that may run deployed code: nothing of the server's but how to find Python."""
    env = {k: v for k, v in os.environ.items() if k in _KEPT_ENV}
    # PYTHONSAFEPATH: the child's folder is not put on sys.path (Python 3.11+), so nothing there shadows a module.
    env.update(HOME=str(home), TMPDIR=str(home), PYTHONDONTWRITEBYTECODE="1", PYTHONNOUSERSITE="1", PYTHONSAFEPATH="1")
    return env


@contextlib.contextmanager
def code_sandbox(mmar_dir: Path, policy: CodePolicy, what: str) -> Iterator[Sandbox]:
    """A sandbox for a child that may import the MMAR's custom code; CodeRefused when the policy allows none.

    `what` names the run in refusals ("run 3"). The sandbox folder, outside the server's workspace, is removed
    afterwards. An MMAR without custom code is read where it is, by a child of the server's user.
    """
    code = custom_code(mmar_dir)
    ids = _target_ids(policy, what, code) if code else None
    scratch = Path(tempfile.mkdtemp(prefix="fedlearn-code-"))
    try:
        mmar = Path(mmar_dir)
        argv: list[str] = []
        if code:
            _refuse_links(Path(mmar_dir), what)
            mmar = scratch / "mmar"
            shutil.copytree(mmar_dir, mmar)
        if ids is not None:
            uid, gid = ids
            for path in (scratch, *scratch.rglob("*")):
                os.chown(path, uid, gid, follow_symlinks=False)
            argv = ["--run-as", f"{uid}:{gid}"]
        user = policy.run_as if ids is not None else None
        yield Sandbox(mmar, scratch / "initial_model.fl", argv, scrubbed_env(scratch), scratch, user)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _refuse_links(mmar_dir: Path, what: str) -> None:
    """A deployed MMAR holds its own files (archives cannot carry links): a link would be read with the server's
    rights while the child still has them, or handed to the child's user."""
    for path in (mmar_dir, *mmar_dir.rglob("*")):
        if path.is_symlink():
            raise CodeRefused(
                f"{what}: {path.relative_to(mmar_dir).as_posix() or '.'} is a symbolic link; "
                "a deployed MMAR holds its own files only"
            )


def _target_ids(policy: CodePolicy, what: str, code: list[str]) -> tuple[int, int] | None:
    """(uid, gid) to drop to, or None to run as the server's user (allowed only by the policy)."""
    if os.geteuid() != 0:
        if policy.allow_as_server_user:
            return None
        raise CodeRefused(
            f"{what} brings code ({shown(code)}) and this server cannot run it as another user (it does not run as "
            f"root), so it would run with the server's identity: deploy that MMAR to sites only, or allow it with "
            f'{{"allow_as_server_user": true}} in the server\'s {POLICY_FILE.as_posix()}'
        )
    try:
        return _user_ids(policy.run_as)
    except CodeRefused as e:
        raise CodeRefused(f"{what} brings code ({shown(code)}), and run_as of {policy.source}: {e}") from None


def run_child(
    box: Sandbox, module: str, args: list[str], timeout: float, cancel: threading.Event | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m module args` in the sandbox, in a process group of its own that is killed when it ends.

    subprocess.TimeoutExpired after `timeout` seconds, or as soon as `cancel` is set (the server stops).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args, *box.argv],
        env=box.env,
        cwd=box.cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = _communicate(proc, timeout, cancel)
    finally:
        # Whatever the child left behind in its group (it may have started processes) ends with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _communicate(proc: subprocess.Popen, timeout: float, cancel: threading.Event | None) -> tuple[str, str]:
    if cancel is None:
        return proc.communicate(timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:  # retried after a timeout, communicate loses no output
            return proc.communicate(timeout=min(_CANCEL_CHECK_S, max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            if cancel.is_set() or time.monotonic() >= deadline:
                raise


def take_output(path: Path, dest: Path) -> None:
    """Copy the child's output file to `dest`: a regular file only (never a link, a pipe or a device it placed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise CodeRefused(f"the child wrote no output file ({e.strerror})") from None
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise CodeRefused("the child's output is not a regular file")
        with open(dest, "wb") as out:
            shutil.copyfileobj(src, out, _COPY_CHUNK)


def drop_privileges(run_as: str, custom_dir: Path, modules: Sequence[str] | None = None) -> None:
    """In the child, before it imports deployed code: import the installed packages that code names (while the
    installation may still be read), then become uid:gid for good (no way back to root).

    modules: the archive's modules the child imports (installed_imports); default every file of custom_dir."""
    import_installed_dependencies(custom_dir, modules)
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


def installed_imports(custom_dir: Path, modules: Sequence[str] | None = None) -> list[str]:
    """The modules the code in `custom_dir` imports by absolute name that are installed on this host (found on
    sys.path without `custom_dir`, so never one of the archive's own), read from its source, never run.

    modules: the dotted names the child imports (a component's module): only their files, and those of the archive's
    modules they import in turn, are read (a name that is not the archive's is itself one to import); default: every
    file of custom_dir.
    """
    import importlib.util

    custom_dir = Path(custom_dir)
    own = {p.stem for p in custom_dir.glob("*.py")} | {p.name for p in custom_dir.iterdir() if p.is_dir()}
    if modules is None:
        names = [name for source in sorted(custom_dir.rglob("*.py")) for name in _imports_of(source)[0]]
    else:
        names = [m for m in modules if m.split(".")[0] not in own]
        names += [name for source in _sources_of(custom_dir, modules, own) for name in _imports_of(source)[0]]
    installed = []
    for name in dict.fromkeys(names):
        if name.split(".")[0] in own:
            continue
        try:
            found = importlib.util.find_spec(name.split(".")[0]) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            installed.append(name)
    return installed


def _imports_of(source: Path) -> tuple[list[str], list[str], bool]:
    """What a source file imports: absolute module names; the names `from X import y` may also mean (X.y, when y is
    a submodule); and whether it imports relatively. Nothing of a file that does not parse."""
    import ast

    names: list[str] = []
    members: list[str] = []
    relative = False
    try:
        tree = ast.parse(source.read_bytes(), filename=str(source))
    except (SyntaxError, ValueError, OSError):
        return names, members, relative
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            members += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            relative = True
    return names, members, relative


def _sources_of(custom_dir: Path, modules: Sequence[str], own: set[str]) -> list[Path]:
    """The archive's files that importing `modules` reads: theirs and, transitively, those of the archive's modules
    they import (every module of a package that imports relatively)."""
    queue = [f for name in modules if name.split(".")[0] in own for f in _module_files(custom_dir, name)]
    found: list[Path] = []
    while queue:
        source = queue.pop()
        if source in found:
            continue
        found.append(source)
        names, members, relative = _imports_of(source)
        queue += [
            f for name in (*names, *members) if name.split(".")[0] in own for f in _module_files(custom_dir, name)
        ]
        if relative and source.parent != custom_dir:
            queue += sorted(source.parent.rglob("*.py"))
    return sorted(found)


def _module_files(custom_dir: Path, name: str) -> list[Path]:
    """The files importing `name` from custom_dir runs: each package's __init__.py on the way, and the module's."""
    parts = name.split(".")
    files = []
    for depth in range(1, len(parts) + 1):
        base = custom_dir.joinpath(*parts[:depth])
        files += [p for p in (base.parent / f"{base.name}.py", base / "__init__.py") if p.is_file()]
    return files


def import_installed_dependencies(custom_dir: Path, modules: Sequence[str] | None = None) -> None:
    """Import, before the child changes user, the installed packages the archive's code imports.

    They are this host's installation, not the archive's; imported now, they work after the change of user even
    where that user cannot read the installation (a Python under a private home folder), including the standard
    library modules they pull in. A module that fails to import is left for the archive's code to report.
    """
    import importlib

    for name in installed_imports(custom_dir, modules):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - reported by the archive's own import, after the change of user
            continue
