"""A started participant tells its starter that it is ready: one line on a pipe the starter handed it.

The starter (`fedadmin poc start`) passes the pipe's write end and names it in FEDLEARN_READY_FD; it waits on the
read ends, so it wakes the moment a participant is ready, and sees end-of-file the moment one dies before that.
"""

from __future__ import annotations

import contextlib
import os

READY_FD_ENV = "FEDLEARN_READY_FD"
READY_LINE = b"ready\n"


def tell_ready() -> None:
    """Write the ready line to the starter's pipe, if one was handed over, and close it; once per process.

    The variable is removed first, so the processes this one starts (training workers, a restarted self) never
    write to a pipe that is not theirs.
    """
    value = os.environ.pop(READY_FD_ENV, None)
    if value is None or not value.isdigit():
        return
    fd = int(value)
    with contextlib.suppress(OSError):  # a starter that gave up waiting closed its end: nobody to tell
        os.write(fd, READY_LINE)
    with contextlib.suppress(OSError):
        os.close(fd)
