"""Property-based fuzzing of the hostile-input boundaries: tensor streams, MMAR configs, shell arguments."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedcommon.dtypes import DTypeError, dtype_from_name
from fedcommon.mmar import (
    CLIENT_CONFIG,
    ENVIRONMENT,
    FEDLEARN_PACKAGES,
    MMAR,
    SERVER_CONFIG,
    TRAIN_CONFIG,
    MMARError,
    load_mmar,
)
from fedcommon.safe_shell import ALLOWED, ShellRefused, run_shell
from fedcommon.tensor_codec import CodecError, decode_tensors, encode_tensors
from fedcommon.wire import training_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "examples" / "digits"
DTYPES = ["bfloat16", "bool", "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8"]
# A consistent header this large would make the codec allocate it: decode_tensors has no size limit of
# its own (the server checks each header against the global model first), so it is not fuzzed here.
MAX_ANNOUNCED_BYTES = 1 << 24

pytestmark = pytest.mark.timeout(120)


# ---- tensor codec ---------------------------------------------------------------------------------


@st.composite
def tensors(draw: st.DrawFn, max_count: int = 4) -> dict[str, np.ndarray]:
    """Arrays of every carried dtype and any small shape (0-d and 0-size included), with arbitrary bytes."""
    out = {}
    names = draw(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=max_count, unique=True))
    for name in names:
        dtype = dtype_from_name(draw(st.sampled_from(DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
        raw = draw(st.binary(min_size=math.prod(shape) * dtype.itemsize, max_size=math.prod(shape) * dtype.itemsize))
        out[name] = np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape)
    return out


def _layout(arr: np.ndarray, how: str) -> np.ndarray:
    """The same values as a big-endian or a non-contiguous (transposed) array."""
    if how == "big-endian" and arr.dtype.kind in "iuf" and arr.dtype.itemsize > 1 and arr.dtype.name != "bfloat16":
        return arr.byteswap().view(arr.dtype.newbyteorder(">"))
    if how == "transposed" and arr.ndim >= 2:
        return arr.T.copy().T  # Fortran order: same values, not C-contiguous
    return arr


@settings(max_examples=150, deadline=None)
@given(arrays=tensors(), chunk=st.integers(1, 300), how=st.sampled_from(["plain", "big-endian", "transposed"]))
def test_any_tensors_round_trip_bit_exact_at_any_chunk_size(arrays, chunk, how):
    sent = {name: _layout(arr, how) for name, arr in arrays.items()}

    received = decode_tensors(encode_tensors(sent, chunk_bytes=chunk))

    assert list(received) == list(arrays)
    for name, arr in arrays.items():
        assert received[name].dtype == arr.dtype and received[name].shape == arr.shape
        assert received[name].tobytes() == arr.tobytes()


header_fields = st.fixed_dictionaries(
    {
        "name": st.text(max_size=8),
        "dtype": st.sampled_from(DTYPES) | st.sampled_from(["object", "complex64", "<f4", "", "U8"]) | st.text(),
        "shape": st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(-2, 8), max_size=5),
        "nbytes": st.integers(0, 2**64 - 1) | st.integers(0, 64),
    }
)

mutation = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 1000)),
    st.tuples(st.just("duplicate"), st.integers(0, 1000)),
    st.tuples(st.just("swap"), st.integers(0, 1000), st.integers(0, 1000)),
    st.tuples(st.just("truncate stream"), st.integers(0, 1000)),
    st.tuples(st.just("truncate data"), st.integers(0, 1000), st.integers(0, 64)),
    st.tuples(st.just("extra bytes"), st.integers(0, 1000), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("insert data"), st.integers(0, 1000), st.binary(max_size=64)),
    st.tuples(st.just("insert header"), st.integers(0, 1000), header_fields),
    st.tuples(st.just("replace header"), st.integers(0, 1000), header_fields),
    st.tuples(st.just("insert empty chunk"), st.integers(0, 1000)),
    st.tuples(st.just("insert model header"), st.integers(0, 1000)),
)


def _mutate(chunks: list[pb.ModelChunk], change: tuple) -> list[pb.ModelChunk]:
    kind, at = change[0], change[1] % (len(chunks) + 1)
    if kind == "drop" and at < len(chunks):
        del chunks[at]
    elif kind == "duplicate" and at < len(chunks):
        chunks.insert(at, chunks[at])
    elif kind == "swap" and at < len(chunks) and change[2] % len(chunks) != at:
        other = change[2] % len(chunks)
        chunks[at], chunks[other] = chunks[other], chunks[at]
    elif kind == "truncate stream":
        del chunks[at:]
    elif kind in ("truncate data", "extra bytes") and at < len(chunks) and chunks[at].WhichOneof("part") == "data":
        data = bytes(chunks[at].data)
        chunks[at] = pb.ModelChunk(data=data[: change[2]] if kind == "truncate data" else data + change[2])
    elif kind == "insert data":
        chunks.insert(at, pb.ModelChunk(data=change[2]))
    elif kind == "insert header" or (kind == "replace header" and at < len(chunks)):
        header = pb.ModelChunk(tensor=pb.TensorHeader(**change[2]))
        if kind == "insert header":
            chunks.insert(at, header)
        else:
            chunks[at] = header
    elif kind == "insert empty chunk":
        chunks.insert(at, pb.ModelChunk())
    elif kind == "insert model header":
        chunks.insert(at, pb.ModelChunk(header=pb.ModelHeader(kind="model")))
    return chunks


def _announces_huge_tensor(chunks: list[pb.ModelChunk]) -> bool:
    for chunk in chunks:
        if chunk.WhichOneof("part") != "tensor" or chunk.tensor.dtype not in DTYPES:
            continue
        shape, size = list(chunk.tensor.shape), dtype_from_name(chunk.tensor.dtype).itemsize
        if all(d >= 0 for d in shape) and math.prod(shape) * size == chunk.tensor.nbytes > MAX_ANNOUNCED_BYTES:
            return True
    return False


@settings(max_examples=200, deadline=None)
@given(arrays=tensors(max_count=3), chunk=st.integers(1, 40), changes=st.lists(mutation, max_size=4))
def test_mutated_tensor_streams_assemble_or_raise_the_codecs_own_errors(arrays, chunk, changes):
    chunks = list(encode_tensors(arrays, chunk_bytes=chunk))
    for change in changes:
        chunks = _mutate(chunks, change)
    assume(not _announces_huge_tensor(chunks))

    try:
        received = decode_tensors(chunks)
    except (CodecError, DTypeError):
        return

    carried = sum(len(c.data) for c in chunks if c.WhichOneof("part") == "data")
    assert sum(arr.nbytes for arr in received.values()) == carried
    for name, arr in received.items():
        assert arr.nbytes == math.prod(arr.shape) * arr.dtype.itemsize
        if name in arrays and not changes:
            assert arr.tobytes() == arrays[name].tobytes()
    again = decode_tensors(encode_tensors(received, chunk_bytes=7))
    assert {n: a.tobytes() for n, a in again.items()} == {n: a.tobytes() for n, a in received.items()}


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.one_of(header_fields.map(lambda h: ("tensor", h)), st.binary(max_size=64)), max_size=8))
def test_streams_of_random_headers_and_bytes_raise_only_codec_errors(parts):
    chunks = [
        pb.ModelChunk(tensor=pb.TensorHeader(**p[1])) if isinstance(p, tuple) else pb.ModelChunk(data=p) for p in parts
    ]
    assume(not _announces_huge_tensor(chunks))

    try:
        received = decode_tensors(chunks)
    except (CodecError, DTypeError):
        return

    assert all(arr.nbytes == math.prod(arr.shape) * arr.dtype.itemsize for arr in received.values())


# ---- MMAR validation -------------------------------------------------------------------------------

CONFIG_FILES = (SERVER_CONFIG, CLIENT_CONFIG, TRAIN_CONFIG, ENVIRONMENT)
COMPONENT_PATHS = [
    "trainer.DigitsTrainer",
    "model.DigitsNet",
    "model.Missing",
    "trainer.sub.Thing",
    "os.system",
    "subprocess.Popen",
    "builtins.eval",
    "shutil.rmtree",
    "fedcommon.mmar.MMAR",
    "fedclient.nothing.X",
    "fedcommon",
    "custom.model.DigitsNet",
    "..",
    "model.",
    ".model",
    "model..DigitsNet",
    "__pycache__.x",
    "model.__class__",
    "fedcommon.wire.training_pb2.ModelChunk",
    "a" * 300 + ".B",
    "modèl.Net",
    "model.DigitsNet\0",
]

MODEL_FILES = ["models/.gitkeep", "models/a\0b", "models", "../x", "/etc/passwd", "", "models/../../x", "C:\\x"]
EDGE_VALUES = [10**400, -(10**400), 2**64, 2**63 - 1, 1e308, float("inf"), float("nan"), -0.0, 0, -1, True, "", " "]
json_scalars = st.one_of(
    st.sampled_from(EDGE_VALUES + COMPONENT_PATHS + MODEL_FILES),
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
components = st.fixed_dictionaries({"file": st.sampled_from(MODEL_FILES) | json_values}) | st.fixed_dictionaries(
    {"path": st.sampled_from(COMPONENT_PATHS) | json_scalars},
    optional={
        "args": st.dictionaries(st.text(max_size=8), json_values, max_size=3) | json_values,
        "extra": json_values,
        "file": json_values,
    },
)
# Component keys first: hypothesis favours the first choices, and components are where code gets named.
KEYS = {
    SERVER_CONFIG: [
        "initial_model",
        "format_version",
        "task_name",
        "min_num_clients",
        "max_num_clients",
        "wait_after_min_clients",
        "start_round",
        "num_rounds",
        "heart_beat_timeout",
        "exclude_vars",
        "aggregation_weights",
    ],
    CLIENT_CONFIG: [
        "privacy",
        "format_version",
        "task_name",
        "exclude_vars",
        "weight_by",
        "retry_timeout",
        "heartbeat_interval",
        "cross_site_validate",
    ],
    TRAIN_CONFIG: ["trainer", "seed"],
    ENVIRONMENT: ["DATA_ROOT", "THREADS"],
}
COMPONENT_KEYS = ("initial_model", "privacy", "trainer")
ORIGINALS = {rel: json.loads((DIGITS / rel).read_text()) if (DIGITS / rel).exists() else {} for rel in CONFIG_FILES}


@st.composite
def config_file(draw: st.DrawFn, rel: str) -> str:
    """The text of `rel`: mostly the original with a few keys given arbitrary values, maybe one deleted and
    an unknown one added; sometimes any JSON value or any text instead."""
    kind = draw(st.integers(0, 9))
    if kind == 8:
        return json.dumps(draw(json_values))
    if kind == 9:
        return draw(st.text(max_size=40))
    data = dict(ORIGINALS[rel])
    for key in draw(st.lists(st.sampled_from(KEYS[rel]), unique=True, min_size=1, max_size=4)):
        data[key] = draw((components if key in COMPONENT_KEYS else json_scalars) | json_values)
    for key in draw(st.lists(st.sampled_from(KEYS[rel]), max_size=1)):
        data.pop(key, None)
    data.update(draw(st.dictionaries(st.text(max_size=12), json_values, max_size=1)))
    return json.dumps(data)


@pytest.fixture(scope="module")
def fuzz_mmar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One copy of the digits example; every example rewrites its config files."""
    return Path(shutil.copytree(DIGITS, tmp_path_factory.mktemp("fuzz") / "digits"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.fixed_dictionaries({rel: config_file(rel) for rel in CONFIG_FILES}))
def test_arbitrary_config_values_load_or_are_reported_against_a_config_file(fuzz_mmar, texts):
    for rel, text in texts.items():
        (fuzz_mmar / rel).write_text(text, encoding="utf-8")

    try:
        loaded = load_mmar(fuzz_mmar)
    except MMARError as e:
        lines = str(e).splitlines()
        assert lines and all(line.startswith(tuple(f"{rel}: " for rel in CONFIG_FILES)) for line in lines), lines
        return

    assert isinstance(loaded, MMAR)
    for component in (loaded.train.trainer, loaded.server.initial_model, loaded.client.privacy):
        assert component is None or component.path.split(".")[0] in ("trainer", "model", *FEDLEARN_PACKAGES)


# ---- shell arguments --------------------------------------------------------------------------------

KEY_SECRET = "KEYSECRET-d41d8cd9"
OUTSIDE_SECRET = "OUTSIDESECRET-7a3f0c"
OUTSIDE_NAME = "OUTSIDENAME-91be"
MARKERS = (KEY_SECRET, OUTSIDE_SECRET, OUTSIDE_NAME)

SHELL_FLAGS = [
    "-",
    "--",
    "-l",
    "-a",
    "-h",
    "-R",
    "-la",
    "-r",
    "-i",
    "-n",
    "-v",
    "-c",
    "-E",
    "-F",
    "-rv",
    "-f",
    "-e",
    "--help",
    "--version",
    "--color=always",
    "--include=*.pem",
    "--exclude-dir=x",
    "-n5",
    "5",
    "+2",
    "-1",
]
SHELL_OPERANDS = [
    ";",
    "|",
    "&&",
    "$(id)",
    "`id`",
    "$HOME",
    "~",
    "*",
    "..",
    "../..",
    ".",
    "/",
    "/etc",
    "/etc/passwd",
    "{ws}",
    "{ws}/run_1/log.txt",
    "{ws}/startup/key.pem",
    "{outside}",
    "{outside}/secret.txt",
    "{ws}/../outside",
    "run_1",
    "run_1/log.txt",
    "run_1/../startup",
    "run_1/kit",
    "run_1/kit/key.pem",
    "run_1/innocent.txt",
    "run_1/escape.txt",
    "run_1/up",
    "run_1/up/outside",
    "startup",
    "startup/key.pem",
    "startup/fed.json",
    "notes.key",
    "NOTES.KEY",
    "certs/site.pem",
    "certs",
    "readme.txt",
    "./readme.txt",
    "run_1//log.txt",
    "SECRET",
    "line",
    "hello",
    ".*",
    "x\0y",
    "a" * 5000,
    "é",
    "日本語",
    "\n",
    " ",
    "",
]
VALID_FLAGS = {
    "ls": ["-l", "-a", "-h", "-R", "-la"],
    "cat": [],
    "head": ["-n5", "-n1"],
    "tail": ["-n1", "-n+2"],
    "grep": ["-r", "-i", "-n", "-v", "-c", "-E", "-F", "-rv", "-rn"],
}
PATTERNS = ["line", "hello", "SECRET", "KEY", ".*", "^", "-v", "$(id)", "secret|line", ""]
# Inside, mostly readable: with the flags above they make commands that run, and show what they show.
READABLE = [
    "run_1",
    "run_1/log.txt",
    "readme.txt",
    ".",
    "./readme.txt",
    "{ws}",
    "{ws}/run_1/log.txt",
    "certs",
    "run_1/kit",
    "run_1/innocent.txt",
    "run_1/up",
    "nothing.txt",
    "run_1/../readme.txt",
    "-",
]
OTHER_COMMANDS = ["rm", "sh", "find", "cp", "cat;rm", "/bin/cat", "ls ", "", "\0"]


@st.composite
def shell_argv(draw: st.DrawFn) -> list[str]:
    """Half well-formed commands over readable paths (so most run), half a hostile mix of any words."""
    if draw(st.booleans()):
        command = draw(st.sampled_from([*VALID_FLAGS, "pwd", *["grep"] * 3]))  # grep -r reads most: more of it
        flags = draw(st.lists(st.sampled_from(VALID_FLAGS.get(command) or ["--"]), max_size=2))
        if command == "grep" and draw(st.booleans()):
            flags.insert(0, "-r")
        pattern = [draw(st.sampled_from(PATTERNS))] if command == "grep" else []
        paths = draw(st.lists(st.sampled_from(READABLE) | st.sampled_from(SHELL_OPERANDS), max_size=3))
        return [command, *flags, *pattern, *(paths if command != "pwd" else [])]
    command = draw(st.sampled_from([*VALID_FLAGS, "pwd", *OTHER_COMMANDS]))
    words = st.sampled_from(SHELL_OPERANDS) | st.sampled_from(SHELL_FLAGS) | st.text(max_size=12)
    return [command, *draw(st.lists(words, max_size=5))]


def _tree_state(folder: Path) -> dict[str, tuple]:
    """Everything about a tree that a write would change (not atimes), symlinks not followed."""
    state = {}
    for current, dirs, files in os.walk(folder, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(current, name)
            info = path.lstat()
            if path.is_symlink():
                detail: object = os.readlink(path)
            elif path.is_file():
                detail = path.read_bytes()
            else:
                detail = None
            state[str(path.relative_to(folder))] = (info.st_mode, info.st_size, info.st_mtime_ns, detail)
    return state


@pytest.fixture(scope="module")
def shell_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with keys, a startup kit and links in and out, beside an outside folder with secrets."""
    base = tmp_path_factory.mktemp("shell_fuzz")
    ws, outside = base / "ws", base / "outside"
    (ws / "run_1").mkdir(parents=True)
    (ws / "run_1" / "log.txt").write_text("line 1\nline 2\nhello\n")
    (ws / "readme.txt").write_text("hello\n")
    (ws / "startup").mkdir()
    (ws / "startup" / "key.pem").write_text(f"{KEY_SECRET}\n")
    (ws / "startup" / "fed.json").write_text(f'{{"secret": "{KEY_SECRET}"}}\n')
    (ws / "notes.key").write_text(f"{KEY_SECRET}\n")
    (ws / "certs").mkdir()
    (ws / "certs" / "site.pem").write_text(f"{KEY_SECRET}\n")
    outside.mkdir()
    (outside / "secret.txt").write_text(f"{OUTSIDE_SECRET}\n")
    (outside / f"{OUTSIDE_NAME}.txt").write_text(f"{OUTSIDE_SECRET}\n")
    (ws / "run_1" / "kit").symlink_to("../startup", target_is_directory=True)
    (ws / "run_1" / "innocent.txt").symlink_to("../startup/key.pem")
    (ws / "run_1" / "escape.txt").symlink_to(outside / "secret.txt")
    (ws / "run_1" / "up").symlink_to("../..", target_is_directory=True)
    return base


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=shell_argv())
def test_any_shell_argv_is_refused_or_stays_inside_the_workspace_without_secrets(shell_base, words):
    ws, outside = shell_base / "ws", shell_base / "outside"
    argv = [w.replace("{ws}", str(ws)).replace("{outside}", str(outside)) for w in words]
    command = argv[0]
    before = _tree_state(shell_base)

    try:
        result = run_shell(argv, ws, timeout=5)
    except ShellRefused as e:
        assert str(e).startswith("shell: ")
    else:
        assert command in ALLOWED
        assert result.exit_code != 124, f"{argv} ran into the timeout"
        leaked = [m for m in MARKERS if m in result.stdout]
        assert not leaked, f"{argv} showed {leaked}: {result.stdout[:500]!r}"

    assert _tree_state(shell_base) == before, f"{argv} changed files in or beside the workspace"
