"""GlobalModelFile: the received global model on disk, private, nameless, read back exactly, gone when closed."""

from __future__ import annotations

import errno
import os
import stat

import ml_dtypes
import numpy as np
import pytest

from fedclient.global_model_file import GlobalModelFile

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
