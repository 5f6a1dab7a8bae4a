"""GlobalModelFile: the received global model on disk, private, nameless, read back exactly, gone when closed."""

from __future__ import annotations

import errno
import os
import stat
import threading

import ml_dtypes
import numpy as np
import pytest

from fedclient.global_model_file import GlobalModelFile, GlobalModelWriter
from fedcommon.direct_io import BLOCK, aligned_empty

MODEL = {
    "w": np.arange(12, dtype=np.float32).reshape(3, 4) / 8,
    "h": np.arange(5, dtype=np.float16),
    "bf": np.arange(3, dtype=np.float32).astype(ml_dtypes.bfloat16),
    "steps": np.array(41, np.int64),
    "empty": np.zeros((0, 2), np.float32),
}


def _fd_link(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_every_variable_reads_back_exactly_as_a_fresh_array(tmp_path):
    stored = GlobalModelFile(MODEL, tmp_path)
    try:
        assert list(stored) == list(MODEL) and len(stored) == len(MODEL)
        for name, arr in MODEL.items():
            got = stored[name]
            assert got.dtype == arr.dtype and got.shape == arr.shape, name
            np.testing.assert_array_equal(got, arr, err_msg=name)
            assert got.flags.writeable and got is not stored[name]  # each read is a new array the caller owns
            assert stored.entry(name).shape == arr.shape and stored.entry(name).dtype == arr.dtype
        with pytest.raises(KeyError):
            stored["not-a-variable"]
    finally:
        stored.close()


def test_what_was_written_no_longer_depends_on_the_arrays_it_came_from(tmp_path):
    source = {"w": np.ones(4, np.float32)}
    stored = GlobalModelFile(source, tmp_path)
    source["w"][:] = 9.0
    np.testing.assert_array_equal(stored["w"], np.ones(4, np.float32))
    stored.close()


def test_the_file_is_private_and_has_no_name_in_its_folder(tmp_path):
    stored = GlobalModelFile(MODEL, tmp_path)
    try:
        st = os.fstat(stored.fileno())
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_nlink == 0  # no path opens it: not another process, not `shell ls`
        assert st.st_size >= sum(a.nbytes for a in MODEL.values())
        assert list(tmp_path.iterdir()) == []
        link = _fd_link(stored.fileno())
        assert link.startswith(f"{tmp_path}/") and link.endswith("(deleted)")  # on the folder's disk
    finally:
        stored.close()


def test_close_gives_the_file_back_and_reading_afterwards_is_refused(tmp_path):
    stored = GlobalModelFile(MODEL, tmp_path)
    fd = stored.fileno()
    stored.close()
    assert not os.path.exists(f"/proc/self/fd/{fd}") or not _fd_link(fd).startswith(f"{tmp_path}/")
    with pytest.raises(ValueError):
        stored["w"]
    stored.close()  # twice is harmless


def test_a_store_dropped_without_close_still_closes_its_file(tmp_path):
    stored = GlobalModelFile(MODEL, tmp_path)
    fd = stored.fileno()
    del stored
    assert not os.path.exists(f"/proc/self/fd/{fd}") or not _fd_link(fd).startswith(f"{tmp_path}/")


def test_a_dtype_the_wire_does_not_carry_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match="complex"):
        GlobalModelFile({"z": np.zeros(2, np.complex64)}, tmp_path)


def test_asking_whether_a_variable_is_there_reads_nothing(tmp_path, monkeypatch):
    stored = GlobalModelFile(MODEL, tmp_path)
    monkeypatch.setattr(os, "preadv", lambda *a: pytest.fail("a membership test read the file"))
    assert "w" in stored and "nope" not in stored
    stored.close()


def test_sizes_that_are_not_whole_blocks_or_fit_no_single_write_read_back_exactly(tmp_path):
    rng = np.random.default_rng(3)
    odd = {
        "big": rng.integers(0, 255, 9 * 1024 * 1024 + 3, dtype=np.uint8),  # more than one bounce buffer
        "tail": rng.random(1023, dtype=np.float32),
        "one": np.array([2.5], np.float64),
    }
    stored = GlobalModelFile(odd, tmp_path)
    try:
        for name, arr in odd.items():
            np.testing.assert_array_equal(stored[name], arr, err_msg=name)
    finally:
        stored.close()


