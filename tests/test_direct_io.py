"""Direct I/O for the server's model-sized files: combined block writes, read-ahead, and the page-cache fallback."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from fedcommon import direct_io
from fedcommon.atomic import atomic_writer
from fedcommon.chunk_wire import DataChunk
from fedcommon.direct_io import BLOCK, DirectWriter, ReadAhead, in_page_cache, open_direct, range_bytes, read_range
from fedcommon.model_file import (
    DIRECT_MIN_BYTES,
    ModelFileWriter,
    iter_model_chunks,
    load_model,
    read_index,
    read_tensor,
    save_model,
)
from fedcommon.tensor_codec import encode_tensors
from fedserver.aggregator import VarSpec
from fedserver.staged_upload import STAGE, StagedUpload, stage_tensors

# Runs that continue each other, jumps forward and back, offsets and lengths that are not whole blocks, and one
# write longer than the writer's buffer.
WRITES = [(0, 100), (100, 5000), (5100, 3), (20000, 9000), (7, 50), (4090, 20), (60000, 70000), (29000, 31000)]


def _bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _expected(initial: bytes, writes: list[tuple[int, int]]) -> bytes:
    content = bytearray(initial)
    for k, (offset, n) in enumerate(writes):
        end = offset + n
        if end > len(content):
            content += bytes(end - len(content))
        content[offset:end] = _bytes(n, k)
    return bytes(content)


def _write_all(path, writes: list[tuple[int, int]]) -> DirectWriter:
    """Make `writes` (offset, length: that many bytes of _bytes) through a DirectWriter with a small buffer."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        writer = DirectWriter(fd, buffer_bytes=4 * BLOCK)
        for k, (offset, n) in enumerate(writes):
            writer.pwrite(_bytes(n, k), offset)
        writer.close()
    finally:
        os.close(fd)
    return writer


@pytest.mark.parametrize("initial", [b"", _bytes(3 * BLOCK + 17, 99), _bytes(200000, 98)])
def test_combined_writes_give_the_file_plain_writes_give_and_keep_what_no_write_covered(tmp_path, initial):
    path = tmp_path / "f"
    path.write_bytes(initial)
    _write_all(path, WRITES)
    assert path.read_bytes() == _expected(initial, WRITES)


def test_a_model_file_written_through_the_direct_atomic_writer_is_byte_for_byte_the_plain_one(tmp_path):
    model = {"w": np.linspace(-1, 1, 300001, dtype=np.float32), "h": np.arange(7, dtype=np.float16), "s": np.ones(())}
    save_model(tmp_path / "plain.fl", model, {"round": 3})
    with atomic_writer(tmp_path / "direct.fl", direct=True) as f:
        writer = ModelFileWriter(f, [(n, a.dtype, a.shape) for n, a in model.items()], {"round": 3})
        for name in ("s", "w", "h"):  # out of layout order: the writer seeks back
            writer.write(name, model[name])
        writer.check_complete()
    assert (tmp_path / "direct.fl").read_bytes() == (tmp_path / "plain.fl").read_bytes()
    assert oct((tmp_path / "direct.fl").stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.fl", "plain.fl"]


def test_a_direct_atomic_write_that_fails_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "model.fl"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="broken"), atomic_writer(target, direct=True) as f:
        f.write(_bytes(3 * BLOCK + 5, 1))
        raise RuntimeError("broken")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.fl"]


def _refuse_direct(monkeypatch, where: str) -> list[int]:
    """Make the file system refuse direct I/O at open, or on the first write (EINVAL); returns the refused offsets."""
    refused: list[int] = []
    if where == "open":
        monkeypatch.setattr(direct_io, "set_direct", lambda fd, on: False)
        return refused
    real = os.pwrite

    def pwrite(fd, data, offset):
        if refused:
            return real(fd, data, offset)
        refused.append(offset)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "pwrite", pwrite)
    return refused


@pytest.mark.parametrize("where", ["open", "write"])
def test_where_direct_io_is_refused_writes_go_through_the_page_cache(tmp_path, monkeypatch, where):
    refused = _refuse_direct(monkeypatch, where)
    writer = _write_all(tmp_path / "f", WRITES)
    assert writer.direct is False and len(refused) == (where == "write")
    assert (tmp_path / "f").read_bytes() == _expected(b"", WRITES)


