"""Each site's mailbox at the server: queued requests, its Retrieve long-polls, replies awaited, what it reported."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedcommon.admin_defs import Message, MsgHeader, ReturnCode, body_text
from fedcommon.bounded_json import JsonBoundsError, NotJsonError, loads_bounded, loads_object
from fedcommon.commands import CONNECTED_WINDOW_S, MAX_ERROR_CHARS, MAX_RESULT_BYTES, MAX_SITE_REPLY_BYTES, ResultTopic
from fedcommon.outcome import TargetReply

log = logging.getLogger(__name__)

GATHER_CHECK_S = 0.5  # how often a command waiting for sites' replies checks that its caller is still there
# A site's agent holds one long-poll; a second covers a reconnect whose old call the server has not seen end.
LONG_POLLS_PER_SITE = 2
# Runs whose training_ended report is kept per site: more than can train at once at one site.
RUNS_KEPT_PER_SITE = 16


@dataclass
class _Agent:
    # One condition per site over the mailbox's lock: a request for one site wakes that site's long-poll only,
    # not every site's (with a thousand sites, notify_all on a shared condition costs a thousand wake-ups).
    wakeup: threading.Condition
    polls: int = 0  # Retrieve calls in flight
    held: deque[int] = field(default_factory=deque)  # tickets of the long-polls held, oldest first
    tickets: int = 0
    last_poll: float = -math.inf
    org: str | None = None  # from the site's certificate
    serial: int | None = None  # of the certificate its last Retrieve came with
    queue: deque[Message] = field(default_factory=deque)
    gone: bool = False  # shut out (revoked): a long-poll in flight returns empty


@dataclass
class Waiter:
    """One request sent to one site, and its reply once it came."""

    site: str
    message: Message
    done: threading.Event = field(default_factory=threading.Event)
    reply: TargetReply | None = None


class SiteMailbox:
    """Queues requests per site, hands them to the site's Retrieve long-poll, and matches the replies."""

    def __init__(self, long_polls_per_site: int = LONG_POLLS_PER_SITE) -> None:
        self._long_polls_per_site = long_polls_per_site
        self._lock = threading.RLock()
        self._agents: dict[str, _Agent] = {}
        self._waiting: dict[str, Waiter] = {}
        self._progress: dict[str, dict[str, Any]] = {}
        self._ended: dict[str, dict[str, Any]] = {}
        # Told each result kept: (site, topic, data); the server's experiment tracking (fedserver.tracking).
        self.on_result: Callable[[str, str, dict[str, Any]], None] | None = None
        # Per site, the latest training_ended report of each run it reported on (several may train at once).
        self._ended_by_run: dict[str, dict[int, dict[str, Any]]] = {}
        self._closed = False

    # ---- what a site's agent calls ----------------------------------------------------------------

    def retrieve(
        self,
        site: str,
        wait: float,
        active: Callable[[], bool] = lambda: True,
        org: str | None = None,
        serial: int | None = None,
    ) -> list[Message]:
        """Hold until requests for `site` are queued, `wait` seconds pass or the caller goes away.

        `org` is the organisation in the site's certificate, which org-scoped rights are checked against;
        `serial` the certificate's serial, which a revocation is matched against (see revoked_sites).
        At most `long_polls_per_site` are held per site: a newer one makes the oldest return empty at once.
        """
        deadline = time.monotonic() + wait
        with self._lock:
            agent = self._agent(site)
            agent.polls += 1
            ticket = agent.tickets = agent.tickets + 1
            agent.held.append(ticket)
            if len(agent.held) > self._long_polls_per_site:
                agent.held.popleft()
                agent.wakeup.notify_all()
            if org is not None:
                agent.org = org
            if serial is not None:
                agent.serial = serial
            try:
                while not self._closed and not agent.gone and active() and ticket in agent.held:
                    if agent.queue:
                        out = list(agent.queue)
                        agent.queue.clear()
                        return out
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    agent.wakeup.wait(left)
                return []
            finally:
                agent.polls -= 1
                agent.last_poll = time.monotonic()
                if ticket in agent.held:
                    agent.held.remove(ticket)

    def _agent(self, site: str) -> _Agent:
        """`site`'s record, created on first sight; call with the lock held."""
        agent = self._agents.get(site)
        if agent is None:
            agent = self._agents[site] = _Agent(threading.Condition(self._lock))
        return agent

    def wake(self, site: str) -> None:
        """Let `site`'s long-polls re-check their state (a caller went away)."""
        with self._lock:
            agent = self._agents.get(site)
            if agent is not None:
                agent.wakeup.notify_all()

    def post_reply(self, site: str, msg: Message) -> str | None:
        """Deliver `site`'s reply to the command waiting for it; returns why it was not taken, or None."""
        ref = msg.get_ref_id() or ""
        with self._lock:
            waiter = self._waiting.get(ref)
            if waiter is None:
                return f"no request {ref!r} is waiting for a reply (it may have timed out)"
            if waiter.site != site:
                log.warning("%s sent a reply to request %s, which was sent to %s", site, ref, waiter.site)
                return f"request {ref} was sent to {waiter.site}, not to {site}"
            del self._waiting[ref]
            # Set under the lock: gather() then sees a reply or none, never half of one.
            waiter.reply = _site_reply(site, msg)
            waiter.done.set()
        return None

    def post_result(self, site: str, msg: Message) -> str | None:
        """Keep the latest progress or training_ended report of `site`; returns why it was refused, or None."""
        if msg.topic not in ResultTopic.ALL:
            return f"unknown result topic {msg.topic!r} (expected {' or '.join(ResultTopic.ALL)})"
        try:
            data = loads_object(body_text(msg.body), f"{msg.topic} body", MAX_RESULT_BYTES)
        except JsonBoundsError as e:
            return str(e)
        progress = msg.topic == ResultTopic.PROGRESS
        number = data.get("run_number")
        number = number if isinstance(number, int) and not isinstance(number, bool) else None
        with self._lock:
            (self._progress if progress else self._ended)[site] = data
            by_run = self._ended_by_run.setdefault(site, {})
            if progress:
                self._ended.pop(site, None)  # training again
                by_run.pop(number, None)
            elif number is not None:
                by_run.pop(number, None)
                by_run[number] = data
                while len(by_run) > RUNS_KEPT_PER_SITE:  # a site cannot grow this with made-up run numbers
                    del by_run[next(iter(by_run))]
        if self.on_result is not None:
            self.on_result(site, msg.topic, data)
        if not progress:
            log.info(
                "%s: run %s ended: %s (exit code %s) %s",
                site,
                data.get("run_number"),
                data.get("status"),
                data.get("exit_code"),
                data.get("error") or "",
            )
        return None

    # ---- what the server knows of its sites -------------------------------------------------------

    def connected_sites(self) -> list[str]:
        """Sites with a Retrieve in flight or one in the last CONNECTED_WINDOW_S seconds."""
        now = time.monotonic()
        with self._lock:
            return sorted(
                name for name, a in self._agents.items() if a.polls > 0 or now - a.last_poll <= CONNECTED_WINDOW_S
            )

    def not_connected(self, site: str) -> str:
        """Why `site` cannot take a request: never seen, or how long ago its last long-poll ended."""
        with self._lock:
            agent = self._agents.get(site)
            last = None if agent is None or agent.last_poll == -math.inf else time.monotonic() - agent.last_poll
        if last is None:
            known = ", ".join(self.known_sites()) or "none yet"
            return f"{site} is not connected: no site of that name has connected to this server (known sites: {known})"
        return (
            f"{site} is not connected: its last long-poll ended {last:.0f}s ago (the site is reconnecting, or stopped)"
        )

    def known_sites(self) -> list[str]:
        """Every site whose agent has reached this server since it started (and was not dropped)."""
        with self._lock:
            return sorted(self._agents)

    def site_orgs(self) -> dict[str, str]:
        """The organisation of each site that has connected, from its certificate."""
        with self._lock:
            return {name: a.org for name, a in self._agents.items() if a.org is not None}

    def revoked_sites(self, revoked: frozenset[int]) -> list[str]:
        """Sites whose last long-poll came with a certificate whose serial is in `revoked`."""
        with self._lock:
            return sorted(name for name, a in self._agents.items() if a.serial is not None and a.serial in revoked)

    def site_results(self) -> dict[str, dict[str, Any]]:
        """The latest progress and training_ended report per site."""
        with self._lock:
            return {
                "site_progress": dict(sorted(self._progress.items())),
                "training_ended": dict(sorted(self._ended.items())),
            }

    def ended_in_run(self, run_number: int) -> dict[str, dict[str, Any]]:
        """Per site, the latest training_ended report it sent of run `run_number` (unless it trains that run again)."""
        with self._lock:
            return {site: runs[run_number] for site, runs in sorted(self._ended_by_run.items()) if run_number in runs}

    def forget(self, site: str) -> None:
        """Drop what is kept about `site`'s training (remove-client)."""
        with self._lock:
            self._progress.pop(site, None)
            self._ended.pop(site, None)
            self._ended_by_run.pop(site, None)

    # ---- what a command does with the sites -------------------------------------------------------

    def send(self, sites: list[str], topic: str, headers: dict[str, Any], body: str) -> list[Waiter]:
        """Queue one request per site; each gets its own id so a reply names exactly one of them."""
        waiters = []
        with self._lock:
            for site in sites:
                msg = Message(topic, body).set_headers(headers)
                waiter = Waiter(site, msg)
                self._waiting[msg.id] = waiter
                agent = self._agent(site)
                agent.queue.append(msg)
                agent.wakeup.notify_all()
                waiters.append(waiter)
        return waiters

    def gather(
        self, waiters: list[Waiter], deadline: float, active: Callable[[], bool] = lambda: True
    ) -> dict[str, TargetReply | None]:
        """Wait for the replies until `deadline` (monotonic) or until `active()` turns false (the caller went
        away: what it waits for is dropped now, not when its timeout ends); a site that did not reply maps to None."""
        for waiter in waiters:
            while active():
                left = deadline - time.monotonic()
                if left <= 0 or waiter.done.wait(min(left, GATHER_CHECK_S)):
                    break
        with self._lock:
            for waiter in waiters:
                if waiter.done.is_set():
                    continue
                self._waiting.pop(waiter.message.id, None)
                agent = self._agents.get(waiter.site)
                if agent is not None and waiter.message in agent.queue:
                    # Never delivered: dropped, so an abort or shutdown cannot act long after it was reported lost.
                    agent.queue.remove(waiter.message)
        return {w.site: w.reply for w in waiters}

    def drop(self, sites: list[str]) -> None:
        """Forget these sites' agents and release their long-polls now: they are no longer connected."""
        with self._lock:
            for site in sites:
                self._drop_agent(site)

    def shut_out(self, site: str, reason: str) -> None:
        """`site` may no longer take requests (its certificate was revoked): it is not connected from now on.

        Requests queued for it are answered at once with `reason` instead of waiting for a reply that cannot come.
        """
        with self._lock:
            self._drop_agent(site)
            for ref, waiter in list(self._waiting.items()):
                if waiter.site == site:
                    del self._waiting[ref]
                    waiter.reply = TargetReply(site, False, error=f"{site} was refused: {reason}")
                    waiter.done.set()

    def _drop_agent(self, site: str) -> None:
        """Forget `site`'s agent and release its long-polls now (a dropped record can no longer be woken);
        call with the lock held."""
        agent = self._agents.pop(site, None)
        if agent is not None:
            agent.gone = True
            agent.queue.clear()
            agent.wakeup.notify_all()

    def close(self) -> None:
        """Release every long-poll and every command waiting for replies (server stopping)."""
        with self._lock:
            self._closed = True
            for waiter in self._waiting.values():
                waiter.done.set()
            self._waiting.clear()
            for agent in self._agents.values():
                agent.wakeup.notify_all()


