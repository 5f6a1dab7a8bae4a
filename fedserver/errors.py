"""The server's operator-facing exceptions: what the server refuses, in words an operator can act on."""

from __future__ import annotations


class ServerError(Exception):
    """An operator-facing failure of the server (bad MMAR, run already present, ...)."""


class AdminError(Exception):
    """A refusal of a command or of one target, in words an operator can act on."""
