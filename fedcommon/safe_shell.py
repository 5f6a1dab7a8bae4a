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
_SHELL_SYNTAX = frozenset(";|&$`<>\n")
_KEY_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_KEY_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY-----")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
# PEM wraps at 64 characters (OpenSSH at 70); a 64-character hex digest has no upper case and is kept.
_WIDE_BASE64 = 60
REDACTED = "[private key redacted]"


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
            operands.extend(args[i + 1 :])
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
    # Arguments never meet a shell, so these are harmless here; a path holding them is still an attempt
    # at chaining, piping or substitution, and the operator should hear so rather than "no such file".
    syntax = sorted(set(given) & _SHELL_SYNTAX)
    if syntax:
        raise ShellRefused(
            f"shell: path {given!r} holds shell syntax ({' '.join(syntax)!s}): shell runs one command with plain "
            "arguments; no chaining, pipes, redirection or substitution"
        )
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
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
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
    text = _redact_private_keys(bytes(out[:max_output]).decode("utf-8", errors="replace"))
    if timed_out:
        log.warning("shell %s timed out after %gs; killed", command, timeout)
        text += f"\nshell: {command!r} timed out after {timeout:g}s and was killed\n"
        code = 124
    elif truncated:
        code = 0 if code < 0 else code  # killed by us for its size, not failed
    return ShellResult(stdout=text, truncated=truncated, exit_code=code)


def _redact_private_keys(text: str) -> str:
    """`text` with private-key material replaced by REDACTED lines, whatever the command cut out of it.

    Defence in depth behind the path rules, for a key copied under another name: a PEM block (or its
    start when the output cap cut it, or its end after `tail`), and runs of base64 lines that hold a
    PEM-wide line (`grep -v -- -----` drops the markers but prints the body).
    """
    lines = text.split("\n")
    hide = _pem_blocks(lines)
    _hide_base64_runs(lines, hide)
    # One REDACTED line stands for each block of hidden lines.
    kept = [REDACTED if hide[i] else line for i, line in enumerate(lines) if not (hide[i] and i and hide[i - 1])]
    redacted = "\n".join(kept)
    return redacted + "\n" if text.endswith("\n") and not redacted.endswith("\n") else redacted


def _pem_blocks(lines: list[str]) -> list[bool]:
    """Per line, whether it belongs to a private-key block: BEGIN to END, to the end, or body lines to END."""
    hide = [False] * len(lines)
    in_key = False
    for i, line in enumerate(lines):
        begins = [m.start() for m in _KEY_BEGIN.finditer(line)]
        ends = [m.start() for m in _KEY_END.finditer(line)]
        hide[i] = in_key or bool(begins or ends)
        if ends and not in_key and (not begins or ends[0] < begins[0]):
            j = i - 1  # an END whose BEGIN was cut off: its body lines are just above
            while j >= 0 and not hide[j] and _base64_content(lines[j]) is not None:
                hide[j], j = True, j - 1
        if begins or ends:
            in_key = bool(begins) and (not ends or begins[-1] > ends[-1])
    return hide


def _hide_base64_runs(lines: list[str], hide: list[bool]) -> None:
    """Hide each run of consecutive base64 lines that holds one as wide as a PEM body line."""
    run: list[str] = []
    for i in range(len(lines) + 1):
        content = _base64_content(lines[i]) if i < len(lines) and not hide[i] else None
        if content is not None:
            run.append(content)
            continue
        if any(_looks_like_key_line(c) for c in run):
            hide[i - len(run) : i] = [True] * len(run)
        run = []


def _base64_content(line: str) -> str | None:
    """The line's text after any "name:" prefix (grep's), when it is all base64; else None."""
    content = line.rpartition(":")[2].strip()
    return content if content and _BASE64.fullmatch(content) else None


def _looks_like_key_line(content: str) -> bool:
    return (
        len(content) >= _WIDE_BASE64
        and any(c.isupper() for c in content)
        and any(c.islower() for c in content)
        and any(c.isdigit() for c in content)
    )


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
