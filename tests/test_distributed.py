"""Which rank a worker is, from the variables torchrun sets."""

from __future__ import annotations

import pytest

from fedclient.distributed import RankInfo, rank_info


def test_outside_torchrun_a_worker_is_rank_0_of_1():
    info = rank_info({})
    assert info == RankInfo(0, 0, 1) and info.is_main and not info.distributed


def test_torchrun_variables_give_the_rank_and_the_world():
    info = rank_info({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"})
    assert info == RankInfo(1, 1, 2) and not info.is_main and info.distributed


@pytest.mark.parametrize(
    "env", [{"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "-1", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "0"}, {"RANK": "one"}]
)
def test_inconsistent_rank_variables_are_refused(env):
    with pytest.raises(ValueError, match="rank|whole numbers"):
        rank_info(env)
