"""Read-only shell commands for operators (ls, cat, head, tail, grep, pwd), confined to a workspace."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ALLOWED = ("cat", "grep", "head", "ls", "pwd", "tail")
# Single-letter flags each command accepts; they may be combined ("-la", "-in").
_FLAGS = {"ls": "lahR", "grep": "invcrEF", "cat": "", "pwd": "", "head": "", "tail": ""}
_COUNT = re.compile(r"\+?\d{1,9}")
_SECRET_SUFFIXES = (".key", ".pem")
_SECRET_DIR = "startup"
_READ_CHUNK = 65536


class ShellRefused(ValueError):
    """A shell command that is not allowed; the message names what was refused."""


@dataclass
class ShellResult:
    """What the command wrote (stdout and stderr together), whether it was cut, and its exit code."""

    stdout: str
    truncated: bool
    exit_code: int


@dataclass
class _Parsed:
    flags: list[str]
    operands: list[str]


def run_shell(argv: list[str], workspace: Path, timeout: float = 10.0, max_output: int = 1_048_576) -> ShellResult:
    """Run one allowed read-only command in `workspace`; raise ShellRefused before running anything refused."""
    root = Path(os.path.realpath(workspace))
    command, final = _check(argv, root)
    exe = shutil.which(command)
    if exe is None:
        raise ShellRefused(f"shell: {command!r} is not installed on this machine")
    return _execute([exe, *final], root, command, timeout, max_output)


def _check(argv: list[str], root: Path) -> tuple[str, list[str]]:
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ShellRefused("shell: expected a command and its arguments as a list of strings")
    command, args = argv[0], argv[1:]
    if command not in ALLOWED:
        raise ShellRefused(f"shell: {command!r} is not allowed (allowed: {', '.join(ALLOWED)})")
    if any("\0" in a for a in args):
        raise ShellRefused("shell: arguments must not contain NUL characters")
    parsed = _parse(command, args)
    if command == "pwd":
        if parsed.operands:
            raise ShellRefused("shell: pwd takes no arguments")
        return command, []
    if command == "grep":
        if not parsed.operands:
            raise ShellRefused("shell: grep needs a pattern")
        pattern, paths = parsed.operands[0], parsed.operands[1:]
        for p in paths:
            _check_path(p, root, readable=True)
        # Recursion never descends into key folders or key files; -r does not follow symlinks.
        guard = ["--exclude-dir=startup", "--exclude=*.[kK][eE][yY]", "--exclude=*.[pP][eE][mM]"]
        return command, [*parsed.flags, *guard, "-e", pattern, "--", *paths]
    for p in parsed.operands:
        _check_path(p, root, readable=command != "ls")
    return command, [*parsed.flags, "--", *parsed.operands]


def _parse(command: str, args: list[str]) -> _Parsed:
    flags: list[str] = []
    operands: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            operands.extend(args[i + 1:])
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
        elif command in ("head", "tail"):
            i = _parse_count(command, args, i, flags)
        else:
            allowed = _FLAGS[command]
            letters = arg[1:]
            if arg.startswith("--") or not letters or any(c not in allowed for c in letters):
                shown = ", ".join(f"-{c}" for c in sorted(allowed)) or "none"
                raise ShellRefused(f"shell: flag {arg!r} is not allowed for {command} (allowed: {shown})")
            flags.extend(f"-{c}" for c in letters)
        i += 1
    return _Parsed(flags, operands)


def _parse_count(command: str, args: list[str], i: int, flags: list[str]) -> int:
    arg = args[i]
    if arg == "-n":
        if i + 1 >= len(args):
            raise ShellRefused(f"shell: {command} -n needs a number of lines")
        value, i = args[i + 1], i + 1
    elif arg.startswith("-n"):
        value = arg[2:]
    else:
        raise ShellRefused(f"shell: flag {arg!r} is not allowed for {command} (allowed: -n N)")
    if not _COUNT.fullmatch(value) or (value.startswith("+") and command == "head"):
        raise ShellRefused(f"shell: {command} -n needs a number of lines, got {value!r}")
    flags.extend(["-n", value])
    return i


def _check_path(given: str, root: Path, readable: bool) -> None:
    resolved = Path(os.path.realpath(os.path.join(root, given)))
    if resolved != root and root not in resolved.parents:
        raise ShellRefused(f"shell: path {given!r} is outside the workspace")
    if readable and (_is_secret(Path(given)) or _is_secret(resolved.relative_to(root))):
        raise ShellRefused(f"shell: {given!r} is a key or certificate (or in a startup/ folder) and cannot be read")


def _is_secret(path: Path) -> bool:
    return path.name.lower().endswith(_SECRET_SUFFIXES) or _SECRET_DIR in path.parts


def _execute(argv: list[str], cwd: Path, command: str, timeout: float, max_output: int) -> ShellResult:
    env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    out = bytearray()
    over = threading.Event()

    def pump() -> None:
        while chunk := proc.stdout.read1(_READ_CHUNK):
            out.extend(chunk[: max_output + 1 - len(out)])
            if len(out) > max_output:
                over.set()
                _kill(proc)
                return

    reader = threading.Thread(target=pump, name=f"shell-{command}", daemon=True)
    reader.start()
    reader.join(timeout)
    timed_out = reader.is_alive()
    if timed_out:
        _kill(proc)
        reader.join(5)
    proc.stdout.close()
    try:
        code = proc.wait(5)
    except subprocess.TimeoutExpired:  # closed its output but lingers
        _kill(proc)
        code = proc.wait()
    truncated = over.is_set()
    text = bytes(out[:max_output]).decode("utf-8", errors="replace")
    if timed_out:
        log.warning("shell %s timed out after %gs; killed", command, timeout)
        text += f"\nshell: {command!r} timed out after {timeout:g}s and was killed\n"
        code = 124
    elif truncated:
        code = 0 if code < 0 else code  # killed by us for its size, not failed
    return ShellResult(stdout=text, truncated=truncated, exit_code=code)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
