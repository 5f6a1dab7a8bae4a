"""A participant's workspace is private to the user running it: folders 0700, files 0600 (DESIGN §10)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

_SHARED_BITS = stat.S_IRWXG | stat.S_IRWXO


def make_private(workspace: Path) -> None:
    """From now on this process (and its children) create files for its own user alone, and what the workspace
    already holds loses every group and other permission bit, whatever mode its kit's folder was made with.

    Links are not followed: what one points to outside the workspace is not this participant's to change.
    """
    os.umask(0o077)
    workspace = Path(workspace)
    for path in (workspace, *workspace.rglob("*")):
        try:
            st = os.lstat(path)
        except FileNotFoundError:  # removed while walking (a rotated log, a finished temp file)
            continue
        if stat.S_ISLNK(st.st_mode) or not st.st_mode & _SHARED_BITS:
            continue
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~_SHARED_BITS)
