"""A multi-GPU site's ranks run its site algorithms with rank 0's round state (two gloo ranks on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import ROOT, free_port, python_env

from fedclient.distributed import RankInfo, RankSync
from fedclient.site_algorithms import SiteAlgorithms
from fedcommon.model_file import save_model


class _Fitter:
    """One SGD step on a tiny model, the same data on every rank."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 2)

    def train(self, progress=None) -> None:
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        loss = self.model(torch.ones(4, 3)).square().sum()
        loss.backward()
        optimizer.step()


def _rank(rank: int, port: int, folder: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    folder_path = Path(folder)
    sync = RankSync(RankInfo(rank, rank, 2))
    fitter = _Fitter()
    # Each rank reads its own state file: only rank 0's holds this site's c_i.
    algorithms = SiteAlgorithms(0.5, folder_path / f"c_i_{rank}.fl")
    try:
        if rank == 0:
            with torch.no_grad():
                fitter.model.weight.add_(1.0)  # rank 0's global model differs from rank 1's until broadcast
            control = {n: np.full(tuple(t.shape), 0.25, np.float32) for n, t in fitter.model.state_dict().items()}
            algorithms.begin_round(fitter.model, control)
            sync.begin_local_training(fitter, algorithms)
            fitter.train()
            algorithms.end_round(fitter.model)
            sync.end_local_training()
            sync.stop()
        else:
            sync.follow(fitter, algorithms)
        scaffold = algorithms.scaffold
        arrays = {
            f"{slot}/{n}": t.numpy()
            for slot, held in (("c", scaffold.c), ("c_i", scaffold.c_i))
            for n, t in held.items()
        }
        arrays.update({f"w/{n}": t.detach().numpy() for n, t in fitter.model.state_dict().items()})
        np.savez(folder_path / f"rank_{rank}.npz", **arrays)
    finally:
        sync.close()


def test_every_rank_trains_with_rank_0s_global_model_and_scaffold_control_variates(tmp_path):
    model = torch.nn.Linear(3, 2)
    save_model(
        tmp_path / "c_i_0.fl",
        {n: np.full(tuple(t.shape), -0.5, np.float32) for n, t in model.state_dict().items()},
        {"rounds": 1},
    )
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(port), str(tmp_path)],
            env=python_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    for p in procs:
        out = p.communicate(timeout=120)[0]
        assert p.returncode == 0, out
    ranks = [np.load(tmp_path / f"rank_{r}.npz") for r in (0, 1)]
    assert set(ranks[0].files) == set(ranks[1].files)
    for key in ranks[0].files:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
    assert np.all(ranks[1]["c/weight"] == 0.25) and np.all(ranks[1]["c_i/weight"] == -0.5)


if __name__ == "__main__":
    _rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
