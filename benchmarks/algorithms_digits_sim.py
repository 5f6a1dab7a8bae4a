"""The digits example's accuracy per round under each algorithm, simulated in one process (no server, no sockets).

Two sites train DigitsTrainer as the workers would; the server's side is fedserver.aggregation.aggregate() and the
sites' is fedclient.site_algorithms, the code the real rounds run. A quick way to choose an algorithm's arguments
before an end-to-end run. Prints, per round, each site's held-out accuracy of the new global model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "digits" / "custom")]

from fedclient.site_algorithms import SiteAlgorithms  # noqa: E402
from fedcommon.algorithms import SCAFFOLD_DELTA_PREFIX  # noqa: E402
from fedcommon.torch_state import load_numpy_into_module, state_dict_to_numpy  # noqa: E402
from fedserver.aggregation import CONTROL_SLOT, aggregate  # noqa: E402


def simulate(spec: dict, rounds: int, fedprox_mu: float | None, scaffold: bool) -> list[list[float]]:
    from model import DigitsNet
    from trainer import DigitsTrainer

    with tempfile.TemporaryDirectory() as tmp:
        sites = [DigitsTrainer(f"site-{k}", tmp, num_sites=2, seed=k) for k in (1, 2)]
        algorithms = [
            SiteAlgorithms(fedprox_mu, Path(tmp) / f"scaffold_{k}.fl" if scaffold else None) for k in range(len(sites))
        ]
        torch.manual_seed(0)
        x = state_dict_to_numpy(DigitsNet(hidden=64).state_dict())
        state, history = None, []
        for _ in range(rounds):
            control = {k.split("/", 1)[1]: v for k, v in (state or {}).items() if k.startswith(f"{CONTROL_SLOT}/")}
            contributions = []
            for trainer, site in zip(sites, algorithms, strict=True):
                load_numpy_into_module(trainer.model, x)
                site.begin_round(trainer.model, control)
                trainer.train()
                extra = site.end_round(trainer.model)
                site.commit()
                local = state_dict_to_numpy(trainer.model.state_dict())
                contributions.append(({**{k: local[k] - x[k] for k in x}, **extra}, float(trainer.num_samples())))
            assert scaffold == any(k.startswith(SCAFFOLD_DELTA_PREFIX) for k in contributions[0][0])
            x, state = aggregate(spec, x, contributions, state, scaffold=scaffold)
            accuracies = []
            for trainer in sites:
                load_numpy_into_module(trainer.model, x)
                accuracies.append(round(trainer.validate()["accuracy"], 3))
            history.append(accuracies)
        return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aggregator", default='{"name": "FedAvg"}', help="config_fed_server.json's value (JSON)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fedprox-mu", type=float, help="turn FedProx on with this mu")
    parser.add_argument("--scaffold", action="store_true", help="turn SCAFFOLD on")
    args = parser.parse_args(argv)
    spec = json.loads(args.aggregator)
    for number, accuracies in enumerate(simulate(spec, args.rounds, args.fedprox_mu, args.scaffold)):
        print(f"round {number}: accuracy {accuracies}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
