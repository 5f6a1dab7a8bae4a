"""A site's resources: local/resources.json (good and each kind of bad), allocation and release, refusals that name
what is in use, and the sysinfo record the server reads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedclient.site_resources import (
    MAX_FILE_BYTES,
    Allocation,
    Allocator,
    Capacity,
    ResourcesError,
    ResourcesShort,
    host_gpus,
    load_resources,
)
from fedcommon.site_resources import Gpu, SiteResources, SiteResourcesError

NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


def _write(workspace: Path, data: object) -> Path:
    path = workspace / "local" / "resources.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ---- the file ---------------------------------------------------------------------------------------------


def test_without_a_file_a_site_has_the_gpus_the_host_shows_and_one_cpu_slot(tmp_path):
    capacity = load_resources(tmp_path, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert [g.id for g in capacity.gpus] == ["0", "1"]
    assert (capacity.cpu_slots, capacity.cpu_slots_declared, capacity.gpus_declared) == (1, False, False)
    assert capacity.gpus_from == "CUDA_VISIBLE_DEVICES='0,1'"
    assert load_resources(tmp_path, NO_GPU).gpus == ()


def test_a_declared_file_names_gpus_the_host_need_not_show_and_cpu_slots(tmp_path):
    _write(tmp_path, {"gpus": [{"id": "3", "memory_mib": 81920}, {"id": "GPU-5e1f-aa", "memory_mib": 40960}]})
    capacity = load_resources(tmp_path, NO_GPU)
    assert capacity.gpus == (Gpu("3", 81920), Gpu("GPU-5e1f-aa", 40960))
    assert capacity.gpus_declared and capacity.gpus_from == "local/resources.json gpus"
    assert capacity.cpu_slots == 1 and not capacity.cpu_slots_declared
    _write(tmp_path, {"cpu_slots": 4})
    capacity = load_resources(tmp_path, {"CUDA_VISIBLE_DEVICES": "1"})
    assert (capacity.cpu_slots, capacity.cpu_slots_declared) == (4, True)
    assert [g.id for g in capacity.gpus] == ["1"], "without gpus the host's stand in"
    _write(tmp_path, {"gpus": [], "cpu_slots": 2})
    assert load_resources(tmp_path, {"CUDA_VISIBLE_DEVICES": "0"}).gpus == (), "an empty list: train on CPU slots"


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ([1], 'expected {"gpus": [...], "cpu_slots": N}'),
        ({"cpu_slots": 2, "gpu": []}, "gpu: unknown key (known: gpus, cpu_slots)"),
        ({"cpu_slots": 0}, "cpu_slots: must be a whole number from 1 to 1024, got 0"),
        ({"cpu_slots": "2"}, "cpu_slots: must be a whole number from 1 to 1024, got '2'"),
        ({"cpu_slots": True}, "cpu_slots: must be a whole number from 1 to 1024, got True"),
        ({"cpu_slots": 2.0}, "cpu_slots: must be a whole number from 1 to 1024, got 2.0"),
        ({"cpu_slots": 5000}, "cpu_slots: must be a whole number from 1 to 1024, got 5000"),
        ({"gpus": {"id": "0"}}, "gpus: must be a list of at most 256 GPUs"),
        ({"gpus": [{"id": str(i), "memory_mib": 1} for i in range(257)]}, "gpus: must be a list of at most 256"),
        ({"gpus": ["0"]}, "gpus[0]: must be an object"),
        ({"gpus": [{"id": "0", "memory_mib": 1, "uuid": "x"}]}, "gpus[0].uuid: unknown key (known: id, memory_mib)"),
        ({"gpus": [{"id": "0,1", "memory_mib": 1}]}, "gpus[0].id: must be a GPU index or UUID"),
        ({"gpus": [{"id": "../0", "memory_mib": 1}]}, "gpus[0].id: must be a GPU index or UUID"),
        ({"gpus": [{"id": "", "memory_mib": 1}]}, "gpus[0].id: must be a GPU index or UUID"),
        ({"gpus": [{"id": 0, "memory_mib": 1}]}, "gpus[0].id: must be a GPU index or UUID"),
        ({"gpus": [{"id": "x" * 97, "memory_mib": 1}]}, "gpus[0].id: must be a GPU index or UUID"),
        ({"gpus": [{"id": "0"}]}, "gpus[0].memory_mib: must be a whole number from 1 to 16777216, got None"),
        ({"gpus": [{"id": "0", "memory_mib": 0}]}, "gpus[0].memory_mib: must be a whole number"),
        ({"gpus": [{"id": "0", "memory_mib": -5}]}, "gpus[0].memory_mib: must be a whole number"),
        ({"gpus": [{"id": "0", "memory_mib": "80GB"}]}, "gpus[0].memory_mib: must be a whole number"),
        ({"gpus": [{"id": "0", "memory_mib": 1 << 30}]}, "gpus[0].memory_mib: must be a whole number"),
        (
            {"gpus": [{"id": "0", "memory_mib": 1}, {"id": "0", "memory_mib": 2}]},
            "gpus[1].id: '0' is listed twice",
        ),
        ("{not json", "is not valid JSON"),
        ("[" * 50 + "]" * 50, "nested deeper than 4 levels"),
        ("1" * (MAX_FILE_BYTES + 1), f"more than the {MAX_FILE_BYTES} allowed"),
    ],
)
def test_a_bad_file_is_refused_naming_the_file_and_key(tmp_path, data, says):
    path = _write(tmp_path, data)
    with pytest.raises(ResourcesError) as refused:
        load_resources(tmp_path, NO_GPU)
    assert str(path) in str(refused.value) and says in str(refused.value), str(refused.value)


def test_a_file_that_cannot_be_read_is_refused_naming_it(tmp_path):
    path = tmp_path / "local" / "resources.json"
    path.mkdir(parents=True)
    with pytest.raises(ResourcesError, match="resources.json: cannot be read"):
        load_resources(tmp_path, NO_GPU)


@pytest.mark.parametrize(("visible", "ids"), [("0,1,2", ["0", "1", "2"]), ("", []), ("-1", []), ("1,-1,0", ["1"])])
def test_the_hosts_gpus_follow_cuda_visible_devices(visible, ids):
    gpus, where = host_gpus({"CUDA_VISIBLE_DEVICES": visible})
    assert [g.id for g in gpus] == ids and where == f"CUDA_VISIBLE_DEVICES={visible!r}"


# ---- allocation -------------------------------------------------------------------------------------------


def _gpus(*ids: str, declared: bool = True) -> Capacity:
    where = "local/resources.json gpus" if declared else f"CUDA_VISIBLE_DEVICES={','.join(ids)!r}"
    return Capacity(tuple(Gpu(i, 1024) for i in ids), 1, where, False)


def _slots(n: int, declared: bool = True) -> Capacity:
    return Capacity((), n, "CUDA_VISIBLE_DEVICES=''", declared)


def test_gpus_are_taken_lowest_free_first_and_given_back_on_release():
    allocator = Allocator("site-1")
    capacity = _gpus("0", "1", "2", "3")
    assert allocator.reserve(capacity, 1, 2) == Allocation(1, gpus=("0", "1"))
    assert allocator.reserve(capacity, 2) == Allocation(2, gpus=("2",))
    assert allocator.reserve(capacity, 3).worker_env() == {"CUDA_VISIBLE_DEVICES": "3"}
    assert allocator.release(1) == Allocation(1, gpus=("0", "1"))
    assert allocator.release(1) is None
    assert allocator.reserve(capacity, 4, 2).gpus == ("0", "1")
    assert sorted(allocator.held()) == [2, 3, 4]


def test_cpu_slots_are_taken_one_per_rank_where_declared_and_the_whole_site_where_not():
    allocator = Allocator("site-1")
    assert allocator.reserve(_slots(3), 1, 2) == Allocation(1, cpu_slots=2)
    assert allocator.reserve(_slots(3), 2).worker_env() == {}, "no GPU: the worker's environment is left alone"
    undeclared = Allocator("site-1")
    assert undeclared.reserve(_slots(1, declared=False), 1, 4) == Allocation(1, cpu_slots=1)


def test_a_run_short_of_gpus_is_refused_naming_each_run_and_what_it_holds():
    allocator = Allocator("site-1")
    capacity = _gpus("0", "1", "2")
    allocator.reserve(capacity, 3, 2)
    with pytest.raises(ResourcesShort) as short:
        allocator.reserve(capacity, 4, 2)
    assert str(short.value) == (
        "site-1: 3 GPUs (0, 1, 2), 2 in use by run 3 (0, 1); run 4 needs 2 (local/resources.json gpus)"
    )
    assert short.value.sole_holder is None
    allocator.reserve(capacity, 5)
    with pytest.raises(ResourcesShort, match=r"in use by run 3 \(0, 1\), run 5 \(2\); run 4 needs 1 "):
        allocator.reserve(capacity, 4)
    assert sorted(allocator.held()) == [3, 5], "a refused run holds nothing"


def test_a_run_short_of_cpu_slots_is_refused_naming_the_runs_and_the_key():
    allocator = Allocator("site-1")
    allocator.reserve(_slots(1), 3)
    with pytest.raises(ResourcesShort) as short:
        allocator.reserve(_slots(1), 4)
    assert str(short.value) == "site-1: 1 CPU slot, in use by run 3; run 4 needs 1 (local/resources.json cpu_slots)"
    assert short.value.sole_holder is None, "a declared slot is named as such"
    allocator = Allocator("site-1")
    allocator.reserve(_slots(4), 1, 2)
    allocator.reserve(_slots(4), 2)
    with pytest.raises(ResourcesShort) as short:
        allocator.reserve(_slots(4), 3, 2)
    assert str(short.value) == (
        "site-1: 4 CPU slots, 3 in use by run 1 (2), run 2; run 3 needs 2 (local/resources.json cpu_slots)"
    )


def test_the_only_unit_of_a_site_that_declared_none_names_its_holder_for_the_old_words():
    allocator = Allocator("site-1")
    allocator.reserve(_slots(1, declared=False), 3)
    with pytest.raises(ResourcesShort) as short:
        allocator.reserve(_slots(1, declared=False), 4)
    assert short.value.sole_holder == 3
    gpu = Allocator("site-1")
    gpu.reserve(_gpus("0", declared=False), 5)
    with pytest.raises(ResourcesShort) as short:
        gpu.reserve(_gpus("0", declared=False), 6)
    assert short.value.sole_holder == 5


def test_a_run_cannot_take_twice():
    allocator = Allocator("site-1")
    allocator.reserve(_slots(2), 1)
    with pytest.raises(ResourcesShort, match="run 1 already holds 1 CPU slot"):
        allocator.reserve(_slots(2), 1)


# ---- the record in sysinfo, read back by the server -------------------------------------------------------


def test_the_report_reads_back_with_what_is_free():
    allocator = Allocator("site-1")
    capacity = _gpus("0", "1", "2")
    allocator.reserve(capacity, 7, 2)
    reported = allocator.report(capacity)
    data = json.loads(json.dumps({"hostname": "h", "resources": reported.to_dict()}))
    assert data["resources"]["gpus"][0] == {"id": "0", "memory_mib": 1024, "in_use_by": 7}
    read = SiteResources.from_sysinfo(data)
    assert read == reported
    assert (read.gpu_ids, read.free_gpus(), read.cpu_slots, read.free_cpu_slots()) == (["0", "1", "2"], ["2"], 1, 1)
    slots = Allocator("site-1")
    slots.reserve(_slots(3), 4, 2)
    read = SiteResources.from_sysinfo({"resources": slots.report(_slots(3)).to_dict()})
    assert (read.gpu_ids, read.cpu_slots, dict(read.cpu_slots_in_use), read.free_cpu_slots()) == ([], 3, {4: 2}, 1)


@pytest.mark.parametrize(
    ("resources", "says"),
    [
        ([], "sysinfo.resources: must be an object"),
        ({"cpu_slots": 1, "extra": 1}, "sysinfo.resources.extra: unknown key"),
        ({"gpus": [{"id": "0;rm", "memory_mib": 1}]}, "sysinfo.resources.gpus[0].id: must be a GPU index or UUID"),
        ({"gpus": [{"id": "0", "in_use_by": 0}]}, "sysinfo.resources.gpus[0].in_use_by: must be a whole number"),
        ({"gpus": [{"id": "0", "memory_mib": 1.5}]}, "sysinfo.resources.gpus[0].memory_mib: must be a whole number"),
        ({"gpus": [{"id": "0"}, {"id": "0"}]}, "sysinfo.resources.gpus[1].id: '0' is listed twice"),
        ({"gpus": [{"id": "0"}] * 300}, "sysinfo.resources.gpus: must be a list of at most 256"),
        ({"cpu_slots": -1}, "sysinfo.resources.cpu_slots: must be a whole number"),
        ({"cpu_slots_in_use": {"x": 1}}, "sysinfo.resources.cpu_slots_in_use: keys must be run numbers"),
        ({"cpu_slots_in_use": {"3": 0}}, "sysinfo.resources.cpu_slots_in_use.3: must be a whole number"),
        ({"error": "x" * 2000}, "the site cannot read its own: " + "x" * 500 + "…"),
    ],
)
def test_a_sysinfo_record_that_is_not_valid_is_refused_naming_the_key(resources, says):
    with pytest.raises(SiteResourcesError) as refused:
        SiteResources.from_sysinfo({"resources": resources})
    assert says in str(refused.value), str(refused.value)


def test_a_sysinfo_reply_without_resources_is_refused_saying_so():
    with pytest.raises(SiteResourcesError, match="the site reports no resources"):
        SiteResources.from_sysinfo({"hostname": "h", "gpus": []})
