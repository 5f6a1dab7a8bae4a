"""Tests of MMAR loading: the example's values, defaults, and one clear message per kind of bad input."""

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fedcommon.mmar import (
    CLIENT_CONFIG,
    ENVIRONMENT,
    SERVER_CONFIG,
    TRAIN_CONFIG,
    Component,
    MMARError,
    excluded,
    load_mmar,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "digits"


@pytest.fixture
def mmar(tmp_path: Path) -> Path:
    """A private copy of the digits example to break."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "digits"))


def edit(root: Path, rel: str, change: Callable[[dict], None]) -> None:
    """Apply `change` to the JSON object in root/rel and write it back."""
    path = root / rel
    data = json.loads(path.read_text()) if path.exists() else {}
    change(data)
    path.write_text(json.dumps(data, indent=2))


def problems_of(root: Path) -> list[str]:
    """The lines of the MMARError that loading root raises."""
    with pytest.raises(MMARError) as info:
        load_mmar(root)
    return str(info.value).splitlines()


def test_example_loads_with_its_configured_values() -> None:
    mmar = load_mmar(EXAMPLE)

    assert mmar.root == EXAMPLE.resolve()
    assert mmar.custom_dir == EXAMPLE.resolve() / "custom"
    server = mmar.server
    assert server.task_name == "digits"
    assert (server.min_num_clients, server.max_num_clients) == (2, 8)
    assert server.wait_after_min_clients == 5.0
    assert (server.start_round, server.num_rounds) == (0, 3)
    assert server.heart_beat_timeout == 30.0
    assert server.exclude_vars == ()
    assert server.aggregation_weights == {}
    assert server.initial_model == Component("model.DigitsNet", {"hidden": 64})
    assert server.initial_model_file is None
    client = mmar.client
    assert client.task_name == "digits"
    assert client.weight_by == "samples"
    assert client.retry_timeout == 30.0
    assert client.heartbeat_interval is None
    assert client.privacy is None
    assert client.cross_site_validate is False
    assert mmar.train.trainer.path == "trainer.DigitsTrainer"
    assert mmar.train.trainer.args["num_sites"] == 2
    assert mmar.train.seed == 0
    assert mmar.environment == {}


def test_absent_optional_keys_take_their_defaults(mmar: Path) -> None:
    minimal = {"task_name": "t", "num_rounds": 1, "initial_model": {"path": "model.DigitsNet"}}
    (mmar / SERVER_CONFIG).write_text(json.dumps(minimal))
    (mmar / CLIENT_CONFIG).write_text('{"task_name": "t"}')
    (mmar / TRAIN_CONFIG).write_text('{"trainer": {"path": "trainer.DigitsTrainer"}}')

    loaded = load_mmar(mmar)

    server, client = loaded.server, loaded.client
    assert (server.min_num_clients, server.max_num_clients, server.start_round) == (1, 100, 0)
    assert (server.wait_after_min_clients, server.heart_beat_timeout) == (10.0, 60.0)
    assert server.initial_model == Component("model.DigitsNet", {})
    assert (client.weight_by, client.retry_timeout, client.heartbeat_interval) == ("iterations", 30.0, None)
    assert client.privacy is None and client.cross_site_validate is False
    assert loaded.train.seed == 0
    assert server.exclude_vars == client.exclude_vars == ()


def test_optional_values_are_read_when_given(mmar: Path) -> None:
    edit(mmar, SERVER_CONFIG, lambda d: d.update(exclude_vars="^out\\.", aggregation_weights={"site-1": 2}))
    (mmar / "custom" / "privacy.py").write_text("class Clip:\n    def __init__(self, percentile):\n        pass\n")
    privacy = {"path": "privacy.Clip", "args": {"percentile": 10}}
    client_changes = {"heartbeat_interval": 5, "privacy": privacy, "cross_site_validate": True}
    edit(mmar, CLIENT_CONFIG, lambda d: d.update(client_changes))
    edit(mmar, ENVIRONMENT, lambda d: d.update(DATA_ROOT="/data", THREADS=4, FAST=True))

    loaded = load_mmar(mmar)

    assert loaded.server.exclude_vars == "^out\\."
    assert loaded.server.aggregation_weights == {"site-1": 2.0}
    assert loaded.client.heartbeat_interval == 5.0
    assert loaded.client.privacy == Component(privacy["path"], privacy["args"])
    assert loaded.client.cross_site_validate is True
    assert loaded.environment == {"DATA_ROOT": "/data", "THREADS": 4, "FAST": True}


def test_initial_model_may_be_a_file_in_the_mmar(mmar: Path) -> None:
    (mmar / "models" / "start.fl").write_bytes(b"weights")
    edit(mmar, SERVER_CONFIG, lambda d: d.update(initial_model={"file": "models/start.fl"}))

    server = load_mmar(mmar).server

    assert server.initial_model is None
    assert server.initial_model_file == (mmar / "models" / "start.fl").resolve()


@pytest.mark.parametrize("rel", [SERVER_CONFIG, CLIENT_CONFIG, TRAIN_CONFIG])
def test_missing_config_file_is_named(mmar: Path, rel: str) -> None:
    (mmar / rel).unlink()

    assert problems_of(mmar) == [f"{rel}: required file is missing"]


def test_invalid_json_names_file_line_and_column(mmar: Path) -> None:
    (mmar / TRAIN_CONFIG).write_text('{\n  "seed": 0\n  "trainer": {}\n}\n')

    (problem,) = problems_of(mmar)

    assert problem.startswith(f"{TRAIN_CONFIG}: invalid JSON at line 3, column 3:")


def test_top_level_must_be_an_object(mmar: Path) -> None:
    (mmar / CLIENT_CONFIG).write_text("[1, 2]")

    assert problems_of(mmar) == [f"{CLIENT_CONFIG}: must be a JSON object, got a list"]


def test_unknown_key_is_named_with_a_suggestion(mmar: Path) -> None:
    edit(mmar, SERVER_CONFIG, lambda d: d.update(num_round=3))

    assert problems_of(mmar) == [
        f"{SERVER_CONFIG}: key 'num_round': unknown key (did you mean 'num_rounds'?)",
    ]


def test_bad_value_type_names_file_and_key(mmar: Path) -> None:
    edit(mmar, SERVER_CONFIG, lambda d: d.update(num_rounds="x"))

    assert problems_of(mmar) == [f"{SERVER_CONFIG}: key 'num_rounds': must be an integer >= 1, got 'x'"]


def test_every_problem_of_every_file_is_listed_one_per_line(mmar: Path) -> None:
    edit(mmar, SERVER_CONFIG, lambda d: d.update(num_rounds=0, heart_beat_timeout=0, start_round=True))
    edit(mmar, CLIENT_CONFIG, lambda d: d.update(weight_by="steps", retry_timeout="soon"))
    edit(mmar, TRAIN_CONFIG, lambda d: d.update(seed=-1))

    problems = problems_of(mmar)

    assert sorted(problems) == sorted(
        [
            f"{SERVER_CONFIG}: key 'num_rounds': must be an integer >= 1, got 0",
            f"{SERVER_CONFIG}: key 'heart_beat_timeout': must be a number > 0, got 0",
            f"{SERVER_CONFIG}: key 'start_round': must be an integer >= 0, got true",
            f"{CLIENT_CONFIG}: key 'weight_by': must be one of 'iterations', 'samples', 'uniform', got 'steps'",
            f"{CLIENT_CONFIG}: key 'retry_timeout': must be a number > 0, got 'soon'",
            f"{TRAIN_CONFIG}: key 'seed': must be an integer >= 0, got -1",
        ]
    )


def test_required_key_missing_is_named(mmar: Path) -> None:
    edit(mmar, SERVER_CONFIG, lambda d: d.pop("task_name"))
    edit(mmar, TRAIN_CONFIG, lambda d: d.pop("trainer"))

    problems = problems_of(mmar)

    assert f"{SERVER_CONFIG}: key 'task_name': required" in problems
    assert f"{TRAIN_CONFIG}: key 'trainer': required" in problems


def test_min_clients_above_max_clients(mmar: Path) -> None:
    edit(mmar, SERVER_CONFIG, lambda d: d.update(min_num_clients=9, max_num_clients=8))

    assert problems_of(mmar) == [
        f"{SERVER_CONFIG}: key 'max_num_clients': must be >= min_num_clients (9), got 8",
    ]


def test_min_clients_above_the_default_max(mmar: Path) -> None:
    edit(mmar, SERVER_CONFIG, lambda d: (d.pop("max_num_clients"), d.update(min_num_clients=101)))

    (problem,) = problems_of(mmar)

    assert problem.startswith(f"{SERVER_CONFIG}: key 'max_num_clients': must be >= min_num_clients (101)")


def test_task_name_mismatch_names_both_files(mmar: Path) -> None:
    edit(mmar, CLIENT_CONFIG, lambda d: d.update(task_name="mnist"))

    assert problems_of(mmar) == [
        f"{CLIENT_CONFIG}: key 'task_name': 'mnist' differs from {SERVER_CONFIG} task_name 'digits'"
    ]


@pytest.mark.parametrize(
    ("component", "key", "says"),
    [
        ({"path": "nodots"}, "trainer.path", "must be 'module.Class'"),
        ({"path": "trainer.Digits Trainer"}, "trainer.path", "must be 'module.Class'"),
        ({"path": 7}, "trainer.path", "got 7"),
        ({"args": {}}, "trainer.path", "required"),
        ({"path": "trainer.NoSuchTrainer"}, "trainer.path", "custom/trainer.py defines no 'NoSuchTrainer'"),
        ({"path": "trainer.sub.Thing"}, "trainer.path", "module 'trainer.sub' not found in custom/"),
        ({"path": "no_such_module_xyz.Net"}, "trainer.path", "'no_such_module_xyz.Net' is outside the MMAR's custom/"),
        ({"path": "trainr.DigitsTrainer"}, "trainer.path", "(did you mean 'trainer'?)"),
        ({"path": "trainer.DigitsTrainer", "arg": {}}, "trainer.arg", "unknown key (did you mean 'args'?)"),
        ({"path": "trainer.DigitsTrainer", "args": [1]}, "trainer.args", "must be an object"),
        ({"path": "trainer.DigitsTrainer", "args": {"a-b": 1}}, "trainer.args", "'a-b' is not a Python"),
        ("trainer.DigitsTrainer", "trainer", "must be a component"),
    ],
)
def test_bad_component_names_file_and_key(mmar: Path, component: object, key: str, says: str) -> None:
    edit(mmar, TRAIN_CONFIG, lambda d: d.update(trainer=component))

    (problem,) = problems_of(mmar)

    assert problem.startswith(f"{TRAIN_CONFIG}: key '{key}': ")
    assert says in problem


OUTSIDE = "is outside the MMAR's custom/ and fedlearn's packages (fedclient, fedcommon, fedserver)"


@pytest.mark.parametrize(
    "path", ["os.system", "subprocess.Popen", "shutil.rmtree", "builtins.eval", "collections.Counter", "numpy.load"]
)
def test_installed_modules_outside_custom_and_fedlearn_are_refused(mmar: Path, path: str) -> None:
    edit(mmar, TRAIN_CONFIG, lambda d: d.update(trainer={"path": path, "args": {"command": "touch /tmp/x"}}))
    edit(mmar, SERVER_CONFIG, lambda d: d.update(initial_model={"path": path}))
    edit(mmar, CLIENT_CONFIG, lambda d: d.update(privacy={"path": path}))

    assert sorted(problems_of(mmar)) == [
        f"{CLIENT_CONFIG}: key 'privacy.path': {path!r} {OUTSIDE}",
        f"{SERVER_CONFIG}: key 'initial_model.path': {path!r} {OUTSIDE}",
        f"{TRAIN_CONFIG}: key 'trainer.path': {path!r} {OUTSIDE}",
    ]


def test_components_of_fedlearns_own_packages_are_checked_without_importing(mmar: Path) -> None:
    validator = {"path": "fedclient.components.model_validator.ModelValidator"}
    edit(mmar, CLIENT_CONFIG, lambda d: d.update(privacy=validator))

    assert load_mmar(mmar).client.privacy == Component(validator["path"], {})

    edit(mmar, CLIENT_CONFIG, lambda d: d.update(privacy={"path": "fedclient.no_such_module.Protocol"}))
    assert problems_of(mmar) == [
        f"{CLIENT_CONFIG}: key 'privacy.path': module 'fedclient.no_such_module' not found in fedlearn's packages"
    ]
    edit(mmar, CLIENT_CONFIG, lambda d: d.update(privacy={"path": "fedcommon.mmar.NoSuchClass"}))
    assert problems_of(mmar) == [f"{CLIENT_CONFIG}: key 'privacy.path': fedcommon/mmar.py defines no 'NoSuchClass'"]


@pytest.mark.parametrize(
    ("module", "says"),
    [
        ("os", "custom/ has a module 'os' named like the standard library's; rename it"),
        ("fedcommon", "custom/ has a module 'fedcommon' that would hide fedlearn's package of that name; rename it"),
    ],
)
def test_custom_module_may_not_take_the_name_of_a_standard_or_fedlearn_module(
    mmar: Path, module: str, says: str
) -> None:
    (mmar / "custom" / f"{module}.py").write_text("class system:\n    pass\n")
    edit(mmar, TRAIN_CONFIG, lambda d: d.update(trainer={"path": f"{module}.system"}))

    assert problems_of(mmar) == [f"{TRAIN_CONFIG}: key 'trainer.path': {says}"]


def test_custom_module_that_is_a_symlink_is_refused(mmar: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere.py").write_text("class Thing:\n    pass\n")
    (mmar / "custom" / "linked.py").symlink_to(tmp_path / "elsewhere.py")
    (mmar / "custom" / "alias.py").symlink_to(mmar / "custom" / "trainer.py")
    edit(mmar, TRAIN_CONFIG, lambda d: d.update(trainer={"path": "linked.Thing"}))
    edit(mmar, SERVER_CONFIG, lambda d: d.update(initial_model={"path": "alias.DigitsTrainer"}))

    assert sorted(problems_of(mmar)) == [
        f"{SERVER_CONFIG}: key 'initial_model.path': custom/alias.py is a symbolic link; "
        "site code must be the MMAR's own files",
        f"{TRAIN_CONFIG}: key 'trainer.path': custom/linked.py is a symbolic link; "
        "site code must be the MMAR's own files",
    ]


def test_custom_package_folder_that_is_a_symlink_is_refused(mmar: Path, tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("class Thing:\n    pass\n")
    (mmar / "custom" / "pkg").symlink_to(tmp_path / "pkg", target_is_directory=True)
    edit(mmar, TRAIN_CONFIG, lambda d: d.update(trainer={"path": "pkg.Thing"}))

    (problem,) = problems_of(mmar)

    assert (
        problem == f"{TRAIN_CONFIG}: key 'trainer.path': custom/pkg is a symbolic link; "
        "site code must be the MMAR's own files"
    )


def test_custom_folder_that_is_a_symlink_is_refused(mmar: Path, tmp_path: Path) -> None:
    shutil.move(mmar / "custom", tmp_path / "real_custom")
    (mmar / "custom").symlink_to(tmp_path / "real_custom", target_is_directory=True)

    problems = problems_of(mmar)

    says = "custom/ is a symbolic link or leads outside the MMAR; site code must be the MMAR's own files"
    assert sorted(problems) == [
        f"{SERVER_CONFIG}: key 'initial_model.path': {says}",
        f"{TRAIN_CONFIG}: key 'trainer.path': {says}",
    ]


def test_component_with_a_syntax_error_is_reported(mmar: Path) -> None:
    (mmar / "custom" / "model.py").write_text("class DigitsNet(:\n")

    (problem,) = problems_of(mmar)

    key = "initial_model.path"
    assert problem.startswith(f"{SERVER_CONFIG}: key '{key}': custom/model.py: syntax error at line 1")


def test_component_imported_into_a_custom_module_is_accepted(mmar: Path) -> None:
    (mmar / "custom" / "nets").mkdir()
    (mmar / "custom" / "nets" / "__init__.py").write_text("from model import DigitsNet as Net\n")
    edit(mmar, SERVER_CONFIG, lambda d: d.update(initial_model={"path": "nets.Net"}))

    assert load_mmar(mmar).server.initial_model == Component("nets.Net", {})


@pytest.mark.parametrize(
    ("initial_model", "says"),
    [
        ({"file": "models/missing.fl"}, "key 'initial_model.file': file 'models/missing.fl' not found"),
        ({"file": "../outside.fl"}, "key 'initial_model.file': must be a path inside the MMAR"),
        ({"file": "/etc/passwd"}, "key 'initial_model.file': must be a path inside the MMAR"),
        ({"file": "models/.gitkeep", "path": "model.DigitsNet"}, "key 'initial_model': give either"),
        ({"file": "models/.gitkeep", "hash": "x"}, "key 'initial_model.hash': unknown key"),
        ({}, "key 'initial_model': must be a component"),
        ({"path": "model.Missing"}, "key 'initial_model.path': custom/model.py defines no 'Missing'"),
    ],
)
def test_bad_initial_model_names_file_and_key(mmar: Path, initial_model: dict, says: str) -> None:
    (mmar.parent / "outside.fl").write_bytes(b"x")
    edit(mmar, SERVER_CONFIG, lambda d: d.update(initial_model=initial_model))

    (problem,) = problems_of(mmar)

    assert problem.startswith(f"{SERVER_CONFIG}: {says}")


@pytest.mark.parametrize(
    ("change", "key", "says"),
    [
        ({"format_version": 2}, "format_version", "must be 1"),
        ({"exclude_vars": "("}, "exclude_vars", "invalid regular expression"),
        ({"exclude_vars": ["a", 3]}, "exclude_vars[1]", "must be a non-empty variable name, got 3"),
        ({"exclude_vars": {"a": 1}}, "exclude_vars", "must be a list of variable names or one regular"),
        ({"aggregation_weights": {"site-1": 0}}, "aggregation_weights.site-1", "must be a number > 0, got 0"),
        ({"aggregation_weights": [1]}, "aggregation_weights", "must be an object"),
        ({"wait_after_min_clients": -1}, "wait_after_min_clients", "must be a number >= 0, got -1"),
        ({"task_name": ""}, "task_name", "must be a non-empty string"),
    ],
)
def test_bad_server_values_name_the_key(mmar: Path, change: dict, key: str, says: str) -> None:
    edit(mmar, SERVER_CONFIG, lambda d: d.update(change))

    (problem,) = problems_of(mmar)

    assert problem.startswith(f"{SERVER_CONFIG}: key '{key}': {says}")


@pytest.mark.parametrize(
    ("change", "key", "says"),
    [
        ({"heartbeat_interval": 0}, "heartbeat_interval", "must be a number > 0, got 0"),
        ({"cross_site_validate": "yes"}, "cross_site_validate", "must be true or false, got 'yes'"),
        ({"privacy": {"path": "percentile"}}, "privacy.path", "must be 'module.Class'"),
        ({"format_version": "1"}, "format_version", "must be 1"),
    ],
)
def test_bad_client_values_name_the_key(mmar: Path, change: dict, key: str, says: str) -> None:
    edit(mmar, CLIENT_CONFIG, lambda d: d.update(change))

    (problem,) = problems_of(mmar)

    assert problem.startswith(f"{CLIENT_CONFIG}: key '{key}': {says}")


def test_environment_values_must_be_scalars(mmar: Path) -> None:
    edit(mmar, ENVIRONMENT, lambda d: d.update(OK="x", PATHS=["/a"], NESTED={"a": 1}, NOTHING=None))

    assert sorted(problems_of(mmar)) == [
        f"{ENVIRONMENT}: key 'NESTED': must be a string, number or boolean, got an object",
        f"{ENVIRONMENT}: key 'NOTHING': must be a string, number or boolean, got null",
        f"{ENVIRONMENT}: key 'PATHS': must be a string, number or boolean, got a list",
    ]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"seed": 1' + "0" * 5000 + "}", "cannot be read as JSON"),
        ('{"seed": ' + "[" * 100_000 + "]" * 100_000 + "}", "cannot be read as JSON"),
    ],
)
def test_json_too_large_or_too_deep_to_read_is_reported(mmar: Path, text: str, says: str) -> None:
    (mmar / TRAIN_CONFIG).write_text(text)

    (problem,) = problems_of(mmar)

    assert problem.startswith(f"{TRAIN_CONFIG}: {says}")


def test_numbers_beyond_float_range_are_reported_not_raised(mmar: Path) -> None:
    huge = 10**400
    edit(mmar, SERVER_CONFIG, lambda d: d.update(wait_after_min_clients=huge, aggregation_weights={"site-1": huge}))
    edit(mmar, ENVIRONMENT, lambda d: d.update(BIG=huge))

    problems = sorted(problems_of(mmar))

    assert [problem.partition(", got ")[0] for problem in problems] == [
        f"{SERVER_CONFIG}: key 'aggregation_weights.site-1': must be a number > 0",
        f"{SERVER_CONFIG}: key 'wait_after_min_clients': must be a number >= 0",
        f"{ENVIRONMENT}: key 'BIG': must be a string, number or boolean",
    ]


def test_initial_model_file_with_a_nul_is_reported(mmar: Path) -> None:
    edit(mmar, SERVER_CONFIG, lambda d: d.update(initial_model={"file": "models/a\u0000b.fl"}))

    (problem,) = problems_of(mmar)

    assert problem.startswith(f"{SERVER_CONFIG}: key 'initial_model.file': must be a path inside the MMAR")


def test_duplicate_keys_are_reported(mmar: Path) -> None:
    (mmar / TRAIN_CONFIG).write_text('{"seed": 1, "seed": 2, "trainer": {"path": "trainer.DigitsTrainer"}}')

    assert problems_of(mmar) == [f"{TRAIN_CONFIG}: key 'seed': given more than once"]


def test_missing_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(MMARError, match="does not exist"):
        load_mmar(tmp_path / "nothing")


def test_zip_or_file_root_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "digits.zip"
    archive.write_bytes(b"PK")

    with pytest.raises(MMARError, match=r"digits\.zip: MMAR must be a folder \(extract the zip first\)"):
        load_mmar(archive)


def test_excluded_matches_exact_names_or_a_pattern() -> None:
    assert excluded("fc.weight", ("fc.weight", "fc.bias"))
    assert not excluded("fc.weight2", ("fc.weight",))
    assert excluded("encoder.layer1.weight", "^encoder\\.")
    assert not excluded("decoder.weight", "^encoder\\.")
    assert not excluded("anything", "")
    assert not excluded("anything", ())


def test_importing_the_mmar_modules_does_not_import_numpy_or_torch() -> None:
    code = (
        "import sys, fedcommon.mmar, fedcommon.components\n"
        "heavy = [m for m in ('numpy', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr


def test_a_key_holding_line_breaks_stays_on_its_problems_line(mmar: Path) -> None:
    edit(mmar, ENVIRONMENT, lambda d: d.update({"A\nconfig/config_train.json: forged\u2028x": None}))

    assert problems_of(mmar) == [
        f"{ENVIRONMENT}: key 'A\\nconfig/config_train.json: forged\\u2028x': "
        "must be a string, number or boolean, got null"
    ]


def test_a_built_in_privacy_protocol_is_named_by_name(mmar: Path) -> None:
    edit(mmar, CLIENT_CONFIG, lambda c: c.update(privacy={"name": "SVTProtocol", "args": {"fraction": 0.2}}))
    privacy = load_mmar(mmar).client.privacy
    assert privacy == Component(path="fedclient.fed_privacy.SVTProtocol", args={"fraction": 0.2})


@pytest.mark.parametrize(
    "privacy, says",
    [
        ({"name": "SVTProtocl"}, "'privacy.name': must be one of LaplacianProtocol, PercentileProtocol, SVTProtocol"),
        ({"name": "SVTProtocol", "path": "x.Y"}, "either 'name'"),
        ({"name": "SVTProtocol", "arg": {}}, "privacy.arg"),
    ],
)
def test_a_bad_privacy_setting_names_the_key(mmar: Path, privacy: dict, says: str) -> None:
    edit(mmar, CLIENT_CONFIG, lambda c: c.update(privacy=privacy))
    assert any("config_fed_client.json" in line and says in line for line in problems_of(mmar))
