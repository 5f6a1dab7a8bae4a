"""One-time tickets for the bulk channel: issued over a site's authenticated gRPC session, redeemed once, expiring."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# A site that asked for a ticket connects at once; a minute covers a slow handshake on a busy server.
TICKET_TTL_S = 60.0
# Tickets a site may hold unredeemed; asking for more withdraws its oldest (no site can fill the server's memory).
TICKETS_PER_SITE = 8
# Secrets of redeemed or withdrawn tickets remembered, so a second try is told the ticket was used.
_USED_KEPT = 4096


class TicketError(Exception):
    """A ticket that cannot be redeemed; the message says why."""


@dataclass(eq=False)
class Ticket:
    """What a ticket lets its holder do: `op` ("download" or "upload") for `site`'s session `token` in a round.

    A download carries `serve`, which sends the tensors over the redeeming connection's writer and returns the
    bytes sent; `done` is set when the transfer has ended, with `error` saying why when it failed. An upload may
    carry `release`, which frees the upload slot kept for it: called once, by close(), when the ticket is used up.
    """

    op: str
    site: str
    token: str
    run_number: int
    round: int
    expires: float
    serve: Callable[[Any], int] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    redeemed: bool = False
    error: str | None = None
    release: Callable[[], None] | None = None

    def finish(self, error: str | None = None) -> None:
        self.error = error
        self.done.set()
        self.close()

    def close(self) -> None:
        """Free what was kept for the ticket's transfer (its upload slot); later calls do nothing."""
        release, self.release = self.release, None
        if release is not None:
            release()


def _key(secret: str) -> bytes:
    # Looked up by digest, so the time a lookup takes tells nothing about a secret.
    return hashlib.sha256(secret.encode("utf-8", "replace")).digest()


class TicketBook:
    """Open tickets by secret; thread-safe."""

    def __init__(self, ttl_s: float = TICKET_TTL_S, per_site: int = TICKETS_PER_SITE):
        self.ttl_s = ttl_s
        self._per_site = per_site
        self._lock = threading.Lock()
        self._open: dict[bytes, Ticket] = {}
        self._used: OrderedDict[bytes, str] = OrderedDict()  # digest -> what happened to it

    def issue(
        self,
        op: str,
        site: str,
        token: str,
        run_number: int,
        round_number: int,
        serve: Callable | None = None,
        release: Callable[[], None] | None = None,
    ) -> tuple[str, Ticket]:
        """A new ticket and its secret (192 random bits)."""
        secret = secrets.token_urlsafe(24)
        ticket = Ticket(
            op, site, token, run_number, round_number, time.monotonic() + self.ttl_s, serve, release=release
        )
        with self._lock:
            self._sweep()
            mine = [k for k, t in self._open.items() if t.site == site]
            for k in mine[: max(0, len(mine) - self._per_site + 1)]:
                self._retire(k, "withdrawn: the site asked for newer tickets")
            self._open[_key(secret)] = ticket
        return secret, ticket

    def redeem(self, secret: str, op: str, peer_name: str) -> Ticket:
        """Take the ticket of `secret` for `op` on a connection of `peer_name`'s certificate; it cannot be taken
        again, whether this succeeds or not. TicketError says why it is refused."""
        key = _key(secret)
        with self._lock:
            ticket = self._open.pop(key, None)
            if ticket is None:
                fate = self._used.get(key)
                raise TicketError(f"ticket {fate}" if fate else "unknown ticket")
            ticket.redeemed = True
            self._remember(key, "already used")
        if time.monotonic() > ticket.expires:
            ticket.finish("the ticket expired before it was redeemed")
            raise TicketError(f"ticket expired ({self.ttl_s:.0f}s after it was issued)")
        if ticket.site != peer_name:
            ticket.finish(f"redeemed with the certificate of {peer_name!r}")
            raise TicketError(f"ticket was issued to {ticket.site!r}, the certificate is {peer_name!r}'s")
        if ticket.op != op:
            ticket.finish(f"redeemed for {op}")
            raise TicketError(f"ticket is for {ticket.op}, the connection asked for {op}")
        return ticket

    def withdraw(self, ticket: Ticket, why: str) -> bool:
        """Withdraw `ticket` unless it was redeemed already; whether it was withdrawn."""
        with self._lock:
            for key, t in self._open.items():
                if t is ticket:
                    self._retire(key, why)
                    return True
        return False

    def _retire(self, key: bytes, why: str) -> None:
        ticket = self._open.pop(key)
        self._remember(key, why)
        ticket.finish(why)

    def _remember(self, key: bytes, fate: str) -> None:
        self._used[key] = fate
        while len(self._used) > _USED_KEPT:
            self._used.popitem(last=False)

    def _sweep(self) -> None:
        now = time.monotonic()
        for key in [k for k, t in self._open.items() if now > t.expires]:
            self._retire(key, "expired")