def test_where_direct_io_is_refused_at_open_the_file_is_written_through_the_page_cache(tmp_path, monkeypatch):
    from fedclient import global_model_file

    monkeypatch.setattr(global_model_file, "set_direct", lambda fd, on: False)
    stored = GlobalModelFile(MODEL, tmp_path)
    assert stored.direct is False
    for name, arr in MODEL.items():
        np.testing.assert_array_equal(stored[name], arr, err_msg=name)
    stored.close()


def test_where_direct_io_is_refused_on_write_it_is_turned_off_and_the_write_retried(tmp_path, monkeypatch):
    real, refused = os.pwrite, []

    def pwrite(fd, data, offset):
        if not refused:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    stored = GlobalModelFile(MODEL, tmp_path)
    assert refused == [0] and stored.direct is False
    for name, arr in MODEL.items():
        np.testing.assert_array_equal(stored[name], arr, err_msg=name)
    stored.close()


# ---- GlobalModelWriter: the file written by a thread as the variables arrive ------------------------------------


def _writer_alive() -> bool:
    return any(t.name == "global-model-writer" and t.is_alive() for t in threading.enumerate())


def test_variables_added_one_by_one_read_back_exactly(tmp_path):
    aligned = aligned_empty(3 * BLOCK + 5).view(np.uint8)  # a block-aligned buffer, as a download decodes into
    aligned[:] = np.arange(aligned.size) % 251
    model = {**MODEL, "aligned": aligned, "odd": np.arange(9 * 1024 * 1024 + 3, dtype=np.uint8)[1:]}
    writer = GlobalModelWriter(tmp_path)
    for name, arr in model.items():
        writer.add(name, arr)
    writer.close_input()
    stored = writer.finish()
    try:
        assert list(stored) == list(model) and not _writer_alive()
        for name, arr in model.items():
            np.testing.assert_array_equal(stored[name], arr, err_msg=name)
            assert stored[name].dtype == arr.dtype and stored[name].shape == arr.shape, name
    finally:
        stored.close()


def test_an_aligned_array_goes_to_disk_from_its_own_memory(tmp_path, monkeypatch):
    arr = aligned_empty(4 * BLOCK).view(np.float32)
    arr[:] = 1.5
    sources = []
    real = os.pwrite

    def pwrite(fd, data, offset):
        sources.append(np.frombuffer(data, np.uint8).ctypes.data)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    writer = GlobalModelWriter(tmp_path)
    writer.add("w", arr)
    stored = writer.finish()
    assert sources == [arr.ctypes.data]  # no bounce copy
    np.testing.assert_array_equal(stored["w"], arr)
    stored.close()


def test_a_write_that_fails_is_raised_naming_the_variable_and_the_thread_ends(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    writer = GlobalModelWriter(tmp_path)
    writer.add("w", MODEL["w"])
    with pytest.raises(OSError, match="variable 'w'.*No space left"):
        writer.finish()
    assert not _writer_alive()


def test_an_aborted_writer_ends_its_thread_and_gives_the_file_back(tmp_path):
    writer = GlobalModelWriter(tmp_path)
    writer.add("w", MODEL["w"])
    writer.abort()
    assert not _writer_alive()
    assert not any(os.readlink(f"/proc/self/fd/{fd}").startswith(f"{tmp_path}/") for fd in _open_fds())


def test_a_writer_refuses_a_name_twice_and_a_dtype_without_a_wire_name(tmp_path):
    writer = GlobalModelWriter(tmp_path)
    try:
        writer.add("w", MODEL["w"])
        with pytest.raises(ValueError, match="'w' comes twice"):
            writer.add("w", MODEL["w"])
        with pytest.raises(ValueError, match="'z'"):
            writer.add("z", np.zeros(2, np.complex64))
    finally:
        writer.abort()


def _open_fds() -> list[str]:
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{fd}")
            fds.append(fd)
        except OSError:
            continue
    return fds
