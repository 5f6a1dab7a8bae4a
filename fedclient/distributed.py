"""The ranks of a multi-GPU site (DESIGN §6): which rank this is, its process group, and keeping ranks in step.

Only rank 0 talks to the server. Before each local training phase it tells the other ranks to train and
broadcasts the global model it received; after the phase every rank meets at a barrier, so rank 0 submits
a model the ranks agree on (DistributedDataParallel keeps their weights equal step by step).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

log = logging.getLogger(__name__)

STOP, TRAIN = 0, 1
# Ranks other than 0 wait in a collective while rank 0 waits for the other sites: rounds can take hours.
COLLECTIVE_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class RankInfo:
    """This process's place among the site's ranks, from the variables torchrun sets."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def rank_info(environ: dict[str, str] | None = None) -> RankInfo:
    """RANK, LOCAL_RANK and WORLD_SIZE of this process (rank 0 of 1 outside torchrun)."""
    env = os.environ if environ is None else environ
    try:
        info = RankInfo(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1")))
    except ValueError as e:
        raise ValueError(f"RANK, LOCAL_RANK and WORLD_SIZE must be whole numbers: {e}") from None
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise ValueError(f"rank {info.rank} does not fit a world of {info.world_size}")
    return info


class RankSync:
    """The process group of a site's ranks: nccl on GPUs, gloo on CPUs."""

    def __init__(self, info: RankInfo):
        import torch
        import torch.distributed as dist

        self.info = info
        self.backend = "nccl" if torch.cuda.is_available() else "gloo"
        if self.backend == "nccl":
            torch.cuda.set_device(info.local_rank)
            self.device = torch.device("cuda", info.local_rank)
        else:
            self.device = torch.device("cpu")
        dist.init_process_group(self.backend, timeout=COLLECTIVE_TIMEOUT)
        self._stopped = False
        log.info("rank %d of %d joined the site's process group (%s)", info.rank, info.world_size, self.backend)

    def _command(self, value: int | None = None) -> int:
        import torch
        import torch.distributed as dist

        cmd = torch.tensor([STOP if value is None else value], dtype=torch.int64, device=self.device)
        dist.broadcast(cmd, src=0)
        return int(cmd.item())

    @staticmethod
    def broadcast_model(module) -> None:
        """Give every rank rank 0's weights and buffers, in place."""
        import torch.distributed as dist

        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)

    @staticmethod
    def broadcast_site_state(module, algorithms) -> None:
        """Give every rank rank 0's SCAFFOLD c and c_i for the round, in place (after `begin_round` on each rank);
        FedProx needs nothing more: each rank takes its x from the model just broadcast."""
        import torch.distributed as dist

        scaffold = algorithms.scaffold if algorithms is not None else None
        if scaffold is None:
            return
        for name in scaffold.variables(module):
            dist.broadcast(scaffold.c[name], src=0)
            dist.broadcast(scaffold.c_i[name], src=0)

    def begin_local_training(self, fitter, algorithms=None) -> None:
        """Rank 0: tell the other ranks to train, from the global model it holds (and its site algorithms' round
        state, when it runs any: `begin_round` has been called)."""
        self._command(TRAIN)
        self.broadcast_model(fitter.model)
        self.broadcast_site_state(fitter.model, algorithms)

    def end_local_training(self) -> None:
        """Every rank: wait until all have finished the phase."""
        import torch.distributed as dist

        dist.barrier()

    def stop(self) -> None:
        """Rank 0: tell the other ranks the run is over (once)."""
        if not self._stopped:
            self._stopped = True
            self._command(STOP)

    def follow(self, fitter, algorithms=None) -> None:
        """Ranks other than 0: train each phase rank 0 starts, until it says stop; `algorithms`: the site's
        fedclient.site_algorithms.SiteAlgorithms, run on every rank with rank 0's state."""
        while self._command() == TRAIN:
            self.broadcast_model(fitter.model)
            if algorithms is not None:
                algorithms.begin_round(fitter.model, {})
                self.broadcast_site_state(fitter.model, algorithms)
            fitter.train(None)
            if algorithms is not None:
                algorithms.end_round(fitter.model)  # only rank 0 sends (and keeps) the round's result
            self.end_local_training()
        log.info("rank %d: rank 0 ended the training", self.info.rank)
        self._stopped = True

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            if self._stopped:
                # Every rank reached the end: none leaves (rank 0 hosts the rendezvous store) while another still
                # tears its group down, which gloo answers with "terminate called without an active exception".
                dist.barrier()
            dist.destroy_process_group()
