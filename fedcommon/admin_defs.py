"""The admin Message passed between the console, the server and a site's agent (seed: fed_learn.admin_defs)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any


class MsgHeader:
    """Header keys with a meaning to the framework."""

    REF_MSG_ID = "_refMsgId"
    RETURN_CODE = "_rtnCode"
    # Who sent a request (from the admin's certificate, set by the server), for a site's policy and audit.
    ADMIN = "admin"
    ADMIN_ROLE = "admin_role"
    ADMIN_ORG = "admin_org"
    COMMAND = "command"


ADMIN_ROLES = ("project_admin", "org_admin", "lead", "member")
PARTICIPANT_ROLES = ("server", "client", "admin")


@dataclass(frozen=True)
class AdminIdentity:
    """The admin behind a command, as its certificate states (CN, OU, O); the server passes it on to sites."""

    name: str
    role: str
    org: str


class ReturnCode:
    """Values of the RETURN_CODE header."""

    OK = "_ok"
    ERROR = "_error"


class Message:
    """A topic, a body (str or bytes) and string headers, with a unique id."""

    def __init__(self, topic: str, body: str | bytes = ""):
        self.id = str(uuid.uuid4())
        self.topic = topic
        self.body = body
        self.headers: dict[str, str] = {}

    def set_header(self, key: str, value: Any) -> Message:
        self.headers[key] = str(value)
        return self

    def set_headers(self, headers: dict[str, Any]) -> Message:
        for k, v in headers.items():
            self.set_header(k, v)
        return self

    def get_header(self, key: str, default: str | None = None) -> str | None:
        return self.headers.get(key, default)

    def get_ref_id(self, default: str | None = None) -> str | None:
        return self.headers.get(MsgHeader.REF_MSG_ID, default)

    def set_ref_id(self, msg_id: str) -> Message:
        return self.set_header(MsgHeader.REF_MSG_ID, msg_id)

    def __repr__(self) -> str:
        return f"Message(topic={self.topic!r}, id={self.id!r}, headers={self.headers!r})"


def body_text(body: str | bytes) -> str:
    """A message body as text (bytes read as UTF-8, what is not UTF-8 replaced)."""
    return body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body


def new_message(topic: str, body: str | bytes = "", ref: Message | None = None) -> Message:
    """A message, optionally marked as the reply to `ref`."""
    msg = Message(topic, body)
    if ref is not None:
        msg.set_ref_id(ref.id)
    return msg


def error_reply(error: str, ref: Message | None = None) -> Message:
    """A reply that carries an error the operator can act on."""
    return new_message("reply", error, ref).set_header(MsgHeader.RETURN_CODE, ReturnCode.ERROR)


def ok_reply(body: str | bytes = "", ref: Message | None = None) -> Message:
    """A successful reply."""
    return new_message("reply", body, ref).set_header(MsgHeader.RETURN_CODE, ReturnCode.OK)
