"""The suite's orphan check itself: it finds a tagged process even after its parent is gone, and kills it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from orphans import TAG_VAR, new_tag, reap_leftovers, tagged_processes


def test_a_grandchild_left_by_a_dead_parent_is_found_and_killed():
    tag = new_tag()
    env = dict(os.environ, **{TAG_VAR: tag})
    # The parent starts a sleeper in a new session and exits: the sleeper is re-parented, an orphan.
    code = (
        "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
        "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    orphan = int(out.stdout)
    try:
        assert orphan in tagged_processes(tag)
        assert orphan not in tagged_processes(new_tag())
        left = reap_leftovers(tag, grace=0.5)
        assert orphan in left and "time.sleep(60)" in left[orphan]
        deadline = time.monotonic() + 5
        while orphan in tagged_processes(tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert orphan not in tagged_processes(tag)
    finally:
        try:
            os.kill(orphan, 9)
        except ProcessLookupError:
            pass


def test_a_process_that_ends_within_the_grace_is_not_reported():
    tag = new_tag()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(0.5)"], env=dict(os.environ, **{TAG_VAR: tag})
    )
    try:
        assert reap_leftovers(tag, grace=10) == {}
    finally:
        proc.wait(5)
