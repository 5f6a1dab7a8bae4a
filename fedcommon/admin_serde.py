"""The one conversion between the seed's admin Message and the wire AdminMessage."""

from __future__ import annotations

from fedcommon.admin_defs import Message
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
