"""Every admin command, declared once: targets, site topic, rights, arguments (docs/admin-protocol.md).

The console checks a command's arguments with `Command.check_args` before it sends them, the server
checks them again (it trusts no console), and a site decodes and checks what it is sent with
`Command.decode_request`. The server's catalogue, its authorization policy, a site's local policy and
the console's command list all read `COMMANDS`; nothing else lists command names.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedcommon.admin_defs import body_text

# ---- the vocabulary the console, the server and the sites share -------------------------------------

SERVER = "server"
# Targets that stand for a set of participants; any other target is one participant's name.
GROUP_TARGETS = ("server", "client", "all")
TARGET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")

# Seconds the server waits for sites' replies by default, and at most (set-timeout, --timeout).
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 3600.0
# A site's Retrieve is held up to this long (a command reaches an idle site in milliseconds, and an idle
# site costs one call a minute); the server holds no Retrieve longer, whatever a site asks.
LONG_POLL_S = 60.0
# A site is connected while a Retrieve of its is in flight or one ended this recently.
CONNECTED_WINDOW_S = 45.0
MAX_GPUS = 64  # ranks on one node
MAX_NAME = 200
# What one command may name: more targets than this are refused before any is resolved.
MAX_TARGETS = 1000
# The longest a command may keep the server waiting for sites' replies, per role: a member's status to a silent
# site cannot hold a server thread for an hour.
MAX_TIMEOUT_BY_ROLE = {"project_admin": MAX_TIMEOUT_S, "org_admin": 600.0, "lead": 600.0, "member": 60.0}
# Bounds on what the admin and agent planes take in (bytes of JSON text).
MAX_ARGS_BYTES = 256 << 10
MAX_SITE_REPLY_BYTES = 8 << 20
MAX_RESULT_BYTES = 64 << 10
MAX_ERROR_CHARS = 16 << 10
# A deployed archive's signature (fedcommon.archive_signature): an ECDSA P-256 signature in DER is at most 72 bytes
# (room for larger curves, nothing more), travelling as base64; an admin certificate is about 800 bytes of PEM.
MAX_SIGNATURE_BYTES = 256
MAX_SIGNATURE_TEXT = 4 * -(-MAX_SIGNATURE_BYTES // 3)
MAX_CERTIFICATE_BYTES = 8 << 10


class Topic:
    """The seed's admin topics: what a site's request processors subscribe to."""

    CHECK_STATUS = "check_status"
    DEPLOY = "deploy"
    START = "start"
    START_MGPU = "start_mgpu"
    ABORT = "abort"
    SYS_INFO = "sys_info"
    SHELL = "shell"
    DELETE_RUN = "delete_run_number"
    RESTART = "restart"
    SHUTDOWN = "shutdown"
    VALIDATE = "validate"
    LOGS = "logs"


class ResultTopic:
    """What a site sends on its own (SendResult)."""

    PROGRESS = "progress"
    TRAINING_ENDED = "training_ended"
    ALL = (PROGRESS, TRAINING_ENDED)


class Right:
    """The rights of the server's authorization policy; a command needs any one of its rights."""

    VIEW = "view"
    TRAIN = "train"
    OPERATE = "operate"
    SHELL = "shell"
    # Deploying an MMAR that brings code (files under custom/) needs this besides the command's own right: such an
    # archive runs its sender's code at every participant it reaches (NVFlare's byoc).
    CODE = "code"
    ALL = (VIEW, TRAIN, OPERATE, SHELL, CODE)


class Targets:
    """Which targets a command takes."""

    ALL = "all"  # any; none given means all (the server and every connected site)
    SERVER = "server"  # the server alone; implied
    REQUIRED = "required"  # any, at least one
    ONE = "one"  # one: the server or a site's name


class ClientStatus:
    """A site's training status codes and their words, as in the seed (fed_learn.client.client_status)."""

    TRAINING_NOT_STARTED = 0
    TRAINING_STARTING = 1
    TRAINING_STARTED = 2
    TRAINING_STOPPED = 3
    TRAINING_EXCEPTION = 4

    status_messages = {
        TRAINING_NOT_STARTED: "training not started",
        TRAINING_STARTING: "training starting",
        TRAINING_STARTED: "training started",
        TRAINING_STOPPED: "training stopped",
        TRAINING_EXCEPTION: "training exception",
    }


