"""Training status codes of a site, as in the seed (fed_learn.client.client_status); declared in fedcommon.commands."""

from __future__ import annotations

from fedcommon.commands import ClientStatus, get_status_message

__all__ = ["ClientStatus", "get_status_message"]
