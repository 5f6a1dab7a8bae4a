"""How many model transfers (downloads or uploads) move bytes at once: at most `limit` in all and `per_holder` per
site, granted in the order they were asked for, so no site holds more than its share (DESIGN §10)."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator

_ALIVE_CHECK_S = 1.0


class SlotTimeout(Exception):
    """No slot came free in time; the message says how busy the transfers were."""


class TransferSlots:
    """A counting gate over transfers; `hold` is a slot for the body of a with-statement, `lease` keeps one for a
    holder that will come for it soon (a site given an upload ticket: it connects only once its slot is kept)."""

    def __init__(self, limit: int, per_holder: int = 1, what: str = "transfer"):
        if limit < 1 or per_holder < 1:
            raise ValueError(f"{what} slots: limit and per_holder must be at least 1, got {limit} and {per_holder}")
        self.limit = limit
        self.per_holder = per_holder
        self.what = what
        self._cond = threading.Condition()
        self._held: dict[str, int] = {}
        self._leases: dict[int, tuple[str, float]] = {}  # lease -> (holder, when it lapses, monotonic)
        self._queue: list[tuple[int, str]] = []  # (ticket, holder), oldest first
        self._tickets = itertools.count()

    @property
    def in_use(self) -> int:
        """Slots held or kept by a lease."""
        with self._cond:
            self._lapse()
            return sum(self._held.values()) + len(self._leases)

    def _lapse(self) -> None:
        now = time.monotonic()
        for lease in [k for k, (_, until) in self._leases.items() if until < now]:
            del self._leases[lease]

    def _count(self, holder: str) -> int:
        return self._held.get(holder, 0) + sum(1 for h, _ in self._leases.values() if h == holder)

    def _grantable(self, ticket: int, holder: str) -> bool:
        """The oldest waiter that may take a slot now is `ticket`, and a slot is free."""
        self._lapse()
        if sum(self._held.values()) + len(self._leases) >= self.limit:
            return False
        for waiting, name in self._queue:
            if self._count(name) < self.per_holder:
                return waiting == ticket
        return False

    def _own_lease(self, holder: str) -> int | None:
        self._lapse()
        return next((k for k, (h, _) in self._leases.items() if h == holder), None)

    def _wait_turn(self, holder: str, timeout: float | None, alive: Callable[[], bool] | None) -> None:
        """Wait (holding the condition) until `holder` may take a slot; SlotTimeout past `timeout` or once the caller
        is not `alive`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ticket = next(self._tickets)
        self._queue.append((ticket, holder))
        try:
            while not self._grantable(ticket, holder):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise SlotTimeout(f"all {self.limit} {self.what} slots stayed busy for {timeout:.0f}s; retry later")
                if alive is not None and not alive():
                    raise SlotTimeout(f"the call ended while it waited for one of {self.limit} {self.what} slots")
                # a lease that lapses frees its slot without a notify: look again at least this often
                self._cond.wait(_ALIVE_CHECK_S if left is None else min(left, _ALIVE_CHECK_S))
        finally:
            self._queue.remove((ticket, holder))
            self._cond.notify_all()  # the next waiter may be eligible now (or was behind this one)

    @contextlib.contextmanager
    def hold(
        self, holder: str, timeout: float | None = None, alive: Callable[[], bool] | None = None
    ) -> Iterator[None]:
        """A slot for `holder` while the block runs: the one a lease of `holder` keeps, else one waited for.
        SlotTimeout when none is free within `timeout` seconds or the caller stops being `alive` (a cancelled call)
        while it waits."""
        with self._cond:
            lease = self._own_lease(holder)
            if lease is not None:
                del self._leases[lease]  # its slot becomes this hold's
            else:
                self._wait_turn(holder, timeout, alive)
            self._held[holder] = self._held.get(holder, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                left = self._held[holder] - 1
                if left:
                    self._held[holder] = left
                else:
                    del self._held[holder]
                self._cond.notify_all()

    def lease(
        self, holder: str, keep_s: float, timeout: float | None = None, alive: Callable[[], bool] | None = None
    ) -> int:
        """Wait for a slot as hold() does and keep it for `holder` for `keep_s` seconds: the next hold() of `holder`
        takes it without waiting; release() or the end of `keep_s` frees it. A holder that has a lease already gets
        that one, kept longer. Returns the lease's number."""
        with self._cond:
            lease = self._own_lease(holder)
            if lease is None:
                self._wait_turn(holder, timeout, alive)
                lease = next(self._tickets)
            self._leases[lease] = (holder, time.monotonic() + keep_s)
            return lease

    def release(self, lease: int) -> None:
        """Free the slot lease `lease` keeps, unless a hold took it or it lapsed."""
        with self._cond:
            if self._leases.pop(lease, None) is not None:
                self._cond.notify_all()