def _site_reply(site: str, msg: Message) -> TargetReply:
    """A site's reply as a TargetReply; a JSON object body is kept as it came, to be passed on as is.

    Bounded at intake: a failure's text is cut, and a body too large or nested too deep is refused here, so no
    command's caller (status, wait, the console) ever has to take it in.
    """
    body = body_text(msg.body)
    if msg.get_header(MsgHeader.RETURN_CODE) != ReturnCode.OK:
        if len(body) > MAX_ERROR_CHARS:
            body = f"{body[:MAX_ERROR_CHARS]}… ({len(body)} characters)"
        return TargetReply(site, False, error=body or f"{site} reported a failure without a message")
    if not body.strip():
        return TargetReply(site, True)
    try:
        data = loads_bounded(body, f"{site}'s reply", MAX_SITE_REPLY_BYTES)
    except NotJsonError:
        data = None
    except JsonBoundsError as e:
        log.warning("reply of %s to %s refused: %s", site, msg.get_ref_id(), e)
        return TargetReply(site, False, error=f"the server refused the reply: {e}")
    if not isinstance(data, dict):
        log.warning("%s replied to %s with a body that is not a JSON object", site, msg.get_ref_id())
        return TargetReply(site, True, {"message": body})
    return TargetReply(site, True, data, data_json=body)
