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
        shared = [
            f"{p.relative_to(fed.out)} {stat.filemode(p.lstat().st_mode)}"
            for p in (folder, *folder.rglob("*"))
            if not p.is_symlink() and os.lstat(p).st_mode & (stat.S_IRWXG | stat.S_IRWXO)
        ]
        assert shared == [], f"{participant}: readable by others: {shared}"
    fed.assert_alive()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_a_deeply_nested_command_is_refused_and_audited_and_acts_not(fed):
    """Hardening item 2: args_json nested ~982 deep executed (`set-run`, `set-timeout` changed state.json), then
    the audit write raised RecursionError: 0 entries. Now it is refused at intake, named, and audited."""
    state = fed.out / "server" / "state.json"
    before = state.read_text() if state.exists() else None
    channel, stub = _admin_stub(fed)
    with channel:
        for command in ("set-run", "set-timeout"):
            args = f'{{"run_number": 7, "seconds": 5, "x": {_nested(982)}}}'
            reply = stub.Execute(apb.CommandRequest(command=command, targets=["server"], args_json=args), timeout=30)
            assert not reply.ok and "args_json is nested deeper than 32 levels" in reply.error
    assert (state.read_text() if state.exists() else None) == before
    refused = [e for e in fed.audit() if e.get("command") in ("set-run", "set-timeout") and e["ok"] is False]
    assert len(refused) >= 2 and all("nested deeper" in e["error"] for e in refused[-2:])
    fed.assert_alive()


def test_a_sites_deeply_nested_progress_is_refused_and_status_keeps_working(fed):
    """Hardening item 6: a progress report nested ~982 deep was accepted, then every `status`/`wait` failed with
    "maximum recursion depth exceeded"."""
    from fedcommon.admin_defs import Message
    from fedcommon.admin_serde import message_to_wire

    site = load_kit(fed.kit("hospital-a"))
    with grpc.secure_channel(fed.fl_target(), channel_credentials(site)) as channel:
        agent = admin_grpc.SiteAgentStub(channel)
        deep = Message("progress", f'{{"run_number": 1, "metrics": {_nested(982)}}}')
        ack = agent.SendResult(message_to_wire(deep), timeout=10)
        assert not ack.ok and "nested deeper than 32 levels" in ack.message
        huge = Message("progress", '{"run_number": 1, "pad": "' + "x" * (1 << 20) + '"}')
        ack = agent.SendResult(message_to_wire(huge), timeout=10)
        assert not ack.ok and "more than the" in ack.message
    done = fed.run("root@consortium", "status")
    assert done.returncode in (0, 1) and "recursion" not in done.stdout + done.stderr
    json_out = __import__("json").loads(done.stdout)
    assert json_out["replies"][0]["target"] == "server" and json_out["replies"][0]["ok"]
    fed.assert_alive()


def test_a_flood_of_refused_commands_costs_a_bounded_number_of_audit_lines(fed):
    """Hardening item 10: a member's refused commands grew audit.log 13 MB/s. Refusals are rate-limited per caller,
    and the count of those left out comes with the caller's next audited refusal."""
    channel, stub = _admin_stub(fed, "carol@org-a")
    before = len(fed.audit())
    with channel:
        for _ in range(300):
            reply = stub.Execute(apb.CommandRequest(command="start", targets=["all"]), timeout=30)
            assert not reply.ok and "may not run 'start'" in reply.error
    added = [e for e in fed.audit()[before:] if e.get("admin") == "carol@org-a"]
    assert 1 <= len(added) <= 60, len(added)
    fed.assert_alive()


def test_replies_with_unknown_ids_cannot_wipe_the_servers_log_history(fed):
    """Hardening item 13: two 16 MiB Retrieve calls carrying 230,000 replies with unknown ids wrote one line each
    and rotated every older log away. Replies per call are bounded and what is not taken is summarised."""
    from fedcommon.admin_defs import ok_reply
    from fedcommon.admin_serde import message_to_wire

    log = fed.out / "server" / "log.txt"
    lines_before = len(log.read_text(errors="replace").splitlines())
    site = load_kit(fed.kit("hospital-b"))
    replies = [message_to_wire(ok_reply("{}").set_ref_id(f"nope-{i}")) for i in range(20_000)]
    with grpc.secure_channel(
        fed.fl_target(), channel_credentials(site), options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        agent = admin_grpc.SiteAgentStub(channel)
        for _ in range(5):
            agent.Retrieve(apb.RetrieveRequest(wait_seconds=0, replies=replies), timeout=60)
    added = len(log.read_text(errors="replace").splitlines()) - lines_before
    assert added < 50, added
    assert not (fed.out / "server" / "log.txt.1").exists()
    fed.assert_alive()


def test_a_command_naming_a_huge_number_of_targets_is_refused_at_once(fed):
    """Hardening (degraded): one Execute naming 300,000 targets cost 2.8 s of server CPU."""
    channel, stub = _admin_stub(fed)
    with channel:
        reply = stub.Execute(
            apb.CommandRequest(command="status", targets=[f"s{i}" for i in range(300_000)]), timeout=30
        )
    assert not reply.ok and "300000 targets; a command may name at most 1000" in reply.error
    fed.assert_alive()


def test_a_wait_of_nan_seconds_does_not_spin(fed):
    """Hardening (degraded): Retrieve(wait_seconds=NaN) busy-looped at 79% of a core until the caller gave up."""
    site = load_kit(fed.kit("hospital-b"))
    with grpc.secure_channel(fed.fl_target(), channel_credentials(site)) as channel:
        agent = admin_grpc.SiteAgentStub(channel)
        for wait in (float("nan"), float("inf"), -1.0):
            reply = agent.Retrieve(apb.RetrieveRequest(wait_seconds=wait), timeout=20)
            assert list(reply.requests) == []
    fed.assert_alive()
