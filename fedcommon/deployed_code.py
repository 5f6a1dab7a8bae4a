"""What of a deployed MMAR is code: every file under its custom/ (DESIGN §10, the code right).

Components may name classes only from the MMAR's custom/ or fedlearn's own packages (fedcommon.components), so
an archive runs code of its sender's exactly when its custom/ holds a file. Every file counts, __pycache__
included: a component path may name a package folder of any name, "__pycache__" too.
"""

from __future__ import annotations

from pathlib import Path

from fedcommon.mmar import CUSTOM_DIR

# The server's own rules for running such code ({"run_as": USER, "allow_as_server_user": bool}), in its workspace.
SERVER_CODE_POLICY = Path("local") / "custom_code.json"


def custom_code(mmar_dir: Path) -> list[str]:
    """The files (and links) under the MMAR folder's custom/, as sorted paths from the MMAR's root; [] for none."""
    mmar_dir = Path(mmar_dir)
    custom = mmar_dir / CUSTOM_DIR
    if custom.is_symlink():
        return [CUSTOM_DIR]
    if not custom.is_dir():
        return []
    return sorted(p.relative_to(mmar_dir).as_posix() for p in custom.rglob("*") if p.is_symlink() or not p.is_dir())


def archive_code(zip_path: Path) -> list[str]:
    """The files an MMAR zip would install under custom/, as extract_zip_safely would place them; sorted.

    Raises what extract_zip_safely raises for an archive it would refuse (UnsafeArchiveError, BadZipFile).
    """
    from fedcommon.safe_zip import archive_files

    return sorted(f for f in archive_files(zip_path) if f.startswith(f"{CUSTOM_DIR}/"))


def shown(files: list[str], most: int = 3) -> str:
    """A short list of files for a message: the first few and how many more."""
    more = len(files) - most
    return ", ".join(files[:most]) + (f" and {more} more" if more > 0 else "")