def wait_seconds(value: float, longest: float) -> float:
    """A wait asked for over the wire, as seconds in [0, longest]: NaN, negative or infinite ask for none."""
    return min(value, longest) if math.isfinite(value) and value > 0 else 0.0


def get_status_message(status: int) -> str:
    """The words for a status code; unknown codes are named as such."""
    return ClientStatus.status_messages.get(status, f"unknown status {status}")


# ---- argument checks: each returns the value to use, or raises ArgumentError naming the argument ----


class ArgumentError(ValueError):
    """An argument that is missing, of the wrong kind or out of range; the message names it."""


def _whole(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        wanted = f"a whole number >= {low}" if high is None else f"a whole number from {low} to {high}"
        raise ArgumentError(f"{name} must be {wanted}, got {value!r}")
    return value


MAX_RUN_NUMBER = 999_999_999  # a run's folder name and a job's id stay short; sites report runs up to this


def run_number(value: Any, name: str = "run_number") -> int:
    """A run number: a whole number from 1 to MAX_RUN_NUMBER."""
    number = _whole(name, value, 1)
    if number > MAX_RUN_NUMBER:
        raise ArgumentError(f"{name} must be at most {MAX_RUN_NUMBER}, got {number}")
    return number


def count(value: Any, name: str = "count") -> int:
    """A count of something: a whole number >= 1."""
    return _whole(name, value, 1)


def gpu_number(value: Any, name: str = "gpu_number") -> int:
    """Ranks on one node: 1 to MAX_GPUS."""
    return _whole(name, value, 1, MAX_GPUS)


def seconds(value: Any, name: str = "seconds") -> float:
    """A finite number of seconds in (0, MAX_TIMEOUT_S]."""
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not valid or not 0 < value <= MAX_TIMEOUT_S:
        raise ArgumentError(f"{name} must be a number in (0, {MAX_TIMEOUT_S:g}], got {value!r}")
    return float(value)


def participant_name(value: Any, name: str = "site") -> str:
    """A participant's name: a non-empty string of at most MAX_NAME characters, surrounding blanks dropped."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME:
        raise ArgumentError(f"{name} must be a name, got {value!r}")
    return value.strip()


_SHA256 = re.compile(r"[0-9a-f]{64}")


def blob_id(value: Any, name: str = "blob_id") -> str:
    """An uploaded blob's id: a lowercase sha256 hex digest."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ArgumentError(f"{name} {value!r} is not a sha256 hex digest (64 of 0-9a-f)")
    return value


def byte_size(value: Any, name: str = "size") -> int:
    """A size in bytes: a whole number >= 0."""
    return _whole(name, value, 0)


def text_of_at_most(limit: int) -> Callable[[Any, str], str]:
    """The check of a string of at most `limit` characters."""

    def check(value: Any, name: str) -> str:
        if not isinstance(value, str) or len(value) > limit:
            got = f"{len(value)} characters" if isinstance(value, str) else repr(value)[:100]
            raise ArgumentError(f"{name} must be text of at most {limit} characters, got {got}")
        return value

    return check


def argv(value: Any, name: str = "argv") -> list[str]:
    """A command line as a non-empty list of strings (never a shell string)."""
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise ArgumentError(f"{name} must be a non-empty list of strings, got {value!r}")
    return list(value)


MAX_JOB_NAME = 100
_JOB_NAME = re.compile(rf"[^\x00-\x1f\x7f]{{1,{MAX_JOB_NAME}}}")


def job_name(value: Any, name: str = "name") -> str:
    """A job's name as its submitter gave it: 1 to MAX_JOB_NAME characters, no control characters."""
    if not isinstance(value, str) or not _JOB_NAME.fullmatch(value.strip()):
        raise ArgumentError(f"{name} must be 1 to {MAX_JOB_NAME} characters without control characters, got {value!r}")
    return value.strip()


def site_names(value: Any, name: str = "sites") -> list[str]:
    """Site names (not server, client or all), each once, at most MAX_TARGETS."""
    if not isinstance(value, list) or not value or len(value) > MAX_TARGETS:
        raise ArgumentError(f"{name} must be a list of 1 to {MAX_TARGETS} site names, got {str(value)[:100]}")
    sites = []
    for item in value:
        if not isinstance(item, str) or not TARGET_RE.fullmatch(item) or item in GROUP_TARGETS:
            raise ArgumentError(f"{name}: {str(item)[:100]!r} is not a site's name")
        if item not in sites:
            sites.append(item)
    return sites


def gpus_per_site(value: Any, name: str = "gpus") -> int:
    """GPUs a job asks of each of its sites: 0 (none asked) to MAX_GPUS."""
    return _whole(name, value, 0, MAX_GPUS)


@dataclass(frozen=True)
class Arg:
    """One argument: its name, its check, and whether it must be given."""

    name: str
    check: Callable[[Any, str], Any]
    required: bool = True
    whole: bool = False  # a whole number: a header's text is read as one


def _log_query(args: dict[str, Any]) -> dict[str, Any]:
    from fedcommon.logs import LogQuery, LogRequestError

    try:
        return LogQuery.from_args(args).to_args()
    except LogRequestError as e:
        raise ArgumentError(str(e)) from None


def _owner_needs_site(args: dict[str, Any]) -> dict[str, Any]:
    if "owner" in args and "site" not in args:
        raise ArgumentError("owner needs site: validate SITE OWNER shows one cell")
    return args


@dataclass(frozen=True)
class Command:
    """One admin command as every role sees it.

    args: what the operator passes (console → server); site_args: what a site's request carries, in
    headers, or as one JSON object in the body when `site_body` is set. `check` is a check over the
    whole argument object that runs after the per-argument ones (arguments that depend on each other).
    """

    name: str
    summary: str
    targets: str
    rights: tuple[str, ...]
    topic: str | None = None
    args: tuple[Arg, ...] = ()
    site_args: tuple[Arg, ...] = ()
    site_body: bool = False
    check: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    polled: bool = False  # consoles poll it (status --watch, wait, logs --follow): logged at debug when ok
    console: bool = True  # a `fedadmin` command of the same name (upload is an RPC the console's deploy makes)
    follows: str | None = None  # a site's local policy that denies this other command denies this one too

    def check_args(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The operator's arguments, checked; ArgumentError names the first that is wrong."""
        return self._checked(self.args, args, self.check)

    def check_site_args(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """What a site is sent, checked the same way on the server before it leaves and at the site."""
        return self._checked(self.site_args, args, None)

    def encode_request(self, site_args: Mapping[str, Any]) -> tuple[dict[str, str], str]:
        """(headers, body) of a site's request carrying `site_args` (checked here)."""
        checked = self.check_site_args(site_args)
        if self.site_body:
            return {}, json.dumps(checked)
        return {k: str(v) for k, v in checked.items()}, ""

    def decode_request(self, headers: Mapping[str, str], body: str | bytes) -> dict[str, Any]:
        """The checked site_args of a request as a site receives it; ArgumentError names what is wrong."""
        if self.site_body:
            try:
                data = json.loads(body_text(body) or "{}")
            except ValueError:
                data = None
            if not isinstance(data, dict):
                names = [a.name for a in self.site_args if a.name != "*"]
                holding = f" with {', '.join(names)}" if names else ""
                raise ArgumentError(f"{self.topic}: the request body must be a JSON object{holding}")
            return self.check_site_args(data)
        values: dict[str, Any] = {}
        for arg in self.site_args:
            raw = headers.get(arg.name)
            if raw is not None:
                values[arg.name] = int(raw) if arg.whole and re.fullmatch(r"-?[0-9]{1,20}", raw) else raw
        return self.check_site_args(values)

    def _checked(
        self,
        declared: tuple[Arg, ...],
        args: Mapping[str, Any],
        check: Callable[[dict[str, Any]], dict[str, Any]] | None,
    ) -> dict[str, Any]:
        if not isinstance(args, Mapping):
            raise ArgumentError(f"{self.name}: arguments must be an object, got {type(args).__name__}")
        if declared and declared[0].name == "*":  # one check over the whole object
            return declared[0].check(dict(args), self.name)
        known = {a.name for a in declared}
        unknown = sorted(str(k) for k in args if k not in known)
        if unknown:
            takes = ", ".join(sorted(known)) or "no arguments"
            raise ArgumentError(f"{self.name} takes no {', '.join(map(repr, unknown))} (it takes {takes})")
        out: dict[str, Any] = {}
        for arg in declared:
            value = args.get(arg.name)
            if value is None:
                if arg.required:
                    raise ArgumentError(f"{self.name} needs {arg.name}")
                continue
            out[arg.name] = arg.check(value, arg.name)
        return check(out) if check is not None else out


def _logs_args(args: dict[str, Any], name: str) -> dict[str, Any]:
    number = args.get("run_number")
    query = _log_query({k: v for k, v in args.items() if k != "run_number"})
    return {**query, "run_number": run_number(number)} if number is not None else query


_RUN = Arg("run_number", run_number, whole=True)
_OPTIONAL_RUN = Arg("run_number", run_number, required=False, whole=True)
_LOGS = (Arg("*", _logs_args),)

_DECLARED = (
    Command(
        "status",
        "the server's run and every site's training status",
        Targets.ALL,
        (Right.VIEW,),
        Topic.CHECK_STATUS,
        polled=True,
    ),
    Command(
        "set-run",
        "choose the run number that deploy, start and abort act on",
        Targets.SERVER,
        (Right.TRAIN,),
        args=(_RUN,),
    ),
    Command(
        "upload",
        "store an MMAR archive at the server (the console's deploy sends it)",
        Targets.SERVER,
        (Right.TRAIN,),
        console=False,
    ),
    Command(
        "deploy",
        "install an uploaded MMAR as the current run (or run_number)",
        Targets.REQUIRED,
        (Right.TRAIN,),
        Topic.DEPLOY,
        args=(Arg("blob_id", blob_id), _OPTIONAL_RUN),
        # The archive's signature and its signer's certificate: optional here so that a site refuses a request
        # without them in its own words ("deploy refused: unsigned archive"); it always refuses one.
        site_args=(
            _RUN,
            Arg("blob_id", blob_id),
            Arg("sha256", blob_id),
            Arg("size", byte_size, whole=True),
            Arg("signature", text_of_at_most(MAX_SIGNATURE_TEXT), required=False),
            Arg("signer_certificate", text_of_at_most(MAX_CERTIFICATE_BYTES), required=False),
        ),
    ),
    Command(
        "start",
        "start training the current run (or run_number)",
        Targets.REQUIRED,
        (Right.TRAIN,),
        Topic.START,
        args=(_OPTIONAL_RUN,),
        site_args=(_RUN,),
    ),
    # A site bounds the ranks it is sent by its own GPUs (or CPUs), not by MAX_GPUS.
    Command(
        "start-mgpu",
        "start training the current run (or run_number) with one rank per GPU",
        Targets.REQUIRED,
        (Right.TRAIN,),
        Topic.START_MGPU,
        args=(Arg("gpu_number", gpu_number), _OPTIONAL_RUN),
        site_args=(_RUN, Arg("gpu_number", count, whole=True)),
    ),
    Command(
        "abort",
        "stop training (the current run, or run_number); `abort server` aborts the sites first",
        Targets.REQUIRED,
        (Right.TRAIN, Right.OPERATE),
        Topic.ABORT,
        args=(_OPTIONAL_RUN,),
        site_args=(_OPTIONAL_RUN,),
    ),
    Command(
        "validate",
        "the cross-site validation matrix, or one cell of it",
        Targets.SERVER,
        (Right.VIEW,),
        args=(
            _OPTIONAL_RUN,
            Arg("site", participant_name, required=False),
            Arg("owner", participant_name, required=False),
        ),
        check=_owner_needs_site,
    ),
    Command(
        "run-validation",
        "cross-site validation of a completed run, at sites (the console's validate --start)",
        Targets.REQUIRED,
        (Right.TRAIN,),
        Topic.VALIDATE,
        args=(_OPTIONAL_RUN,),
        site_args=(_RUN,),
        console=False,
    ),
    Command("sysinfo", "host, CPU, memory, disk and GPUs", Targets.ALL, (Right.VIEW,), Topic.SYS_INFO),
    Command(
        "shell",
        "one read-only command in a participant's workspace",
        Targets.ONE,
        (Right.SHELL,),
        Topic.SHELL,
        args=(Arg("argv", argv),),
        site_args=(Arg("argv", argv),),
        site_body=True,
    ),
    Command(
        "delete-run",
        "delete a run's folder (refused while it trains)",
        Targets.ALL,
        (Right.OPERATE,),
        Topic.DELETE_RUN,
        args=(_RUN,),
        site_args=(_RUN,),
    ),
    Command("restart", "restart the participant's process", Targets.REQUIRED, (Right.OPERATE,), Topic.RESTART),
    Command("shutdown", "stop the participant's process", Targets.REQUIRED, (Right.OPERATE,), Topic.SHUTDOWN),
    Command(
        "remove-client",
        "forget a site's registration",
        Targets.SERVER,
        (Right.OPERATE,),
        args=(Arg("site", participant_name),),
    ),
    Command(
        "metrics",
        "a run's metrics per round and site",
        Targets.SERVER,
        (Right.VIEW,),
        args=(_OPTIONAL_RUN,),
        polled=True,
    ),
    # A participant's own log files: what `shell tail` would show, without a path from the operator.
    Command(
        "logs",
        "a participant's log lines",
        Targets.ONE,
        (Right.SHELL,),
        Topic.LOGS,
        args=_LOGS,
        site_args=_LOGS,
        site_body=True,
        polled=True,
        follows="shell",
    ),
    Command(
        "set-timeout",
        "how long the server waits for the sites' replies",
        Targets.SERVER,
        (Right.OPERATE,),
        args=(Arg("seconds", seconds),),
    ),
)

_JOB = Arg("job_id", run_number, whole=True)

# Jobs (issue 22): a job is a run the server schedules; `fedadmin job show|abort|clone|delete|download` is one console
# group over the job-* commands. Whether a caller may act on another submitter's job is the server's check.
_JOB_COMMANDS = (
    Command(
        "submit",
        "queue an uploaded MMAR as a job; it starts when its sites are free",
        Targets.SERVER,
        (Right.TRAIN,),
        args=(
            Arg("blob_id", blob_id),
            Arg("name", job_name, required=False),
            Arg("sites", site_names, required=False),
            Arg("gpus", gpus_per_site, required=False),
        ),
    ),
    Command("jobs", "the jobs: queued, running and ended", Targets.SERVER, (Right.VIEW,), polled=True),
    Command("job-show", "one job in detail", Targets.SERVER, (Right.VIEW,), args=(_JOB,), polled=True, console=False),
    Command(
        "job-abort",
        "abort a queued or running job",
        Targets.SERVER,
        (Right.TRAIN, Right.OPERATE),
        args=(_JOB,),
        console=False,
    ),
    Command(
        "job-clone",
        "submit a job's archive again, as a new job",
        Targets.SERVER,
        (Right.TRAIN,),
        args=(_JOB,),
        console=False,
    ),
    Command(
        "job-delete",
        "delete an ended job and its run",
        Targets.SERVER,
        (Right.TRAIN, Right.OPERATE),
        args=(_JOB,),
        console=False,
    ),
    Command(
        "job-download", "a job's results as one archive", Targets.SERVER, (Right.VIEW,), args=(_JOB,), console=False
    ),
)
_DECLARED = _DECLARED + _JOB_COMMANDS

COMMANDS: dict[str, Command] = {c.name: c for c in _DECLARED}
# The earlier name of run-validation in site policies, kept so that existing local policies stay valid.
SITE_COMMAND_ALIASES = {"validate": "run-validation"}
# What a site's local policy may name: every command a site executes, and its aliases.
SITE_COMMANDS = tuple(c.name for c in _DECLARED if c.topic is not None) + tuple(SITE_COMMAND_ALIASES)
BY_TOPIC: dict[str, Command] = {c.topic: c for c in _DECLARED if c.topic is not None}


def command(name: str) -> Command:
    """The declaration of `name`; ArgumentError names the command when there is none."""
    try:
        return COMMANDS[name]
    except KeyError:
        raise ArgumentError(f"unknown command {name[:100]!r}") from None
