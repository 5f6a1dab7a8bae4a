"""config_fed_server.json's "aggregator" and config_fed_client.json's "fedprox"/"scaffold": values and problems."""

import json
import shutil
from pathlib import Path

import pytest

from fedcommon.algorithms import AggregatorChoice
from fedcommon.mmar import CLIENT_CONFIG, SERVER_CONFIG, MMARError, load_mmar

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits"


@pytest.fixture
def mmar(tmp_path: Path) -> Path:
    return Path(shutil.copytree(EXAMPLE, tmp_path / "digits"))


def _set(root: Path, rel: str, **values) -> None:
    path = root / rel
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data))


def _problems(root: Path) -> list[str]:
    with pytest.raises(MMARError) as info:
        load_mmar(root)
    return str(info.value).splitlines()


def test_the_default_aggregator_is_fedavg_and_no_site_algorithm():
    loaded = load_mmar(EXAMPLE)
    assert loaded.server.aggregator == AggregatorChoice("FedAvg", None, {})
    assert (loaded.client.fedprox_mu, loaded.client.scaffold) == (None, False)


def test_a_builtin_gets_its_defaults_filled_in(mmar):
    _set(mmar, SERVER_CONFIG, aggregator={"name": "FedAdam", "args": {"eta": 0.05}})
    choice = load_mmar(mmar).server.aggregator
    assert choice.spec() == {"name": "FedAdam", "args": {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}}
    assert choice.label == "FedAdam" and choice.needs_all_updates is False


def test_site_algorithms_are_read(mmar):
    _set(mmar, CLIENT_CONFIG, fedprox={"mu": 0.1}, scaffold=True)
    client = load_mmar(mmar).client
    assert (client.fedprox_mu, client.scaffold) == (0.1, True)


@pytest.mark.parametrize(
    ("rel", "values", "expected"),
    [
        (
            SERVER_CONFIG,
            {"aggregator": {"name": "FedMean"}},
            "config/config_fed_server.json: key 'aggregator.name': unknown aggregator 'FedMean'; "
            "valid: FedAvg, FedAvgM, "
            "FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg, Krum, MultiKrum (did you mean 'FedMedian'?)",
        ),
        (
            SERVER_CONFIG,
            {"aggregator": {"name": "FedAvgM", "args": {"momentum": 0.9}}},
            "config/config_fed_server.json: key 'aggregator.args.momentum': unknown argument of FedAvgM; "
            "valid: server_lr, "
            "server_momentum (did you mean 'server_momentum'?)",
        ),
        (
            SERVER_CONFIG,
            {"aggregator": {"name": "FedTrimmedAvg", "args": {"beta": 0.5}}},
            "config/config_fed_server.json: key 'aggregator.args.beta': must be a number >= 0 and < 0.5, got 0.5",
        ),
        (
            SERVER_CONFIG,
            {"aggregator": {"name": "Krum", "args": {"num_malicious": -1}}},
            "config/config_fed_server.json: key 'aggregator.args.num_malicious': must be an integer >= 0, got -1",
        ),
        (
            SERVER_CONFIG,
            {"aggregator": {"name": "MultiKrum", "args": {"num_selected": 0}}},
            "config/config_fed_server.json: key 'aggregator.args.num_selected': must be an integer >= 1, got 0",
        ),
        (
            SERVER_CONFIG,
            {"aggregator": {"name": "FedYogi", "args": {"tau": 0}}},
            "config/config_fed_server.json: key 'aggregator.args.tau': must be a number > 0, got 0",
        ),
        (
            SERVER_CONFIG,
            {"aggregator": {"name": "FedAdam", "path": "x.Y"}},
            "config/config_fed_server.json: key 'aggregator': give either 'name' "
            "(one of FedAvg, FedAvgM, FedAdam, FedYogi, "
            "FedAdagrad, FedMedian, FedTrimmedAvg, Krum, MultiKrum) or 'path' (a custom class)",
        ),
        (
            SERVER_CONFIG,
            {"aggregator": {"path": "nowhere.Agg"}},
            "config/config_fed_server.json: key 'aggregator.path': 'nowhere.Agg' is outside the MMAR's custom/ and "
            "fedlearn's packages (fedclient, fedcommon, fedserver)",
        ),
        (
            CLIENT_CONFIG,
            {"fedprox": {"mu": -1}},
            "config/config_fed_client.json: key 'fedprox.mu': must be a number > 0, got -1",
        ),
        (
            CLIENT_CONFIG,
            {"fedprox": {"nu": 1}},
            "config/config_fed_client.json: key 'fedprox.nu': unknown argument of fedprox; valid: mu",
        ),
        (
            CLIENT_CONFIG,
            {"scaffold": "yes"},
            "config/config_fed_client.json: key 'scaffold': must be true or false, got 'yes'",
        ),
    ],
)
def test_bad_algorithm_config_is_reported_with_file_and_key(mmar, rel, values, expected):
    _set(mmar, rel, **values)
    assert _problems(mmar) == [expected]


def test_a_custom_aggregator_in_custom_is_accepted_with_its_args(mmar):
    (mmar / "custom" / "my_agg.py").write_text("class Agg:\n    pass\n")
    _set(mmar, SERVER_CONFIG, aggregator={"path": "my_agg.Agg", "args": {"k": 1}})
    assert load_mmar(mmar).server.aggregator.spec() == {"path": "my_agg.Agg", "args": {"k": 1}}
