"""What every fedadmin command shares: the global options, targets, confirmation, rendering and exit codes.

Commands talk to the server only through the Python session API (fedadmin.session): `open_session`, and
`run_remote`/`outcome_of`/`emit_replies` over it; they render what it returns.

A command computes a result object with a `command` name, `ok`, `to_json()` and Rich's `__rich__()`,
and hands it to `emit`, which prints it and exits 1 when it is not ok. Groups use `ConsoleGroup`, so
any exception leaves as a one-line error (exit 1, or the exception's `exit_code`, e.g. 3 for a
connection failure), usage errors exit 2 (arguments the command's declaration in fedcommon.commands
refuses included), and tracebacks appear only under --debug.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import click

from fedcommon.commands import TARGET_RE, ArgumentError
from fedcommon.commands import command as declared

if TYPE_CHECKING:
    from fedadmin.session import Session
    from fedcommon.outcome import CommandOutcome

_PATH_KEY = "fedadmin.command_path"
F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3


@dataclass(frozen=True)
class ConsoleOptions:
    """The global options, stored on click's ctx.obj for every command."""

    kit: Path | None = None
    json: bool = False
    yes: bool = False
    timeout: float | None = None
    debug: bool = False

    def as_args(self) -> list[str]:
        """The command-line arguments that reproduce these options (for batch and console lines)."""
        args = ["--kit", str(self.kit)] if self.kit is not None else []
        args += ["--json"] if self.json else []
        args += ["--yes"] if self.yes else []
        args += ["--reply-timeout", repr(self.timeout)] if self.timeout is not None else []
        return args + (["--debug"] if self.debug else [])


class Result(Protocol):
    """What a command computes: rendered as one JSON object or by Rich, never printed by the command.

    A result may also have `ok` (default true); emit exits 1 after printing one that is not ok.
    """

    command: str

    def to_json(self) -> dict[str, Any]: ...

    def __rich__(self) -> Any: ...


def emit(options: ConsoleOptions, result: Result, whole_lines: bool = False) -> None:
    """Print result as one JSON object (command, ok, fields) under --json, else through Rich; exit 1 if not ok.

    The human output shows every remote string escaped (fedadmin.render.shown); JSON carries them exactly.
    whole_lines: long lines are printed whole, never wrapped or cut at the terminal's width (log lines).
    """
    ok = bool(getattr(result, "ok", True))
    if options.json:
        click.echo(json.dumps({"command": result.command, "ok": ok, **result.to_json()}))
    else:
        from fedadmin import render  # only the human output pays for importing Rich

        render.show(result, **({"soft_wrap": True, "highlight": False} if whole_lines else {}))
    if not ok:
        raise click.exceptions.Exit(EXIT_FAILED)


