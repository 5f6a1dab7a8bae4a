"""The one conversion between the admin plane's records (Message, CommandOutcome) and their wire forms."""

from __future__ import annotations

import json

from fedcommon.admin_defs import Message
from fedcommon.outcome import CommandOutcome, TargetReply
from fedcommon.wire import admin_pb2 as pb


def message_from_wire(wire: pb.AdminMessage) -> Message:
    """The seed's Message for a wire AdminMessage, id and headers included."""
    msg = Message(wire.topic, wire.body)
    msg.id = wire.id
    msg.set_headers(dict(wire.headers))
    return msg


def message_to_wire(msg: Message) -> pb.AdminMessage:
    """The wire AdminMessage for a seed Message (a str body travels as UTF-8)."""
    body = msg.body.encode("utf-8") if isinstance(msg.body, str) else bytes(msg.body)
    return pb.AdminMessage(id=msg.id, topic=msg.topic, body=body, headers=msg.headers)


def outcome_to_wire(outcome: CommandOutcome) -> pb.CommandReply:
    """The wire CommandReply; a reply's data that came off the wire travels on as it came."""
    return pb.CommandReply(
        command=outcome.command,
        ok=outcome.ok,
        error=outcome.error,
        replies=[
            pb.TargetReply(
                target=r.target,
                ok=r.ok,
                error=r.error,
                data_json=(r.data_json if r.data_json is not None else json.dumps(r.data)) if r.ok else "",
            )
            for r in outcome.replies
        ],
    )


def outcome_from_wire(reply: pb.CommandReply, command: str) -> CommandOutcome:
    """The typed outcome of a CommandReply; a reply whose data is not a JSON object counts as failed."""
    replies = []
    for r in reply.replies:
        try:
            data = json.loads(r.data_json) if r.data_json else {}
        except json.JSONDecodeError as exc:
            replies.append(TargetReply(r.target, False, error=f"unreadable reply data ({exc.msg})"))
            continue
        if not isinstance(data, dict):
            replies.append(TargetReply(r.target, False, error="reply data is not a JSON object"))
            continue
        replies.append(TargetReply(r.target, r.ok, data, r.error))
    ok = reply.ok and all(r.ok for r in replies) and not reply.error
    return CommandOutcome(reply.command or command, ok, replies, reply.error)
