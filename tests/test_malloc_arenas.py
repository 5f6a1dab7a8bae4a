"""The server bounds glibc's malloc arenas before its threads start (memory must not grow with the threads)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_server_process_bounds_malloc_arenas_on_glibc():
    # In a child: mallopt changes the whole process, and the test process keeps its own settings.
    done = subprocess.run(
        [sys.executable, "-c", "from fedserver.malloc_arenas import bound_malloc_arenas; print(bound_malloc_arenas())"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "True", done.stderr
