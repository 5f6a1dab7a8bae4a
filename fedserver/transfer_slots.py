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
    """A counting gate over transfers; `hold` is a slot for the body of a with-statement."""

    def __init__(self, limit: int, per_holder: int = 1, what: str = "transfer"):
        if limit < 1 or per_holder < 1:
            raise ValueError(f"{what} slots: limit and per_holder must be at least 1, got {limit} and {per_holder}")
        self.limit = limit
        self.per_holder = per_holder
        self.what = what
        self._cond = threading.Condition()
        self._held: dict[str, int] = {}
        self._queue: list[tuple[int, str]] = []  # (ticket, holder), oldest first
        self._tickets = itertools.count()

    @property
    def in_use(self) -> int:
        with self._cond:
            return sum(self._held.values())

    def _grantable(self, ticket: int, holder: str) -> bool:
        """The oldest waiter that may take a slot now is `ticket`, and a slot is free."""
        if sum(self._held.values()) >= self.limit:
            return False
        for waiting, name in self._queue:
            if self._held.get(name, 0) < self.per_holder:
                return waiting == ticket
        return False

    @contextlib.contextmanager
    def hold(
        self, holder: str, timeout: float | None = None, alive: Callable[[], bool] | None = None
    ) -> Iterator[None]:
        """A slot for `holder` while the block runs; SlotTimeout when none is free within `timeout` seconds or the
        caller stops being `alive` (a cancelled call) while it waits."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            ticket = next(self._tickets)
            self._queue.append((ticket, holder))
            try:
                while not self._grantable(ticket, holder):
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise SlotTimeout(
                            f"all {self.limit} {self.what} slots stayed busy for {timeout:.0f}s; retry later"
                        )
                    if alive is not None and not alive():
                        raise SlotTimeout(f"the call ended while it waited for one of {self.limit} {self.what} slots")
                    self._cond.wait(_ALIVE_CHECK_S if left is None else min(left, _ALIVE_CHECK_S))
            finally:
                self._queue.remove((ticket, holder))
                self._cond.notify_all()  # the next waiter may be eligible now (or was behind this one)
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
