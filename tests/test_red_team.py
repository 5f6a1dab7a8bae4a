"""The outside red team's attacks (hardening issue), each against a provisioned federation of real processes.

Every test names the item of the issue it proves fixed; the federation is test_hostile's (its own instance).
"""

from __future__ import annotations

import re

import grpc
import pytest
import test_hostile
from test_hostile import Federation

from fedcommon.kit import channel_credentials, load_kit
from fedcommon.wire import admin_pb2 as apb
from fedcommon.wire import admin_pb2_grpc as admin_grpc

pytestmark = pytest.mark.e2e

fed = test_hostile.fed  # the module fixture: a federation of this module's own
FORGED = "2026-12-06 01:02:03,456 ERROR fedserver.run: forged record"


def _admin_stub(fed: Federation, admin: str = "root@consortium") -> tuple[grpc.Channel, admin_grpc.AdminServiceStub]:
    channel = grpc.secure_channel(fed.admin_target(), channel_credentials(load_kit(fed.kit(admin))))
    return channel, admin_grpc.AdminServiceStub(channel)


def test_remote_strings_cannot_forge_records_in_the_servers_log(fed):
    """Hardening item 12: newlines in a command name or a target name became separate, genuine-looking records
    in the server's log.txt (and `logs --level error` showed them)."""
    channel, stub = _admin_stub(fed)
    with channel:
        stub.Execute(apb.CommandRequest(command=f"status\n{FORGED}", targets=["server"]), timeout=30)
        stub.Execute(apb.CommandRequest(command="status", targets=[f"site-9\r\n{FORGED}"]), timeout=30)
        stub.Execute(apb.CommandRequest(command="sysinfo", targets=[f"\x1b]0;owned\x07{FORGED}"]), timeout=30)
    log = (fed.out / "server" / "log.txt").read_text(errors="replace")
    assert not [line for line in log.splitlines() if line.startswith(FORGED)]
    assert "\x1b" not in log
    assert re.search(r"status\\n2026-12-06 01:02:03,456 ERROR", log), "the attempt is logged, escaped"
    done = fed.run("root@consortium", "logs", "server", "--level", "error", "-n", "200")
    assert "forged record" not in done.stdout
    fed.assert_alive()


def test_participant_workspaces_are_private_whatever_the_kits_folder_mode(fed):
    """Hardening (degraded): logs, run folders, models and state.json were 0644/0755; a participant's workspace is
    private (0700/0600) whatever mode its folder was made with."""
    import os
    import stat

    done = fed.run("root@consortium", "sysinfo")  # the participants write as they answer
    assert done.returncode in (0, 1), done.stderr
    for participant in ("server", "hospital-a", "hospital-b"):
        folder = fed.out / participant
        shared = [f"{p.relative_to(fed.out)} {stat.filemode(p.lstat().st_mode)}"
                  for p in (folder, *folder.rglob("*"))
                  if not p.is_symlink() and os.lstat(p).st_mode & (stat.S_IRWXG | stat.S_IRWXO)]
        assert shared == [], f"{participant}: readable by others: {shared}"
    fed.assert_alive()
