"""Hostile zips are refused before anything is written; good ones land atomically with nothing left behind."""

from __future__ import annotations

import os
import stat
import struct
import zipfile
from pathlib import Path

import pytest
from conftest import DIGITS

from fedcommon.mmar import MMARError, load_mmar
from fedcommon.safe_zip import UnsafeArchiveError, extract_zip_safely, zip_folder


def _zip(
    path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]], compression: int = zipfile.ZIP_DEFLATED
) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return path


def _symlink_entry(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def _listing(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def _assert_refused(tmp_path: Path, archive: Path, *fragments: str, **limits) -> None:
    dest = tmp_path / "out" / "mmar"
    before = _listing(tmp_path)
    with pytest.raises(UnsafeArchiveError) as err:
        extract_zip_safely(archive, dest, **limits)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert _listing(tmp_path) - before <= {"out"}, "nothing may be written for a refused archive"
    assert not dest.exists()


GOOD = [("config/config_train.json", b"{}"), ("custom/model.py", b"x = 1\n")]


def test_entry_with_dotdot_is_refused_naming_it(tmp_path):
    archive = _zip(tmp_path / "a.zip", [*GOOD, ("config/../../evil.txt", b"pwned")])
    _assert_refused(tmp_path, archive, "'config/../../evil.txt'", "'..'")
    assert not (tmp_path / "evil.txt").exists()


def test_absolute_path_is_refused(tmp_path):
    archive = _zip(tmp_path / "a.zip", [*GOOD, ("/tmp/evil.txt", b"pwned")])
    _assert_refused(tmp_path, archive, "'/tmp/evil.txt'", "absolute")


def test_backslashes_and_drive_letters_are_refused(tmp_path):
    _assert_refused(tmp_path, _zip(tmp_path / "a.zip", [("..\\evil.txt", b"x")]), "backslashes")
    _assert_refused(tmp_path, _zip(tmp_path / "b.zip", [("C:/evil.txt", b"x")]), "drive letters")


def test_symlink_entry_is_refused(tmp_path):
    archive = _zip(tmp_path / "a.zip", [*GOOD, _symlink_entry("custom/keys", "/etc")])
    _assert_refused(tmp_path, archive, "'custom/keys'", "symbolic links")


def test_duplicate_names_are_refused(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is told to write
        archive = _zip(tmp_path / "a.zip", [*GOOD, ("custom/model.py", b"evil = 1\n")])
    _assert_refused(tmp_path, archive, "'custom/model.py'", "duplicate")


def test_a_name_that_is_both_file_and_folder_is_refused(tmp_path):
    archive = _zip(tmp_path / "a.zip", [("config", b"x"), ("config/config_train.json", b"{}")])
    _assert_refused(tmp_path, archive, "both a file and a folder")


def test_zip_bomb_by_ratio_is_refused(tmp_path):
    archive = _zip(tmp_path / "a.zip", [*GOOD, ("resources/zeros.bin", bytes(8 << 20))])
    _assert_refused(tmp_path, archive, "'resources/zeros.bin'", "compression ratio")


def test_zip_bomb_by_total_size_is_refused(tmp_path):
    payload = os.urandom(1 << 20)  # incompressible: no ratio rule applies, only the total
    entries = [(f"resources/part{i}.bin", payload) for i in range(5)]
    archive = _zip(tmp_path / "a.zip", [*GOOD, *entries], compression=zipfile.ZIP_STORED)
    _assert_refused(tmp_path, archive, "total uncompressed size", max_total_bytes=3 << 20)


def test_many_small_entries_of_high_total_ratio_are_refused(tmp_path):
    entries = [(f"resources/z{i}.bin", bytes(512 << 10)) for i in range(8)]  # each below the per-entry floor
    archive = _zip(tmp_path / "a.zip", [*GOOD, *entries])
    _assert_refused(tmp_path, archive, "total compression ratio")


def test_too_many_entries_are_refused(tmp_path):
    archive = _zip(tmp_path / "a.zip", [(f"resources/{i}.txt", b"x") for i in range(20)])
    _assert_refused(tmp_path, archive, "20 entries", max_entries=10)


def test_encrypted_entry_is_refused(tmp_path):
    archive = _zip(tmp_path / "a.zip", GOOD)
    data = bytearray(archive.read_bytes())
    # Set the "encrypted" flag bit in the local and central headers of every entry.
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (at := data.find(signature, start)) >= 0:
            data[at + offset] |= 0x1
            start = at + 4
    archive.write_bytes(bytes(data))
    _assert_refused(tmp_path, archive, "encrypted")


def test_a_header_that_understates_the_size_is_caught_while_extracting(tmp_path):
    archive = _zip(tmp_path / "a.zip", [*GOOD, ("resources/data.bin", b"A" * 1000)], compression=zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    # Shrink the declared size (local and central header) of the last entry from 1000 to 10 bytes.
    old, new = (1000).to_bytes(4, "little"), (10).to_bytes(4, "little")
    for i in (data.rfind(b"PK\x03\x04") + 22, data.rfind(b"PK\x01\x02") + 24):
        assert data[i : i + 4] == old
        data[i : i + 4] = new
    archive.write_bytes(bytes(data))
    dest = tmp_path / "out" / "mmar"
    with pytest.raises((UnsafeArchiveError, zipfile.BadZipFile)):
        extract_zip_safely(archive, dest)
    assert not dest.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_good_zip_extracts_with_nothing_left_in_temp(tmp_path):
    archive = _zip(tmp_path / "a.zip", [*GOOD, ("models/", b""), ("docs/readme.md", b"# hi\n")])
    out = tmp_path / "out"
    dest = extract_zip_safely(archive, out / "mmar")
    assert dest == out / "mmar"
    assert (dest / "custom" / "model.py").read_bytes() == b"x = 1\n"
    assert (dest / "models").is_dir()
    assert [p.name for p in out.iterdir()] == ["mmar"], "no temporary folder may be left beside dest"


def test_a_single_top_level_folder_is_stripped(tmp_path):
    archive = _zip(tmp_path / "a.zip", [("digits/config/config_train.json", b"{}"), ("digits/custom/m.py", b"")])
    dest = extract_zip_safely(archive, tmp_path / "mmar")
    assert _listing(dest) == {"config", "config/config_train.json", "custom", "custom/m.py"}


def test_redeploy_replaces_the_old_tree_atomically(tmp_path):
    dest = tmp_path / "out" / "mmar"
    extract_zip_safely(_zip(tmp_path / "a.zip", [*GOOD, ("custom/old.py", b"")]), dest)
    extract_zip_safely(_zip(tmp_path / "b.zip", GOOD), dest)
    assert not (dest / "custom" / "old.py").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mmar"]


def test_a_failing_check_leaves_the_existing_tree_in_place(tmp_path):
    dest = tmp_path / "out" / "mmar"
    extract_zip_safely(_zip(tmp_path / "a.zip", GOOD), dest)
    with pytest.raises(MMARError):
        extract_zip_safely(
            _zip(tmp_path / "b.zip", [("config/config_train.json", b"{not json")]), dest, check=load_mmar
        )
    assert (dest / "custom" / "model.py").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mmar"]


def test_zip_folder_round_trips_an_mmar(tmp_path):
    archive = zip_folder(DIGITS, tmp_path / "digits.zip")
    names = zipfile.ZipFile(archive).namelist()
    assert "config/config_train.json" in names and not any("__pycache__" in n for n in names)
    dest = extract_zip_safely(archive, tmp_path / "mmar", check=load_mmar)
    assert (dest / "custom" / "trainer.py").read_bytes() == (DIGITS / "custom" / "trainer.py").read_bytes()


def test_zip_folder_refuses_a_symlink(tmp_path):
    folder = tmp_path / "mmar"
    (folder / "config").mkdir(parents=True)
    (folder / "config" / "config_train.json").write_text("{}")
    (folder / "custom").symlink_to("/etc")
    with pytest.raises(UnsafeArchiveError, match="custom is a symbolic link"):
        zip_folder(folder, tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists()


def test_a_symlink_already_in_the_destination_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("untouched")
    dest = tmp_path / "out" / "mmar"
    dest.mkdir(parents=True)
    (dest / "custom").symlink_to(outside, target_is_directory=True)
    archive = _zip(tmp_path / "a.zip", [*GOOD, ("custom/evil.py", b"pwned = 1\n")])

    extract_zip_safely(archive, dest)

    assert _listing(outside) == {"keep.txt"} and (outside / "keep.txt").read_text() == "untouched"
    assert not (dest / "custom").is_symlink()
    assert (dest / "custom" / "evil.py").read_bytes() == b"pwned = 1\n"


def test_a_destination_that_is_a_symlink_is_replaced_not_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("untouched")
    dest = tmp_path / "out" / "mmar"
    dest.parent.mkdir()
    dest.symlink_to(outside, target_is_directory=True)

    extract_zip_safely(_zip(tmp_path / "a.zip", GOOD), dest)

    assert _listing(outside) == {"keep.txt"} and (outside / "keep.txt").read_text() == "untouched"
    assert not dest.is_symlink() and (dest / "custom" / "model.py").is_file()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mmar"]


def _point_entry_at(archive: Path, index: int, offset: int) -> None:
    """Rewrite the central directory so entry `index` claims the local header (and data) at `offset`."""
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as z:
        at = z.start_dir
    for _ in range(index):
        assert data[at : at + 4] == b"PK\x01\x02"
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[at + 28 : at + 34])
        at += 46 + name_len + extra_len + comment_len
    data[at + 42 : at + 46] = struct.pack("<I", offset)
    archive.write_bytes(bytes(data))


def test_entries_that_share_their_data_are_refused(tmp_path):
    """Hardening (degraded): overlapping entries sharing one deflate stream passed the 200:1 ratio check, and
    19.8 KB uploaded became 67 MB at a site."""
    archive = _zip(
        tmp_path / "overlap.zip",
        [("config/a.bin", b"\0" * 4096), ("config/b.bin", b"\0" * 4096), ("config/c.bin", b"\0" * 4096)],
    )
    _point_entry_at(archive, 1, 0)
    _point_entry_at(archive, 2, 0)
    _assert_refused(tmp_path, archive, "overlaps", "zip bomb")


def test_an_entry_running_into_the_central_directory_is_refused(tmp_path):
    archive = _zip(tmp_path / "tail.zip", [("config/a.bin", b"x" * 100)])
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as z:
        at = z.start_dir
    data[at + 20 : at + 24] = struct.pack("<I", 100_000)  # the directory's compressed size of the entry
    archive.write_bytes(bytes(data))
    _assert_refused(tmp_path, archive, "overlaps the central directory")
