"""Zip archives from untrusted senders: every entry checked before anything is written, then an atomic install."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import struct
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

# Ratios of small entries say nothing (a 20 KB file of spaces compresses 500:1); bombs are large.
RATIO_MIN_BYTES = 1 << 20
_COPY_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
_MAC_METADATA = "__MACOSX"
_SKIPPED_DIRS = ("__pycache__",)


class UnsafeArchiveError(ValueError):
    """An archive refused before extraction; the message names the entry and the rule it broke."""


def extract_zip_safely(
    zip_path: Path,
    dest: Path,
    max_total_bytes: int = 4 << 30,
    max_ratio: float = 200.0,
    max_entries: int = 100_000,
    check: Callable[[Path], object] | None = None,
) -> Path:
    """Check every entry, extract beside `dest`, run `check` on the tree, then swap it into place; returns dest.

    A single top-level folder is stripped when config/ is not at the top. Refusals raise UnsafeArchiveError
    before anything is written; `check` may raise to refuse the content (nothing is placed then).
    """
    zip_path, dest = Path(zip_path), Path(dest)
    with zipfile.ZipFile(zip_path) as archive:
        entries = _checked_entries(archive, zip_path.name, max_total_bytes, max_ratio, max_entries)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
        try:
            _extract(archive, entries, staging, zip_path.name)
            root = _content_root(staging)
            if check is not None:
                check(root)
            _replace(root, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def archive_files(zip_path: Path) -> list[str]:
    """The files extract_zip_safely would install, as paths from the folder it installs (its single top-level
    folder stripped the same way); raises UnsafeArchiveError or zipfile.BadZipFile for an archive it refuses."""
    zip_path = Path(zip_path)
    with zipfile.ZipFile(zip_path) as archive:
        entries = _checked_entries(archive, zip_path.name, 1 << 62, float("inf"), 100_000)
    folders: set[str] = set()
    files: list[str] = []
    for info, rel in entries:
        parts = rel.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if info.is_dir() or stat.S_IFMT(info.external_attr >> 16) == stat.S_IFDIR:
            folders.add(rel)
        else:
            files.append(rel)
    # As _content_root does on the extracted tree: config/ at the top, or else one top-level folder and nothing else.
    tops = {rel.split("/", 1)[0] for rel in (*files, *folders)}
    if "config" not in folders and len(tops) == 1 and next(iter(tops)) in folders:
        top = next(iter(tops)) + "/"
        files = [f[len(top) :] for f in files]
    return sorted(files)


def _checked_entries(
    archive: zipfile.ZipFile, shown: str, max_total_bytes: int, max_ratio: float, max_entries: int
) -> list[tuple[zipfile.ZipInfo, str]]:
    """(entry, normalised relative path) for every entry to extract; raise on the first broken rule."""
    infos = archive.infolist()
    if len(infos) > max_entries:
        raise UnsafeArchiveError(f"{shown}: {len(infos)} entries; the limit is {max_entries}")
    entries: list[tuple[zipfile.ZipInfo, str]] = []
    files: set[str] = set()
    folders: set[str] = set()
    total = compressed = 0
    for info in infos:
        name = info.filename

        def refuse(rule: str, entry: str = name) -> UnsafeArchiveError:
            return UnsafeArchiveError(f"{shown}: entry {entry!r}: {rule}")

        if "\\" in name or _DRIVE.match(name):
            raise refuse("backslashes and drive letters are not allowed in entry names")
        if "\0" in name or not name.strip("/"):
            raise refuse("empty or NUL-containing entry name")
        if name.startswith("/"):
            raise refuse("absolute paths are not allowed")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise refuse("'..' path components are not allowed")
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise refuse("symbolic links are not allowed")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise refuse("only regular files and folders are allowed")
        if info.flag_bits & 0x1:
            raise refuse("encrypted entries are not allowed")
        if parts[0] == _MAC_METADATA:
            continue
        rel = "/".join(parts)
        is_dir = info.is_dir() or kind == stat.S_IFDIR
        if rel in files or (not is_dir and rel in folders):
            raise refuse("duplicate entry name")
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
        clash = next((a for a in ancestors if a in files), None)
        if clash is not None:
            raise refuse(f"{clash!r} is both a file and a folder")
        folders.update(ancestors)
        if is_dir:
            folders.add(rel)
        else:
            files.add(rel)
        if info.file_size >= RATIO_MIN_BYTES and info.file_size > max_ratio * max(info.compress_size, 1):
            ratio = info.file_size / max(info.compress_size, 1)
            raise refuse(f"compression ratio {ratio:.0f}:1 exceeds the limit of {max_ratio:g}:1 (zip bomb?)")
        total += info.file_size
        compressed += info.compress_size
        if total > max_total_bytes:
            raise UnsafeArchiveError(
                f"{shown}: total uncompressed size exceeds the limit of {max_total_bytes} bytes "
                f"(reached at entry {name!r})"
            )
        entries.append((info, rel))
    _refuse_overlaps(archive, shown)
    if total >= RATIO_MIN_BYTES and total > max_ratio * max(compressed, 1):
        raise UnsafeArchiveError(
            f"{shown}: total compression ratio {total / max(compressed, 1):.0f}:1 exceeds the limit of "
            f"{max_ratio:g}:1 (zip bomb?)"
        )
    return entries


def _refuse_overlaps(archive: zipfile.ZipFile, shown: str) -> None:
    """Refuse entries whose stored bytes overlap another's: several entries sharing one deflate stream is how a
    small archive expands to gigabytes while each entry's own ratio looks harmless (Fifield, "A better zip bomb")."""
    end_of_data = archive.start_dir  # where the central directory begins
    spans = []
    fp = archive.fp
    for info in archive.infolist():
        fp.seek(info.header_offset)
        header = fp.read(30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise UnsafeArchiveError(f"{shown}: entry {info.filename!r}: no local header where the directory says")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        spans.append(
            (info.header_offset, info.header_offset + 30 + name_len + extra_len + info.compress_size, info.filename)
        )
    spans.sort()
    for (_start, end, name), following in zip(spans, [*spans[1:], (end_of_data, end_of_data, None)], strict=True):
        if end > following[0]:
            what = f"entry {following[2]!r}" if following[2] is not None else "the central directory"
            raise UnsafeArchiveError(
                f"{shown}: entry {name!r} overlaps {what} (entries sharing their data: a zip bomb?)"
            )


def _extract(archive: zipfile.ZipFile, entries: list[tuple[zipfile.ZipInfo, str]], staging: Path, shown: str) -> None:
    root = os.path.realpath(staging)
    for info, rel in entries:
        target = staging / rel
        # Nothing in staging can be a link (none are extracted), but a bug must not become an escape.
        if os.path.commonpath([root, os.path.realpath(target)]) != root:
            raise UnsafeArchiveError(f"{shown}: entry {info.filename!r}: resolves outside the extraction folder")
        if info.is_dir() or stat.S_IFMT(info.external_attr >> 16) == stat.S_IFDIR:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with archive.open(info) as src, open(target, "xb") as out:
            while chunk := src.read(_COPY_CHUNK):
                written += len(chunk)
                if written > info.file_size:  # the header lied about the size
                    raise UnsafeArchiveError(
                        f"{shown}: entry {info.filename!r}: holds more than the {info.file_size} bytes it declares"
                    )
                out.write(chunk)


def _content_root(staging: Path) -> Path:
    """The extracted tree, or its single top-level folder when config/ is not at the top."""
    if (staging / "config").is_dir():
        return staging
    children = list(staging.iterdir())
    if len(children) == 1 and children[0].is_dir() and not children[0].is_symlink():
        return children[0]
    return staging


def _replace(new: Path, dest: Path) -> None:
    """Rename `new` to `dest`; an existing dest is moved aside first and deleted once the new one is in place."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.parent / f".{dest.name}.old-{secrets.token_hex(4)}"
        os.rename(dest, old)
    try:
        os.rename(new, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def zip_folder(folder: Path, out: Path) -> Path:
    """Zip the contents of `folder` (paths relative to it, __pycache__ skipped) into `out`; refuse symlinks."""
    folder = Path(folder)
    out = Path(out)
    if not folder.is_dir():
        raise UnsafeArchiveError(f"{folder}: not a folder")
    if out.resolve().is_relative_to(folder.resolve()):
        raise UnsafeArchiveError(f"{out}: the archive must not be written inside the folder it zips")
    members: list[tuple[Path, str, bool]] = []
    for current, dirs, names in os.walk(folder, followlinks=False):
        base = Path(current)
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        for name in [*dirs, *sorted(names)]:
            path = base / name
            rel = path.relative_to(folder).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(f"{folder}: {rel} is a symbolic link; replace it with the file itself")
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise UnsafeArchiveError(f"{folder}: {rel} is not a regular file or folder")
            members.append((path, rel, stat.S_ISDIR(mode)))
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path, rel, is_dir in sorted(members, key=lambda m: m[1]):
            if is_dir:
                archive.write(path, rel + "/")
            else:
                archive.write(path, rel)
    return out
