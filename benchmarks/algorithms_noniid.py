"""Issue 20's measurement: every algorithm on digits split non-IID across 5 sites, then with one site poisoned.

Digits (scikit-learn's bundled 8x8 images) is split into a held-out test set (20%, stratified) and 5 sites' training
sets whose label mix is drawn per class from Dirichlet(alpha) (alpha 0.3: most sites see a few digits mostly).
Each round every site trains the digits example's network (DigitsNet, hidden 64) for E local epochs of SGD from the
global model; the server's side is fedserver.aggregation.aggregate() and the sites' is fedclient.site_algorithms,
the code the real rounds run. Reported: the global model's accuracy on the held-out set after R rounds, median and
range over seeds. With --poison, site 5 sends its update sign-flipped and scaled by 10 every round.

    .venv/bin/python benchmarks/algorithms_noniid.py                 # the table of benchmarks/README.md
    .venv/bin/python benchmarks/algorithms_noniid.py --json --rounds 10 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "digits" / "custom")]

from fedclient.site_algorithms import SiteAlgorithms  # noqa: E402
from fedcommon.torch_state import load_numpy_into_module, state_dict_to_numpy  # noqa: E402
from fedserver.aggregation import CONTROL_SLOT, aggregate  # noqa: E402

SITES = 5
# (label, aggregator spec, FedProx mu, SCAFFOLD)
ALGORITHMS = [
    ("FedAvg", {"name": "FedAvg"}, None, False),
    ("FedAvgM", {"name": "FedAvgM", "args": {"server_lr": 1.0, "server_momentum": 0.9}}, None, False),
    ("FedAdam", {"name": "FedAdam"}, None, False),
    ("FedYogi", {"name": "FedYogi"}, None, False),
    ("FedAdagrad", {"name": "FedAdagrad"}, None, False),
    ("FedMedian", {"name": "FedMedian"}, None, False),
    ("FedTrimmedAvg(beta=0.2)", {"name": "FedTrimmedAvg", "args": {"beta": 0.2}}, None, False),
    ("Krum(f=1)", {"name": "Krum", "args": {"num_malicious": 1}}, None, False),
    ("MultiKrum(f=1,m=3)", {"name": "MultiKrum", "args": {"num_malicious": 1, "num_selected": 3}}, None, False),
    ("FedProx(mu=0.01)", {"name": "FedAvg"}, 0.01, False),
    ("SCAFFOLD", {"name": "FedAvg"}, None, True),
]
ROBUST = ("FedAvg", "FedMedian", "FedTrimmedAvg(beta=0.2)", "Krum(f=1)", "MultiKrum(f=1,m=3)")


def split(seed: int, alpha: float) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """The 5 sites' (x, y) by Dirichlet(alpha) over labels, and the held-out (x, y); seeded."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x, y = data.data.astype(np.float32) / 16.0, data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(SITES)]
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(y_train == label))
        shares = rng.dirichlet(np.full(SITES, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for site, chunk in enumerate(np.split(idx, cuts)):
            parts[site] += chunk.tolist()
    sites = [(torch.from_numpy(x_train[p]), torch.from_numpy(y_train[p])) for p in parts]
    return sites, (torch.from_numpy(x_test), torch.from_numpy(y_test))


def train_locally(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            batch = order[start : start + 32]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run(
    spec: dict, mu: float | None, scaffold: bool, seed: int, rounds: int, epochs: int, alpha: float, poison: bool
) -> float:
    """The held-out accuracy of the global model after `rounds` rounds."""
    from model import DigitsNet

    sites, (x_test, y_test) = split(seed, alpha)
    torch.manual_seed(seed)
    model = DigitsNet(hidden=64)
    x = state_dict_to_numpy(model.state_dict())
    state = None
    with tempfile.TemporaryDirectory() as tmp:
        algorithms = [SiteAlgorithms(mu, Path(tmp) / f"scaffold_{k}.fl" if scaffold else None) for k in range(SITES)]
        for number in range(rounds):
            control = {k.split("/", 1)[1]: v for k, v in (state or {}).items() if k.startswith(f"{CONTROL_SLOT}/")}
            contributions = []
            for k, ((xs, ys), site) in enumerate(zip(sites, algorithms, strict=True)):
                if len(xs) == 0:
                    continue
                load_numpy_into_module(model, x)
                site.begin_round(model, control)
                train_locally(model, xs, ys, epochs, seed * 1000 + number * 10 + k)
                extra = site.end_round(model)
                site.commit()
                local = state_dict_to_numpy(model.state_dict())
                delta = {name: local[name] - x[name] for name in x}
                if poison and k == SITES - 1:
                    delta = {name: (-10 * d).astype(d.dtype) for name, d in delta.items()}
                contributions.append(({**delta, **extra}, float(len(xs))))
            x, state = aggregate(spec, x, contributions, state, scaffold=scaffold, num_sites=SITES, workdir=tmp)
    load_numpy_into_module(model, x)
    return accuracy(model, x_test, y_test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration over labels")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for poison, chosen in ((False, ALGORITHMS), (True, [a for a in ALGORITHMS if a[0] in ROBUST])):
        for label, spec, mu, scaffold in chosen:
            started = time.perf_counter()
            runs = [
                run(spec, mu, scaffold, seed, args.rounds, args.epochs, args.alpha, poison)
                for seed in range(args.seeds)
            ]
            results.append(
                {
                    "algorithm": label,
                    "poisoned_site": poison,
                    "accuracies": [round(a, 4) for a in runs],
                    "median": round(statistics.median(runs), 4),
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            if not args.json:
                r = results[-1]
                print(
                    f"{label:24} {'1 of 5 poisoned' if poison else 'honest':16} median {r['median']:.3f}  "
                    f"range {min(runs):.3f}-{max(runs):.3f}  ({r['seconds']} s)",
                    flush=True,
                )
    if args.json:
        print(
            json.dumps(
                {
                    "sites": SITES,
                    "alpha": args.alpha,
                    "rounds": args.rounds,
                    "seeds": args.seeds,
                    "local_epochs": args.epochs,
                    "results": results,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