class CommandFailed(click.ClickException):
    """A command failed (exit 1, or 3 for connection failures); shown on stderr, or as JSON under --json."""

    def __init__(self, command: str, message: str, as_json: bool, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.command = command
        self.as_json = as_json
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        """Print the failure for the operator."""
        if self.as_json:
            click.echo(json.dumps(_failure_json(self.command, self.message)), file=file)
        else:
            from fedcommon.escape import for_terminal  # the message may quote a site's or the server's words

            click.echo(f"Error: {for_terminal(self.message)}", err=file is None, file=file)


def _failure_json(command: str, message: str) -> dict[str, Any]:
    return {"command": command, "ok": False, "error": message, "replies": []}


class ConsoleGroup(click.Group):
    """A command group that records which command runs and, at the root, maps exceptions to exit codes.

    `lazy_commands` maps a command name to "module:attribute": the module is imported only when that command
    runs (or help lists it), so a one-shot call does not pay for every other command's imports.
    """

    group_class = type

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            import importlib

            module, _, attribute = self.lazy_commands[cmd_name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if ctx.parent is None:
            args = self._global_options_first(ctx, args)
        return super().parse_args(ctx, args)

    def _global_options_first(self, ctx: click.Context, args: list[str]) -> list[str]:
        """`fedadmin abort all --yes` as `fedadmin --yes abort all`: global options given after the command move
        before it, unless the command has an option of that name or passes its arguments on (shell)."""
        i = 0
        while i < len(args) and args[i].startswith("-") and args[i] != "--":
            i += 1 + (0 if "=" in args[i] else GLOBAL_OPTIONS.get(args[i], 0))
        if i >= len(args) or not any(a.split("=", 1)[0] in GLOBAL_OPTIONS for a in args[i + 1 :]):
            return args
        command = self.get_command(ctx, args[i])
        if command is None or command.context_settings.get("ignore_unknown_options"):
            return args
        own = _option_names(ctx, command)
        moved: list[str] = []
        rest: list[str] = []
        j = i + 1
        while j < len(args):
            name = args[j].split("=", 1)[0]
            if args[j] == "--":
                rest += args[j:]
                break
            if name in GLOBAL_OPTIONS and name not in own:
                take = 1 + (0 if "=" in args[j] else GLOBAL_OPTIONS[name])
                moved += args[j : j + take]
                j += take
            else:
                rest.append(args[j])
                j += 1
        return [*args[:i], *moved, args[i], *rest]

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        typed = click.utils.make_str(args[0]) if args else ""
        if typed and not typed.startswith("-") and self.get_command(ctx, typed) is None:
            import difflib

            close = difflib.get_close_matches(typed, self.list_commands(ctx), n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            ctx.fail(f"No such command {typed!r}.{hint} `{ctx.command_path} --help` lists them.")
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            ctx.meta.setdefault(_PATH_KEY, []).append(command.name)
        return name, command, rest

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.parent is not None:
            return super().invoke(ctx)
        try:
            return super().invoke(ctx)
        except (click.UsageError, ArgumentError) as exc:
            # An argument the command's declaration refuses is a usage error, wherever it was checked.
            usage = exc if isinstance(exc, click.UsageError) else click.UsageError(str(exc), ctx)
            if _wants_json(ctx):
                click.echo(json.dumps(_failure_json(command_path(ctx), usage.format_message())))
            if usage is exc:
                raise
            raise usage from None
        except click.Abort:
            if _wants_json(ctx):
                click.echo(json.dumps(_failure_json(command_path(ctx), "cancelled")))
            raise
        except KeyboardInterrupt:
            if _wants_json(ctx):
                click.echo(json.dumps(_failure_json(command_path(ctx), "interrupted")))
            raise click.Abort() from None
        except (click.ClickException, click.exceptions.Exit):
            raise
        except Exception as exc:
            options = ctx.find_object(ConsoleOptions) or ConsoleOptions()
            if options.debug:
                raise
            code = getattr(exc, "exit_code", EXIT_FAILED)
            code = code if isinstance(code, int) else EXIT_FAILED
            raise CommandFailed(command_path(ctx), str(exc) or type(exc).__name__, options.json, code) from exc


# The root's options, and how many values each takes: accepted after the command too.
GLOBAL_OPTIONS = {"--kit": 1, "--json": 0, "--yes": 0, "-y": 0, "--reply-timeout": 1, "--debug": 0}


def _option_names(ctx: click.Context, command: click.Command) -> set[str]:
    """Every option name `command` declares, and for a group its subcommands' too."""
    names = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    if isinstance(command, click.Group):
        for sub in command.list_commands(ctx):
            found = command.get_command(ctx, sub)
            if found is not None:
                names |= _option_names(ctx, found)
    return names


def command_path(ctx: click.Context) -> str:
    """The running command as typed after `fedadmin`, e.g. "poc prepare"."""
    return " ".join(ctx.find_root().meta.get(_PATH_KEY, []))


def _wants_json(ctx: click.Context) -> bool:
    options = ctx.find_object(ConsoleOptions)
    return options.json if options is not None else bool(ctx.params.get("as_json"))


def check_targets(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    for target in value:
        if not TARGET_RE.fullmatch(target):
            raise click.BadParameter(
                f"{target!r} is not a target: use server, client, all or a site name", ctx=ctx, param=param
            )
    return value


def targets_argument(required: bool) -> Callable[[F], F]:
    """The TARGET... argument: server, client (every site), all (server and every site) or site names."""
    return click.argument(
        "targets",
        nargs=-1,
        required=required,
        metavar="TARGET...",
        callback=check_targets,
        shell_complete=complete_targets,
    )


def complete_targets(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of a target: server, client, all and the site names the last `status` saw."""
    from fedadmin import completion  # only when the shell asks

    return completion.complete_targets(ctx, param, incomplete)


def run_option(what: str, default: str = "the current run (set-run)") -> Callable[[F], F]:
    """The --run N option of a command that acts on one run (passed as `run_number`, None when not given)."""
    return click.option(
        "--run",
        "run_number",
        type=click.IntRange(min=1),
        default=None,
        help=f"{what}  [default: {default}]",
    )


def confirm(options: ConsoleOptions, question: str) -> None:
    """Ask before a destructive command; --yes skips it; without a terminal, refuse (exit 2) rather than hang."""
    if options.yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{question} Not asked without a terminal: pass --yes to proceed.")
    click.confirm(question, abort=True, err=True)


def open_session(options: ConsoleOptions) -> Session:
    """A Session (fedadmin.session) with the --kit (or FEDADMIN_KIT) admin kit and --reply-timeout."""
    if options.kit is None:
        raise click.UsageError("no admin kit: pass --kit DIR (the admin's participant folder) or set FEDADMIN_KIT")
    if not options.kit.is_dir():
        # A mistyped folder is a usage error (exit 2), not a server that cannot be reached (exit 3).
        raise click.UsageError(
            f"admin kit {options.kit}: no such folder (--kit or FEDADMIN_KIT names the admin's "
            "participant folder, the one holding startup/)"
        )
    from fedadmin.session import Session

    return Session(options.kit, options.timeout)


def run_remote(
    options: ConsoleOptions, command: str, targets: tuple[str, ...] | list[str], args: dict[str, Any] | None = None
) -> CommandOutcome:
    """Execute one command on the server for targets (Session.execute); returns every target's reply.

    The arguments are checked with the command's declaration (fedcommon.commands) before anything else:
    one it refuses is a usage error (exit 2), and nothing is sent.
    """
    declared(command).check_args(args or {})
    with open_session(options) as session:
        return session.execute(command, list(targets), args or {})


def outcome_of(options: ConsoleOptions, call: Callable[[Session], Any]) -> Any:
    """What call(session) returns, or, when the command failed at a target or was refused, the result the failure
    carries (rendered like any other: the console shows every target's reply and exits 1)."""
    from fedadmin.errors import CommandFailed

    with open_session(options) as session:
        try:
            return call(session)
        except CommandFailed as failed:
            return failed.result


def emit_remote(
    options: ConsoleOptions,
    command: str,
    targets: tuple[str, ...] | list[str],
    args: dict[str, Any] | None = None,
) -> None:
    """Execute a command and print its per-target replies as a table or JSON; exit 1 if any failed."""
    from fedadmin.replies import RepliesResult

    emit(options, RepliesResult(run_remote(options, command, targets, args)))


def emit_replies(options: ConsoleOptions, call: Callable[[Session], CommandOutcome]) -> None:
    """Run a Session method that answers one reply per target and print them; exit 1 if any failed."""
    from fedadmin.replies import RepliesResult

    emit(options, RepliesResult(outcome_of(options, call)))