def test_a_failed_write_is_raised_by_the_writer_not_lost_in_its_thread(tmp_path, monkeypatch):
    def pwrite(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", pwrite)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        writer = DirectWriter(fd, buffer_bytes=4 * BLOCK)
        with pytest.raises(OSError, match="No space"):
            writer.pwrite(_bytes(10 * BLOCK, 0), 0)
            writer.close()
    finally:
        os.close(fd)


def test_ranges_read_ahead_are_the_files_bytes_wherever_they_start(tmp_path):
    content = [_bytes(300000, 5), _bytes(300000, 6)]
    fds = []
    for k, data in enumerate(content):
        (tmp_path / f"f{k}").write_bytes(data)
        fds.append(open_direct(tmp_path / f"f{k}")[0])
    try:
        starts = list(range(100, 290000, 7 * BLOCK + 3))
        batches = [[(fd, s, min(7 * BLOCK + 3, 300000 - s)) for fd in fds] for s in starts]
        ahead = ReadAhead(7 * BLOCK + 3)
        got = [[v.tobytes() for v in views] for views in ahead.read(batches, "test file")]
        again = [[v.tobytes() for v in views] for views in ahead.read(batches[::-1], "test file")]
    finally:
        for fd in fds:
            os.close(fd)
    assert got == [[data[s : s + min(7 * BLOCK + 3, 300000 - s)] for data in content] for s in starts]
    assert again == got[::-1]  # its buffers, reused, hold each new batch


def test_a_range_past_the_end_of_the_file_is_refused_naming_it(tmp_path):
    (tmp_path / "f").write_bytes(_bytes(5000, 1))
    fd, _ = open_direct(tmp_path / "f")
    try:
        buf = direct_io.aligned_empty(range_bytes(4000, 2000))
        with pytest.raises(OSError, match="the sum file ends early"):
            read_range(fd, buf, 4000, 2000, "the sum file")
    finally:
        os.close(fd)


def test_a_staged_upload_starts_each_variable_at_a_block_and_reads_back_exactly(tmp_path):
    update = {"a": np.linspace(-3, 3, 1001, dtype=np.float32), "b": np.arange(-4, 5, dtype=np.int16)}
    specs = {n: VarSpec(a.dtype, a.shape) for n, a in update.items()}
    staged = StagedUpload(tmp_path, specs)
    stage_tensors(encode_tensors(update, chunk_bytes=999), lambda s: STAGE, staged, "an upload")
    staged.close()
    with open(staged.path, "rb") as f:
        assert all(e.offset % BLOCK == 0 for e in read_index(f).entries)
    arrays, _ = load_model(staged.path)
    np.testing.assert_array_equal(arrays["a"], update["a"])
    np.testing.assert_array_equal(arrays["b"], update["b"].astype(np.float32))
    staged.discard()


@pytest.mark.parametrize("where", ["open", "write"])
def test_where_direct_io_is_refused_an_upload_is_staged_through_the_page_cache(tmp_path, monkeypatch, where):
    _refuse_direct(monkeypatch, where)
    update = {"a": np.linspace(-3, 3, 100001, dtype=np.float32)}
    staged = StagedUpload(tmp_path, {"a": VarSpec(np.dtype(np.float32), (100001,))})
    stage_tensors(encode_tensors(update, chunk_bytes=4097), lambda s: STAGE, staged, "an upload")
    staged.close()
    assert staged.direct is False
    np.testing.assert_array_equal(load_model(staged.path)[0]["a"], update["a"])
    staged.discard()
    assert not any(tmp_path.iterdir())


def _evicted(path) -> None:
    """Drop `path`'s pages from the page cache (written back first), as after a direct write."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_large_tensor_not_in_the_page_cache_is_read_and_streamed_without_filling_it(tmp_path):
    model = {"big": np.linspace(-1, 1, 3 * DIRECT_MIN_BYTES // 4 + 5, dtype=np.float32), "small": np.arange(9.0)}
    path = tmp_path / "m.fl"
    save_model(path, model)
    _evicted(path)
    with open(path, "rb") as f:
        index = read_index(f)
        big = index.by_name()["big"]
        if in_page_cache(f.fileno(), big.offset, big.nbytes):
            pytest.skip("this file system keeps the pages cached after POSIX_FADV_DONTNEED")
        np.testing.assert_array_equal(read_tensor(f, big), model["big"])
        streamed = [bytes(c.data) for c in iter_model_chunks(f, index, chunk_bytes=1 << 20) if isinstance(c, DataChunk)]
        reopened, _ = direct_io.reopen_direct(f.fileno())
        direct = direct_io.set_direct(reopened, True)
        os.close(reopened)
        assert not direct or not in_page_cache(f.fileno(), big.offset, big.nbytes)
    assert b"".join(streamed) == b"".join(model[n].tobytes() for n in ("big", "small"))
    arrays, _ = load_model(path)
    np.testing.assert_array_equal(arrays["big"], model["big"])
