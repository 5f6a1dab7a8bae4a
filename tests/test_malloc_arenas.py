"""The server bounds glibc's malloc arenas before its threads start (memory must not grow with the threads)."""

from __future__ import annotations

import os
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


_SHOW = (
    "import os; from fedserver.malloc_arenas import restart_without_thread_caches as restart; restart(); "
    "print(os.getpid(), b'tcache_count=0' in open('/proc/self/environ', 'rb').read(), os.environ.get('GLIBC_TUNABLES'))"
)


def _show(env: dict[str, str]) -> list[str]:
    """(pid is the one started, caches off at start, GLIBC_TUNABLES as children would inherit it) of a process that
    calls restart_without_thread_caches."""
    proc = subprocess.Popen([sys.executable, "-c", _SHOW], stdout=subprocess.PIPE, text=True, env=env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    pid, off, tunables = out.split()
    return [str(int(pid) == proc.pid), off, tunables]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="GLIBC_TUNABLES is glibc's")
def test_the_server_restarts_once_without_malloc_thread_caches_and_its_children_keep_the_defaults():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    # The same process, executed again with the caches off; its children inherit what the operator had: nothing.
    assert _show(env) == ["True", "True", "None"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="GLIBC_TUNABLES is glibc's")
def test_an_operators_own_tunables_are_kept_and_a_tcache_setting_of_theirs_wins():
    assert _show(dict(os.environ, GLIBC_TUNABLES="glibc.malloc.arena_max=3")) == [
        "True",
        "True",
        "glibc.malloc.arena_max=3",
    ]
    assert _show(dict(os.environ, GLIBC_TUNABLES="glibc.malloc.tcache_count=2")) == [
        "True",
        "False",
        "glibc.malloc.tcache_count=2",
    ]
