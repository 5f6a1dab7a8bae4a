"""The open round's sum mirrored in memory: the close reads it only when it holds exactly the round's contributions."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
from test_run_rounds import _config as run_rounds_config
from test_staged_rounds import BIG, _delta, _header, _models, _site

from fedcommon.kit import load_kit
from fedcommon.mmar import MMARError, load_mmar
from fedcommon.model_file import load_model, save_model
from fedcommon.tensor_codec import encode_tensors
from fedserver import memory_sum
from fedserver.aggregator import VarSpec
from fedserver.disk_sum import DiskSum
from fedserver.memory_sum import MemorySum, keep_in_memory
from fedserver.run import GLOBAL_MODEL, FederatedRun, Phase
from fedserver.server import FederationServer
from fedserver.staged_upload import STAGE, StagedUpload, stage_tensors
from fedserver.stream_watch import StreamDeadlines

MODEL = {
    "a": np.zeros((301, 7), np.float32),
    "h": np.zeros(33, np.float16),
    "i": np.zeros(4, np.int32),
    "x": np.zeros(3, np.float32),
}
SPECS = {n: VarSpec(a.dtype, a.shape) for n, a in MODEL.items()}
EXCLUDED = frozenset({"x"})
MAX_WEIGHT = 100.0


def _update(rng: np.random.Generator, carry_i: bool = True) -> dict[str, np.ndarray]:
    a = rng.normal(size=(301, 7)).astype(np.float32)
    a[:, 0] = -0.0  # a sum that starts at +0.0 loses the sign: bit for bit means with the sign of zero too
    update = {
        "a": a,
        "h": rng.normal(size=33).astype(np.float16),
        "i": rng.integers(-5, 5, 4).astype(np.int32),
    }
    if not carry_i:
        del update["i"]
    return update


def _stage(folder: Path, update: dict, writer=None, chunk_bytes: int = 1000) -> StagedUpload:
    staged = StagedUpload(folder / "staging", SPECS, EXCLUDED, writer)
    stage_tensors(encode_tensors(update, chunk_bytes=chunk_bytes), lambda s: STAGE, staged, "an upload")
    staged.close()
    return staged


def _sums(folder: Path, memory: MemorySum | None) -> DiskSum:
    folder.mkdir(parents=True, exist_ok=True)
    return DiskSum(folder, SPECS, EXCLUDED, MAX_WEIGHT, memory=memory)


def _means(total: DiskSum) -> dict[str, np.ndarray | None]:
    return {name: None if (m := total.take_mean(name)) is None else m.copy() for name in ("a", "h", "i", "x")}


def _no_term_reads(monkeypatch) -> None:
    def refuse(self, names):
        raise AssertionError(f"the close read the terms of {names} from disk")

    monkeypatch.setattr(DiskSum, "_sums", refuse)


def _seals(monkeypatch) -> list[bool]:
    """What each close found: whether the mirror held its round (and so was read instead of the terms)."""
    found: list[bool] = []
    seal = MemorySum.seal

    def recording(self, terms):
        found.append(seal(self, terms))
        return found[-1]

    monkeypatch.setattr(MemorySum, "seal", recording)
    return found


def _assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, arr in expected.items():
        if arr is None:
            assert got[name] is None, name
        else:
            assert got[name].dtype == arr.dtype and got[name].tobytes() == arr.tobytes(), name


@pytest.mark.parametrize("contributions", [2, 5], ids=["two", "five, folded on disk"])
def test_the_mirror_gives_the_disk_sums_means_bit_for_bit_and_the_close_reads_no_term(
    tmp_path, monkeypatch, contributions
):
    rng = np.random.default_rng(7)
    updates = [(_update(rng, carry_i=k != 1), (k + 1) * 3.5) for k in range(contributions)]
    disk = _sums(tmp_path / "disk", None)
    memory = MemorySum(SPECS, EXCLUDED)
    mirrored = _sums(tmp_path / "mem", memory)
    for update, weight in updates:
        disk.add(_stage(tmp_path / "disk", update), weight)
        writer = memory.writer(weight / MAX_WEIGHT)
        mirrored.add(_stage(tmp_path / "mem", update, writer), weight)
        mirrored.drop_retired()
    expected = _means(disk)
    _no_term_reads(monkeypatch)
    _assert_same(_means(mirrored), expected)


def test_a_mirrored_upload_that_breaks_off_leaves_the_close_reading_the_terms(tmp_path):
    rng = np.random.default_rng(8)
    good = [(_update(rng), 2.0), (_update(rng), 5.0)]
    memory = MemorySum(SPECS, EXCLUDED)
    mirrored, disk = _sums(tmp_path / "mem", memory), _sums(tmp_path / "disk", None)
    for update, weight in good:
        disk.add(_stage(tmp_path / "disk", update), weight)
        mirrored.add(_stage(tmp_path / "mem", update, memory.writer(weight / MAX_WEIGHT)), weight)
    broken = StagedUpload(tmp_path / "mem" / "staging", SPECS, EXCLUDED, memory.writer(0.03))
    chunks = list(encode_tensors({"a": np.full((301, 7), 1e6, np.float32)}, chunk_bytes=1000))
    with pytest.raises(Exception, match="ended early"):
        stage_tensors(chunks[:-1], lambda s: STAGE, broken, "an upload")
    broken.discard()
    _assert_same(_means(mirrored), _means(disk))


def test_an_upload_still_arriving_when_the_round_closes_is_not_in_the_means_nor_in_the_next_round(
    tmp_path, monkeypatch
):
    rng = np.random.default_rng(9)
    memory = MemorySum(SPECS, EXCLUDED)
    mirrored, disk = _sums(tmp_path / "mem", memory), _sums(tmp_path / "disk", None)
    update = _update(rng)
    disk.add(_stage(tmp_path / "disk", update), 4.0)
    mirrored.add(_stage(tmp_path / "mem", update, memory.writer(0.04)), 4.0)
    late = memory.writer(0.05)
    late.add("a", 0, np.full(100, 1e6, np.float32))  # half-way through its upload when the close begins
    slow = memory.writer(0.05)  # its first chunk is still on the way
    _assert_same(_means(mirrored), _means(disk))  # read from the terms: the mirror holds a part of `late`

    nxt, disk2 = _sums(tmp_path / "mem2", memory), _sums(tmp_path / "disk2", None)  # the next round resets it
    update = _update(rng)
    disk2.add(_stage(tmp_path / "disk2", update), 3.0)
    writer = memory.writer(0.03)  # the next round's first upload: the buffer is cleared
    late.add("a", 100, np.full(100, 1e6, np.float32))  # the last round's uploads go on arriving: added nowhere
    slow.add("a", 0, np.full(100, 1e6, np.float32))
    nxt.add(_stage(tmp_path / "mem2", update, writer), 3.0)
    expected = _means(disk2)
    _no_term_reads(monkeypatch)
    _assert_same(_means(nxt), expected)


@pytest.mark.parametrize(
    "mirrored_scale", [None, 0.05], ids=["a term that was not mirrored", "mirrored at another scale"]
)
def test_a_term_the_mirror_does_not_match_leaves_the_close_reading_the_terms(tmp_path, mirrored_scale):
    rng = np.random.default_rng(10)
    memory = MemorySum(SPECS, EXCLUDED)
    mirrored, disk = _sums(tmp_path / "mem", memory), _sums(tmp_path / "disk", None)
    first, second = _update(rng), _update(rng)
    disk.add(_stage(tmp_path / "disk", first), 3.0)
    mirrored.add(_stage(tmp_path / "mem", first, memory.writer(0.03)), 3.0)
    disk.add(_stage(tmp_path / "disk", second), 2.0)
    writer = None if mirrored_scale is None else memory.writer(mirrored_scale)  # the disk takes it at 2 / 100
    mirrored.add(_stage(tmp_path / "mem", second, writer), 2.0)
    _assert_same(_means(mirrored), _means(disk))


def test_round_sum_auto_keeps_a_large_sum_in_memory_only_where_it_fits():
    big = memory_sum.AUTO_MIN_BYTES
    assert keep_in_memory("auto", big, 4 * big)
    assert not keep_in_memory("auto", big, 4 * big - 1)  # more than a quarter of what is available
    assert not keep_in_memory("auto", big - 1, 1 << 50)  # small: the disk's reads cost little
    assert keep_in_memory("memory", 10, 0) and not keep_in_memory("disk", big, 1 << 50)
    assert MemorySum(SPECS, EXCLUDED).nbytes >= 301 * 7 * 4 + 33 * 4 + 4 * 8


def test_round_sum_is_checked_where_the_mmar_is_read(tmp_path):
    from conftest import copy_mmar

    with pytest.raises(MMARError, match="round_sum.*must be one of 'auto', 'memory', 'disk', got 'ram'"):
        load_mmar(copy_mmar(tmp_path / "mmar", server={"round_sum": "ram"}))
    assert load_mmar(copy_mmar(tmp_path / "ok", server={"round_sum": "memory"})).server.round_sum == "memory"


# ---- a run ------------------------------------------------------------------------------------------------------


def _run(folder: Path, round_sum: str) -> FederatedRun:
    (folder / "models").mkdir(parents=True)
    save_model(folder / "models" / GLOBAL_MODEL, {"w": np.linspace(-1, 1, 5000, dtype=np.float32), "b": MODEL["i"]})
    config = dataclasses.replace(run_rounds_config(num_rounds=3), round_sum=round_sum, aggregation_weights={"s2": 2})
    return FederatedRun(1, folder, config)


def _three_rounds(runs: dict[str, FederatedRun], monkeypatch, reads_terms: set[str] = frozenset()) -> None:
    """The same two contributions a round to each run, for 3 rounds; after each, the same model in each."""
    rng = np.random.default_rng(11)
    for r in range(3):
        updates = {
            s: {"w": rng.normal(size=5000).astype(np.float32), "b": (np.arange(4) - r).astype(np.int32)}
            for s in ("s1", "s2")
        }
        for how, run in runs.items():
            for site, update in updates.items():
                weight = 10.0 + r
                run.begin_contribution(site, r)
                staged = run.stage_upload(site, weight)
                stage_tensors(encode_tensors(update, chunk_bytes=4096), run.route_tensor, staged, "an upload")
                staged.close()
                with monkeypatch.context() as m:
                    if how not in reads_terms:
                        _no_term_reads(m)
                    run.commit_contribution(site, r, staged, weight, {}, lambda: {"s1", "s2"})
            assert run.current_round == r + 1 or run.phase is Phase.COMPLETED
        expected = load_model(runs["disk"].model_path)[0]
        for how, run in runs.items():
            for name, arr in load_model(run.model_path)[0].items():
                assert arr.tobytes() == expected[name].tobytes(), f"round {r}: {how}: {name}"


def test_a_run_that_keeps_its_sum_in_memory_writes_the_models_a_run_on_disk_writes(tmp_path, monkeypatch):
    runs = {how: _run(tmp_path / how, how) for how in ("disk", "memory")}
    assert runs["memory"]._memory_sum is not None and runs["disk"]._memory_sum is None
    _three_rounds(runs, monkeypatch, reads_terms={"disk"})
    assert runs["memory"].phase is Phase.COMPLETED and runs["memory"]._memory_sum is None  # its memory went back


def test_a_run_whose_sum_gets_no_memory_goes_on_with_the_sum_on_disk(tmp_path, monkeypatch, caplog):
    def no_memory(nbytes):
        raise MemoryError(f"{nbytes} bytes for the round's sum: Cannot allocate memory")

    monkeypatch.setattr(memory_sum, "populated_zeros", no_memory)
    runs = {how: _run(tmp_path / how, how) for how in ("disk", "memory")}
    _three_rounds(runs, monkeypatch, reads_terms={"disk", "memory"})
    assert runs["memory"]._memory_sum is None
    assert "the round sum stays on disk only: " in caplog.text and "Cannot allocate memory" in caplog.text


def test_a_run_that_keeps_its_sum_in_memory_allocates_it_when_it_starts_not_at_its_first_upload(tmp_path, monkeypatch):
    allocated: list[int] = []
    real = memory_sum.populated_zeros

    def recording(nbytes):
        allocated.append(nbytes)
        return real(nbytes)

    monkeypatch.setattr(memory_sum, "populated_zeros", recording)
    run = _run(tmp_path / "memory", "memory")
    memory = run._memory_sum
    assert memory is not None
    memory._preparing.join(timeout=30)
    assert not memory._preparing.is_alive()
    assert allocated == [memory.nbytes]  # before any upload
    runs = {"memory": run, "disk": _run(tmp_path / "disk", "disk")}
    _three_rounds(runs, monkeypatch, reads_terms={"disk"})  # every close from the buffer allocated at the start
    assert allocated == [memory.nbytes]


def test_the_buffer_is_cleared_once_when_made_and_then_once_a_round(tmp_path, monkeypatch):
    clears = []
    real = MemorySum._clear

    def counting(self):
        clears.append(self)
        return real(self)

    monkeypatch.setattr(MemorySum, "_clear", counting)
    runs = {how: _run(tmp_path / how, how) for how in ("memory", "disk")}
    runs["memory"]._memory_sum._preparing.join(timeout=30)
    assert len(clears) == 1  # made: -0.0 everywhere
    _three_rounds(runs, monkeypatch, reads_terms={"disk"})
    assert len(clears) == 3  # not again at round 0's first upload; at rounds 1 and 2's, the last round's sums


def test_populated_zeros_are_zeros_of_the_size_asked_whatever_the_steps():
    nbytes = 2 * memory_sum.POPULATE_STEP + 4096 + 8
    zeros = memory_sum.populated_zeros(nbytes)
    assert zeros.nbytes == nbytes and zeros.dtype == np.uint8 and not zeros.any()
    zeros[-1] = 1  # writable to its last byte
    assert memory_sum.populated_zeros(0).nbytes == 0


# ---- over gRPC with mutual TLS ------------------------------------------------------------------------------------


@pytest.fixture
def memory_federation(tmp_path):
    """A running in-process server whose run keeps its round sum in memory: one round, 3 sites, many chunks."""
    from conftest import training_run_files

    ws, mmar = training_run_files(
        tmp_path,
        BIG,
        clients=3,
        min_num_clients=3,
        num_rounds=1,
        wait_after_min_clients=30,
        heart_beat_timeout=30,
        round_sum="memory",
    )
    server = FederationServer(
        ws / "server", load_kit(ws / "server"), fl_port=0, stream_deadlines=StreamDeadlines(idle_s=5, window_s=5)
    )
    server.start_run(mmar)
    port = server.start()
    yield server, ws, f"127.0.0.1:{port}"
    server.stop(0)


def test_three_uploads_at_once_close_the_round_from_memory_with_their_mean(memory_federation, monkeypatch):
    server, ws, target = memory_federation
    assert server.runs[1]._memory_sum is not None
    sites = {f"site-{k}": _site(ws, f"site-{k}", target) for k in (1, 2, 3)}
    replies = {}
    go = threading.Barrier(3)

    def upload(site: str, k: int) -> None:
        stub, md = sites[site]
        chunks = list(encode_tensors(_delta(k)))

        def stream():
            yield _header()
            go.wait(30)  # all three are being received at once
            yield from chunks

        replies[site] = stub.SubmitUpdate(stream(), metadata=md, timeout=60)

    seals = _seals(monkeypatch)
    threads = [threading.Thread(target=upload, args=(f"site-{k}", k)) for k in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert all(r.accepted for r in replies.values()) and len(replies) == 3, replies
    assert server.runs[1].phase is Phase.COMPLETED and seals == [True]
    new = load_model(_models(server) / GLOBAL_MODEL)[0]
    np.testing.assert_allclose(new["w"], BIG["w"] + 2.0, rtol=1e-6)  # the mean of 1, 2 and 3
    np.testing.assert_allclose(new["b"], BIG["b"] + 2.0, rtol=1e-6)
    assert list((_models(server) / "staging").iterdir()) == []


def test_a_refused_upload_in_a_round_kept_in_memory_is_not_averaged(memory_federation, monkeypatch):
    server, ws, target = memory_federation
    seals = _seals(monkeypatch)
    (s1, md1), (s2, md2), (s3, md3) = (_site(ws, f"site-{k}", target) for k in (1, 2, 3))
    assert s1.SubmitUpdate(iter([_header(), *encode_tensors(_delta(1))]), metadata=md1, timeout=30).accepted
    poisoned = _delta(1000)
    poisoned["w"][-1, -1] = np.inf  # in the last chunk: the rest was mirrored already
    reply = s2.SubmitUpdate(iter([_header(), *encode_tensors(poisoned)]), metadata=md2, timeout=30)
    assert not reply.accepted and "NaN or Inf" in reply.reason
    for stub, md, k in ((s2, md2, 2), (s3, md3, 3)):
        assert stub.SubmitUpdate(iter([_header(), *encode_tensors(_delta(k))]), metadata=md, timeout=30).accepted
    assert server.runs[1].phase is Phase.COMPLETED and seals == [False]  # the close read the terms
    new = load_model(_models(server) / GLOBAL_MODEL)[0]
    np.testing.assert_allclose(new["w"], BIG["w"] + 2.0, rtol=1e-6)
