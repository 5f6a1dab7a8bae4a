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
