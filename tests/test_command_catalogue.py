"""The server's command catalogue against the declarations, and a site's reply passed on as it came."""

from __future__ import annotations

import time

from fedcommon.admin_defs import error_reply, ok_reply
from fedcommon.admin_serde import outcome_to_wire
from fedcommon.commands import COMMANDS
from fedcommon.outcome import CommandOutcome
from fedserver.authorization import COMMAND_RIGHTS
from fedserver.catalogue import CATALOGUE, ServerCommand, server_side
from fedserver.mailbox import SiteMailbox


def test_the_catalogue_serves_every_declared_command_but_the_upload_rpc():
    assert set(CATALOGUE) <= set(COMMANDS)
    assert {name for name in COMMANDS if server_side(name) is None} == {"upload"}
    assert server_side("no-such-command") is None


def test_a_declared_site_command_without_an_entry_goes_to_its_sites_as_given():
    from fedcommon.commands import Command, Right, Targets

    ping = Command("ping", "answer", Targets.REQUIRED, (Right.VIEW,), "ping")
    saved = dict(COMMANDS)
    COMMANDS["ping"] = ping
    try:
        spec = server_side("ping")
        assert spec is not None and spec.site_args(None, {}) == {}
    finally:
        COMMANDS.clear()
        COMMANDS.update(saved)


def test_only_commands_with_a_site_topic_send_sites_anything_or_wait_for_them():
    nothing = ServerCommand(act=lambda fed, args, gathered: {}).site_args
    for name, spec in CATALOGUE.items():
        sends = spec.site_args is not nothing
        waits = spec.after_sites or spec.sites_first or spec.ends_session or spec.disconnects
        assert not (sends or waits) or COMMANDS[name].topic is not None, name


def test_the_rights_the_policy_checks_are_the_declared_ones():
    assert COMMAND_RIGHTS == {name: c.rights for name, c in COMMANDS.items()}


def _reply_to_one_request(body: str, ok: bool = True):
    mailbox = SiteMailbox()
    [waiter] = mailbox.send(["site-1"], "check_status", {}, "")
    assert [m.id for m in mailbox.retrieve("site-1", 0)] == [waiter.message.id]
    reply = (ok_reply if ok else error_reply)(body.encode(), waiter.message)
    assert mailbox.post_reply("site-1", reply) is None
    return mailbox.gather([waiter], time.monotonic() + 1)["site-1"]


def test_a_sites_json_reply_is_passed_on_as_it_came():
    body = '{"status":  "training started",\n "round": 3}'
    reply = _reply_to_one_request(body)
    assert reply.ok and reply.data == {"status": "training started", "round": 3}
    wire = outcome_to_wire(CommandOutcome("status", True, [reply]))
    assert wire.replies[0].data_json == body


def test_a_reply_that_is_not_a_json_object_is_kept_as_its_message_and_a_failure_as_its_error():
    reply = _reply_to_one_request("[1, 2]")
    assert reply.ok and reply.data == {"message": "[1, 2]"} and reply.data_json is None
    failed = _reply_to_one_request("start refused: run 3 is not deployed", ok=False)
    assert not failed.ok and failed.error == "start refused: run 3 is not deployed"
