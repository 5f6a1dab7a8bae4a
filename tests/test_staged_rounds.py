"""The server's memory: uploads staged on disk as they arrive, the open round's sum on disk, bounded downloads."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import training_run_files
from test_run_rounds import _config as run_rounds_config

from fedcommon.chunk_wire import TrainingStub
from fedcommon.kit import channel_credentials, load_kit
from fedcommon.mmar import ServerConfig
from fedcommon.model_file import load_model, read_index, save_model
from fedcommon.tensor_codec import CodecError, encode_tensors
from fedcommon.wire import training_pb2 as pb
from fedserver import run as run_module
from fedserver.aggregator import ContributionError, UpdateAccumulator, VarSpec
from fedserver.disk_sum import DiskSum, finish_deletions, remove_term_files
from fedserver.run import GLOBAL_MODEL, FederatedRun, Phase
from fedserver.server import FederationServer
from fedserver.staged_upload import STAGE, StagedUpload, stage_tensors
from fedserver.stream_watch import StreamDeadlines
from fedserver.transfer_slots import SlotTimeout, TransferSlots

# Large enough that an upload or a download is many 2 MiB chunks.
BIG = {"w": np.linspace(-1, 1, 3 << 20, dtype=np.float32).reshape(3 << 10, 1024), "b": np.zeros(7, np.float32)}
SMALL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 4, "h": np.ones(5, np.float16)}


# ---- one upload, staged ---------------------------------------------------------------------------------------


def _specs(model: dict[str, np.ndarray]) -> dict[str, VarSpec]:
    return {n: VarSpec(a.dtype, a.shape) for n, a in model.items()}


def test_an_upload_is_staged_in_its_accumulator_dtypes_whatever_the_chunk_boundaries(tmp_path):
    model = {"h": np.zeros(33, np.float16), "u": np.zeros(9, np.uint8), "w": np.zeros((5, 3), np.float32)}
    update = {
        "h": np.linspace(-2, 2, 33).astype(np.float16),
        "u": np.array([255, 1, 0, 7, 128, 3, 2, 1, 254], np.uint8),  # wrapped-around negatives
        "w": np.arange(15, dtype=np.float32).reshape(5, 3) - 7,
    }
    staged = StagedUpload(tmp_path, _specs(model))
    # 3-byte chunks split float16 and float32 elements across chunks.
    received, size = stage_tensors(encode_tensors(update, chunk_bytes=3), lambda s: STAGE, staged, "an upload")
    staged.close()
    assert (received, size) == (3, sum(a.nbytes for a in update.values()))
    arrays, _ = load_model(staged.path)
    assert arrays["h"].dtype == np.float32 and arrays["u"].dtype == np.float64
    np.testing.assert_array_equal(arrays["h"], update["h"].astype(np.float32))
    np.testing.assert_array_equal(arrays["u"], update["u"].view(np.int8).astype(np.float64))
    np.testing.assert_array_equal(arrays["w"], update["w"])
    staged.discard()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("chunks", "error", "message"),
    [
        (lambda: encode_tensors({"w": np.array([1, np.nan, 3], np.float32)}, chunk_bytes=4), ContributionError, "NaN"),
        (lambda: list(encode_tensors({"w": np.ones(3, np.float32)}, chunk_bytes=5))[:-1], ContributionError, "early"),
        (lambda: [*encode_tensors({"w": np.ones(3, np.float32)}), pb.ModelChunk(data=b"x")], CodecError, "outside"),
    ],
)
def test_a_refused_upload_leaves_no_staging_file_behind(tmp_path, chunks, error, message):
    staged = StagedUpload(tmp_path, {"w": VarSpec(np.dtype(np.float32), (3,))})
    with pytest.raises(error, match=message):
        try:
            stage_tensors(chunks(), lambda s: STAGE, staged, "an upload")
        finally:
            staged.discard()
    assert not any(tmp_path.iterdir())


# ---- the sum on disk ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_bytes", [None, 4096], ids=["sized to the model", "a variable in three blocks"])
def test_the_disk_sum_folds_terms_to_exactly_what_the_in_memory_sum_gives(tmp_path, block_bytes):
    rng = np.random.default_rng(3)
    model = {"a": np.zeros((300, 7), np.float32), "i": np.zeros(4, np.int32), "x": np.zeros(3, np.float32)}
    specs = _specs(model)
    in_memory = UpdateAccumulator(specs, frozenset({"x"}), 100.0)
    on_disk = DiskSum(tmp_path, specs, frozenset({"x"}), 100.0, block_bytes=block_bytes)
    for k in range(7):
        update = {"a": rng.normal(size=(300, 7)).astype(np.float32), "i": rng.integers(-5, 5, 4).astype(np.int32)}
        if k == 3:
            del update["i"]  # a contribution that does not carry a variable
        weight = float(k + 1) * 3.5
        on_disk.add(StagedUpload.from_arrays(tmp_path / "staging", specs, frozenset({"x"}), dict(update)), weight)
        in_memory.add({n: a.copy() for n, a in update.items()}, weight)
        assert len(list(tmp_path.glob("open_round.*.fl"))) <= 2 + 2  # at most max_terms, and the folded ones
        on_disk.drop_retired()
    for name in ("a", "i"):
        np.testing.assert_array_equal(on_disk.take_mean(name), in_memory.take_mean(name))
    assert on_disk.take_mean("x") is None
    on_disk.clear()
    assert not list(tmp_path.glob("open_round.*.fl"))


def test_the_disk_sum_gives_the_same_means_whatever_order_they_are_asked_in(tmp_path):
    rng = np.random.default_rng(4)
    model = {n: np.zeros(s, np.float32) for n, s in (("a", (3 << 20) + 5), ("b", 0), ("c", 7), ("d", 1 << 20))}
    specs = _specs(model)
    in_memory, on_disk = UpdateAccumulator(specs), DiskSum(tmp_path, specs)
    for k in range(2):
        update = {n: rng.normal(size=a.shape).astype(np.float32) for n, a in model.items()}
        on_disk.add(StagedUpload.from_arrays(tmp_path / "staging", specs, frozenset(), dict(update)), k + 1.5)
        in_memory.add(update, k + 1.5)
    expected = {n: in_memory.take_mean(n) for n in model}
    for order in (
        ["a", "b", "c", "d"],
        ["d", "a", "c", "b"],
        ["c", "d"],
    ):  # in layout order, backwards, from the middle
        for name in order:
            np.testing.assert_array_equal(on_disk.take_mean(name), expected[name], err_msg=f"{name} in {order}")
    on_disk.clear()
    assert not list(tmp_path.glob("open_round.*.fl"))


def test_a_cleared_sum_leaves_its_file_names_free_at_once_and_its_files_are_deleted_behind_it(tmp_path, monkeypatch):
    model = {"a": np.zeros((300, 7), np.float32)}
    specs = _specs(model)
    deletions_may_go = threading.Event()
    real_unlink = Path.unlink

    def held_unlink(path, missing_ok=False):
        if path.parent == tmp_path:  # a sum file: deleting a model-sized one takes its time
            deletions_may_go.wait(10)
        return real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", held_unlink)
    total = DiskSum(tmp_path, specs)
    for k in range(3):
        total.add(StagedUpload.from_arrays(tmp_path / "staging", specs, frozenset(), {"a": model["a"] + k}), 1.0)
    clearing = threading.Thread(target=total.clear)
    clearing.start()
    clearing.join(5)
    try:
        assert not clearing.is_alive(), "clear waited for the files' deletion"
        assert not list(tmp_path.glob("open_round.*.fl"))
        assert len(list(tmp_path.glob("retired.*.fl"))) == 4  # the two folded terms, their fold, the third term
        again = DiskSum(tmp_path, specs)  # the next round's terms take the same names
        again.add(StagedUpload.from_arrays(tmp_path / "staging", specs, frozenset(), {"a": model["a"] + 7}), 1.0)
    finally:
        deletions_may_go.set()
    finish_deletions(10)
    assert not list(tmp_path.glob("retired.*"))
    assert sorted(p.name for p in tmp_path.glob("open_round.*.fl")) == ["open_round.1.fl"]
    np.testing.assert_array_equal(again.take_mean("a"), model["a"] + 7)


def test_files_a_stopped_server_left_to_delete_are_deleted_with_the_unnamed_terms(tmp_path):
    for name in ("retired.0123456789abcdef.fl", "open_round.3.fl", "open_round.4.fl", "retired.notours.fl"):
        (tmp_path / name).write_bytes(b"x")
    remove_term_files(tmp_path, keep={"open_round.4.fl"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["open_round.4.fl", "retired.notours.fl"]


# ---- the open round, on disk, across a restart ------------------------------------------------------------------


def _config(**changes) -> ServerConfig:
    return run_rounds_config(**{"min_num_clients": 4, "num_rounds": 1, **changes})


def _contribute(run: FederatedRun, site: str, k: int) -> None:
    run.begin_contribution(site, 0)
    update = {n: (a + k).astype(a.dtype) for n, a in SMALL.items()}
    run.commit_contribution(site, 0, update, float(k), {}, lambda: {f"site-{i}" for i in range(1, 5)})


def _fresh_run(folder: Path) -> FederatedRun:
    save_model(folder / "models" / GLOBAL_MODEL, SMALL)
    return FederatedRun(1, folder, _config())


def test_a_restart_mid_round_resumes_with_the_accepted_contributions_from_the_on_disk_sum(tmp_path):
    whole, run = _fresh_run(tmp_path / "a"), _fresh_run(tmp_path / "b")
    for r in (whole, run):
        for k in (1, 2, 3):  # the third folds the first two into one file
            _contribute(r, f"site-{k}", k)
    snapshot = json.loads(run.open_round_path.read_text())
    named = sorted(t["file"] for t in snapshot["terms"])
    assert sorted(p.name for p in (tmp_path / "b" / "models").glob("open_round.*.fl")) == named
    assert list((tmp_path / "b" / "models" / "staging").iterdir()) == []

    resumed = FederatedRun(1, tmp_path / "b", _config(), resume=True)
    assert resumed.status()["contributors"] == ["site-1", "site-2", "site-3"]
    for r in (whole, resumed):
        _contribute(r, "site-4", 4)
    assert resumed.phase is Phase.COMPLETED
    for name, arr in load_model(whole.model_path)[0].items():
        np.testing.assert_array_equal(load_model(resumed.model_path)[0][name], arr)
    assert not list((tmp_path / "b" / "models").glob("open_round*"))


def test_after_a_reboot_the_unsynced_sum_is_not_trusted_and_the_round_starts_empty(tmp_path, monkeypatch):
    run = _fresh_run(tmp_path)
    _contribute(run, "site-1", 1)
    other_boot = tmp_path / "boot_id"
    other_boot.write_text("another-boot\n")
    monkeypatch.setattr(run_module, "BOOT_ID", other_boot)
    resumed = FederatedRun(1, tmp_path, _config(), resume=True)
    assert resumed.current_round == 0 and resumed.status()["contributors"] == []
    assert not list((tmp_path / "models").glob("open_round*"))


# ---- slots ----------------------------------------------------------------------------------------------------


def test_transfer_slots_beyond_the_limit_wait_their_turn_and_a_site_holds_its_share_only():
    slots = TransferSlots(2, per_holder=1, what="download")
    order: list[str] = []
    first = threading.Event()

    def take(holder: str) -> None:
        with slots.hold(holder, timeout=10):
            order.append(holder)

    with slots.hold("site-1"):
        with pytest.raises(SlotTimeout, match="download slots stayed busy"):
            with slots.hold("site-1", timeout=0.2):  # its one slot is taken, though another is free
                pass
        with slots.hold("site-2"):
            waiter = threading.Thread(target=take, args=("site-3",))
            waiter.start()
            first.wait(0.3)
            assert order == [] and slots.in_use == 2  # full: site-3 waits
        waiter.join(10)
    assert order == ["site-3"] and slots.in_use == 0


def test_a_leased_slot_is_kept_for_its_holder_whose_next_hold_takes_it_without_waiting():
    slots = TransferSlots(1, per_holder=1, what="upload")
    slots.lease("site-1", keep_s=30)
    assert slots.in_use == 1
    with pytest.raises(SlotTimeout, match="upload slots stayed busy"):
        with slots.hold("site-2", timeout=0.2):
            pass
    with slots.hold("site-1", timeout=0):  # no wait: the lease's slot becomes the hold's
        assert slots.in_use == 1
    assert slots.in_use == 0
    with slots.hold("site-2", timeout=0):
        pass


def test_a_lease_nobody_takes_frees_its_slot_when_released_or_when_it_lapses():
    slots = TransferSlots(1, per_holder=1, what="upload")
    kept = slots.lease("site-1", keep_s=30)
    assert slots.lease("site-1", keep_s=30, timeout=0) == kept  # asked again: the same lease, not a second slot
    got = threading.Event()

    def take() -> None:
        with slots.hold("site-2", timeout=10):
            got.set()

    waiter = threading.Thread(target=take)
    waiter.start()
    assert not got.wait(0.3)
    slots.release(kept)
    assert got.wait(5)
    waiter.join(10)
    slots.release(kept)  # released twice, or after a hold took it: nothing happens
    slots.lease("site-1", keep_s=0.2)
    began = time.monotonic()
    with slots.hold("site-2", timeout=10):  # waits for the lease to lapse
        assert 0.1 < time.monotonic() - began < 5
    assert slots.in_use == 0


# ---- over gRPC with mutual TLS --------------------------------------------------------------------------------


@pytest.fixture
def federation(tmp_path):
    """A running in-process server: run 1, one round, 3 sites needed, a model of many chunks."""
    ws, mmar = training_run_files(
        tmp_path, BIG, clients=3, min_num_clients=3, num_rounds=1, wait_after_min_clients=30, heart_beat_timeout=30
    )
    server = FederationServer(
        ws / "server", load_kit(ws / "server"), fl_port=0, stream_deadlines=StreamDeadlines(idle_s=2, window_s=2)
    )
    server.download_slots = TransferSlots(1, 1, "download")
    server.start_run(mmar)
    port = server.start()
    yield server, ws, f"127.0.0.1:{port}"
    server.stop(0)


def _site(ws: Path, site: str, target: str, options: tuple = ()):
    channel = grpc.secure_channel(target, channel_credentials(load_kit(ws / site)), options)
    stub = TrainingStub(channel)
    token = stub.Register(pb.RegisterRequest(client_name=site), timeout=10).token
    return stub, (("fl-token", token),)


def _header(num_tensors: int = 2) -> pb.ModelChunk:
    return pb.ModelChunk(
        header=pb.ModelHeader(run_number=1, round=0, kind="delta_w", weight=1.0, num_tensors=num_tensors)
    )


def _delta(k: float) -> dict[str, np.ndarray]:
    return {n: np.full(a.shape, k, a.dtype) for n, a in BIG.items()}


def _models(server: FederationServer) -> Path:
    return server.runs[1].run_dir / "models"


def _files_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("open_round.*.fl"))}


def _until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_broken_upload_leaves_the_sum_as_it_was_and_its_staging_file_is_gone(federation):
    server, ws, target = federation
    (s1, md1), (s2, md2), (s3, md3) = (_site(ws, f"site-{k}", target) for k in (1, 2, 3))
    assert s1.SubmitUpdate(iter([_header(), *encode_tensors(_delta(1))]), metadata=md1, timeout=30).accepted
    before = (_files_digest(_models(server)), json.loads(server.runs[1].open_round_path.read_text())["terms"])

    poisoned = _delta(2)
    poisoned["w"][-1, -1] = np.inf  # in the last chunk: most of the upload was staged already
    reply = s2.SubmitUpdate(iter([_header(), *encode_tensors(poisoned)]), metadata=md2, timeout=30)
    assert not reply.accepted and "NaN or Inf" in reply.reason
    partial = list(encode_tensors(_delta(2)))[:-3]
    reply = s3.SubmitUpdate(iter([_header(), *partial]), metadata=md3, timeout=30)
    assert not reply.accepted and "ended early" in reply.reason

    after = (_files_digest(_models(server)), json.loads(server.runs[1].open_round_path.read_text())["terms"])
    assert after == before and server.runs[1].status()["contributors"] == ["site-1"]
    assert list((_models(server) / "staging").iterdir()) == []
    for stub, md, k in ((s2, md2, 2), (s3, md3, 3)):
        assert stub.SubmitUpdate(iter([_header(), *encode_tensors(_delta(k))]), metadata=md, timeout=30).accepted
    assert server.runs[1].phase is Phase.COMPLETED
    new = load_model(_models(server) / GLOBAL_MODEL)[0]
    np.testing.assert_allclose(new["w"], BIG["w"] + 2.0, rtol=1e-6)  # the mean of 1, 2 and 3
    assert list((_models(server) / "staging").iterdir()) == [] and not list(_models(server).glob("open_round*"))


def test_two_uploads_at_once_are_both_received_and_both_counted(federation):
    server, ws, target = federation
    staging = _models(server) / "staging"
    both_staging = threading.Event()
    replies = {}

    def upload(site: str, k: int) -> None:
        stub, md = _site(ws, site, target)
        chunks = list(encode_tensors(_delta(k)))

        def stream():
            yield _header()
            yield from chunks[:2]
            # Neither upload ends before both are being received at once.
            if _until(lambda: len(list(staging.glob("upload-*.fl"))) == 2):
                both_staging.set()
            yield from chunks[2:]

        replies[site] = stub.SubmitUpdate(stream(), metadata=md, timeout=30)

    threads = [threading.Thread(target=upload, args=(f"site-{k}", k)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert both_staging.is_set(), "the second upload waited for the first"
    assert all(r.accepted for r in replies.values()) and len(replies) == 2
    assert server.runs[1].status()["contributors"] == ["site-1", "site-2"]
    assert list(staging.iterdir()) == []


def test_an_upload_the_site_cancels_leaves_no_staging_file(federation):
    server, ws, target = federation
    stub, md = _site(ws, "site-1", target)
    staging = _models(server) / "staging"
    release = threading.Event()

    def stream():
        yield _header()
        yield from list(encode_tensors(_delta(1)))[:3]
        release.wait(20)

    call = stub.SubmitUpdate.future(stream(), metadata=md, timeout=30)
    assert _until(lambda: len(list(staging.glob("upload-*.fl"))) == 1)
    call.cancel()
    release.set()
    assert _until(lambda: not list(staging.iterdir()) and not server.runs[1]._round.receiving)
    assert server.runs[1].status()["contributors"] == []


def test_a_download_beyond_the_slots_waits_for_one_and_then_completes(federation):
    server, ws, target = federation
    stub, md = _site(ws, "site-1", target)
    got: list[tuple[float, pb.ModelChunk]] = []

    def download() -> None:
        for chunk in stub.GetModel(pb.GetModelRequest(wait_seconds=1), metadata=md, timeout=60):
            got.append((time.monotonic(), chunk))

    with server.download_slots.hold("another site"):
        thread = threading.Thread(target=download)
        thread.start()
        assert _until(lambda: len(got) == 1)  # the header comes at once
        time.sleep(0.5)
        assert len(got) == 1, "model bytes were sent without a slot"
        freed = time.monotonic()
    thread.join(30)
    assert got[0][1].header.status == pb.TRAIN and got[1][0] >= freed
    data = b"".join(bytes(c.data) for _, c in got if c.WhichOneof("part") == "data")
    assert len(data) == sum(a.nbytes for a in BIG.values())
    assert server.download_slots.in_use == 0


def test_a_receiver_that_stops_reading_loses_its_download_slot(federation):
    server, ws, target = federation
    # No window growth: the site's buffers fill after a few chunks and the server's send waits for it to read.
    stub, md = _site(ws, "site-1", target, (("grpc.http2.bdp_probe", 0),))
    call = stub.GetModel(pb.GetModelRequest(wait_seconds=1), metadata=md, timeout=60)
    next(call)  # the header; then the site reads nothing more
    assert _until(lambda: server.download_slots.in_use == 1)
    assert _until(lambda: server.download_slots.in_use == 0, timeout=15), "a stalled download kept its slot"
    with pytest.raises(grpc.RpcError):
        for _ in call:
            pass
    other, md2 = _site(ws, "site-2", target)
    chunks = list(other.GetModel(pb.GetModelRequest(wait_seconds=1), metadata=md2, timeout=60))
    assert chunks[0].header.status == pb.TRAIN and len(chunks) > 3


def test_the_snapshot_names_only_files_that_exist_and_fit_the_model(tmp_path):
    run = _fresh_run(tmp_path)
    _contribute(run, "site-1", 1)
    snapshot = json.loads(run.open_round_path.read_text())
    (term,) = snapshot["terms"]
    with open(tmp_path / "models" / term["file"], "rb") as f:
        names = [e.name for e in read_index(f).entries]
    assert names == ["w", "h"] and set(term["weights"]) == {"w", "h"}
    snapshot["terms"][0]["file"] = "../../escape.fl"
    run.open_round_path.write_text(json.dumps(snapshot))
    resumed = FederatedRun(1, tmp_path, _config(), resume=True)
    assert resumed.status()["contributors"] == []
