"""Send an MMAR to the server: a folder is zipped first; a progress bar shows on a terminal."""

from __future__ import annotations

import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import click

from fedadmin.connection import AdminConnection, Uploaded


@dataclass(frozen=True)
class MmarProblem:
    """Why a path is not an MMAR to upload; `of_path`: the path itself is wrong (not its content)."""

    message: str
    of_path: bool


def mmar_problem(mmar: Path) -> MmarProblem | None:
    """What is wrong with an MMAR (a folder or .zip), every problem named once, or None; checked before anything is
    uploaded: the server and each site would otherwise refuse it once each."""
    from fedcommon.mmar import MMARError, load_mmar

    if not mmar.exists():
        return MmarProblem(f"{mmar} does not exist", True)
    if mmar.is_dir():
        if not (mmar / "config").is_dir():
            return MmarProblem(f"{mmar} has no config/ folder, so it is not an MMAR", True)
        try:
            load_mmar(mmar)
        except MMARError as e:
            return MmarProblem(f"{mmar} is not a valid MMAR (nothing was uploaded):\n{e}", False)
        return None
    if not zipfile.is_zipfile(mmar):
        return MmarProblem(f"{mmar} is neither an MMAR folder nor a .zip", True)
    from fedcommon.safe_zip import UnsafeArchiveError, extract_zip_safely

    with tempfile.TemporaryDirectory(prefix="fedadmin-check-") as tmp:
        try:
            extract_zip_safely(mmar, Path(tmp) / "mmar", check=load_mmar)
        except (MMARError, UnsafeArchiveError) as e:
            return MmarProblem(f"{mmar} is not a valid MMAR (nothing was uploaded):\n{e}", False)
    return None


def check_mmar(mmar: Path) -> None:
    """Refuse (exit 2) what is not a valid MMAR, as the console's usage error about its MMAR argument."""
    problem = mmar_problem(mmar)
    if problem is None:
        return
    if problem.of_path:
        raise click.BadParameter(problem.message, param_hint="'MMAR'")
    raise click.UsageError(problem.message)


def upload_mmar(conn: AdminConnection, mmar: Path, show_progress: bool) -> Uploaded:
    """Upload an MMAR folder (zipped into a temporary file) or .zip; returns what the server stored."""
    mmar = mmar.resolve()
    if not mmar.is_dir():
        return _upload(conn, mmar, mmar.name, show_progress)
    from fedcommon.safe_zip import zip_folder

    with tempfile.TemporaryDirectory(prefix="fedadmin-") as tmp:
        name = f"{mmar.name}.zip"
        archive = zip_folder(mmar, Path(tmp) / name)
        return _upload(conn, archive, name, show_progress)


def _upload(conn: AdminConnection, path: Path, name: str, show_progress: bool) -> Uploaded:
    if not (show_progress and sys.stderr.isatty()):
        return conn.upload(path, name)
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (
        TextColumn("uploading {task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(name, total=path.stat().st_size)
        return conn.upload(path, name, lambda n: progress.advance(task, n))
