"""Registered sites: session tokens bound to the certificate they were issued to, one per (run, site), liveness."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# The run of a session opened while no run was live (an older worker that names none): bound to one later.
UNBOUND = 0


class RegistryError(Exception):
    """A registration or authentication refusal; `code` names the kind."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code  # "unauthenticated", "permission_denied" or "resource_exhausted"


@dataclass
class SiteSession:
    name: str
    token: str
    registered_at: float
    last_seen: float
    fingerprint: str = ""  # of the certificate the token was issued to
    run_number: int = UNBOUND  # the run this session takes part in


def _in_run(run_number: int) -> str:
    return f" in run {run_number}" if run_number != UNBOUND else ""


class ClientRegistry:
    """Sites known to the server, one session per (run number, site name); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_token: dict[str, SiteSession] = {}
        self._by_key: dict[tuple[int, str], SiteSession] = {}
        # Every site that has had a session in a run, even one that has left it since (the job scheduler's view).
        self._ever: dict[int, set[str]] = {}

    def register(
        self,
        name: str,
        cert_name: str | None,
        max_sites: int | None,
        cert_fingerprint: str,
        run_number: int = UNBOUND,
    ) -> SiteSession:
        """Open a session for `name` in run `run_number`; `name` must be the caller's certificate name. It replaces
        the site's older session in that run; `max_sites` caps the sites of that run.

        The token is bound to the certificate (its fingerprint), so even another certificate issued
        to the same name cannot use it.
        """
        if not name:
            raise RegistryError("permission_denied", "registration without a site name")
        if cert_name != name:
            raise RegistryError(
                "permission_denied",
                f"site name {name!r} does not match the certificate's name {cert_name!r}",
            )
        now = time.monotonic()
        with self._lock:
            key = (run_number, name)
            old = self._by_key.pop(key, None)
            if old is not None:
                self._by_token.pop(old.token, None)
            elif max_sites is not None and sum(1 for r, _ in self._by_key if r == run_number) >= max_sites:
                raise RegistryError(
                    "resource_exhausted", f"registration refused: the run takes at most {max_sites} sites"
                )
            session = SiteSession(name, secrets.token_urlsafe(32), now, now, cert_fingerprint, run_number)
            self._by_key[key] = session
            self._by_token[session.token] = session
            self._ever.setdefault(run_number, set()).add(name)
        log.info("site %s registered%s", name, _in_run(run_number))
        return session

    def bind(self, session: SiteSession, run_number: int) -> SiteSession:
        """Move an unbound session into run `run_number` (replacing the site's older session there)."""
        with self._lock:
            if session.run_number != UNBOUND or self._by_token.get(session.token) is not session:
                return session
            replaced = self._by_key.pop((run_number, session.name), None)
            if replaced is not None:
                self._by_token.pop(replaced.token, None)
            del self._by_key[(UNBOUND, session.name)]
            session.run_number = run_number
            self._by_key[(run_number, session.name)] = session
            self._ever.setdefault(run_number, set()).add(session.name)
        log.info("site %s takes part in run %d", session.name, run_number)
        return session

    def authenticate(self, token: str | None, cert_name: str | None, cert_fingerprint: str) -> SiteSession:
        """The session of `token`, checked against the caller's certificate; refreshes liveness."""
        with self._lock:
            session = self._by_token.get(token or "")
            if session is None:
                raise RegistryError("unauthenticated", "unknown or expired session token: register again")
            if session.name != cert_name:
                raise RegistryError(
                    "permission_denied",
                    f"session token belongs to {session.name!r}, the certificate is {cert_name!r}",
                )
            if session.fingerprint != cert_fingerprint:
                raise RegistryError(
                    "permission_denied",
                    f"session token of {session.name!r} was issued to another certificate: register again",
                )
            session.last_seen = time.monotonic()
            return session

    def remove(self, name: str, run_number: int | None = None) -> bool:
        """End `name`'s session in run `run_number` (None: in every run); whether there was one."""
        with self._lock:
            gone = [s for (r, n), s in self._by_key.items() if n == name and run_number in (None, r)]
            for s in gone:
                self._forget(s)
        for s in gone:
            log.info("site %s left%s", name, _in_run(s.run_number))
        return bool(gone)

    def remove_certificate(self, fingerprint: str) -> str | None:
        """End every session opened with this certificate (it was revoked); returns the site's name, or None."""
        with self._lock:
            gone = [s for s in self._by_key.values() if s.fingerprint == fingerprint]
            for s in gone:
                self._forget(s)
        if gone:
            log.warning("site %s dropped: its certificate is revoked", gone[0].name)
        return gone[0].name if gone else None

    def drop_silent(self, timeout: float) -> list[str]:
        """Drop sessions not heard from for `timeout` seconds; returns their sites' names."""
        dropped = self.drop_silent_by_run(lambda _: timeout)
        return sorted({name for names in dropped.values() for name in names})

    def drop_silent_by_run(self, timeout_of: Callable[[int], float]) -> dict[int, list[str]]:
        """Drop sessions silent for longer than their run's `timeout_of(run_number)` seconds; returns, per run
        number (UNBOUND for sessions in no run), the sites dropped from it."""
        now = time.monotonic()
        with self._lock:
            timeouts = {r: timeout_of(r) for r in {r for r, _ in self._by_key}}
            gone = [s for (r, _), s in self._by_key.items() if s.last_seen < now - timeouts[r]]
            for s in gone:
                self._forget(s)
        dropped: dict[int, list[str]] = {}
        for s in gone:
            log.warning(
                "site %s dropped%s: no contact for %.0fs (heart_beat_timeout)",
                s.name,
                _in_run(s.run_number),
                timeouts[s.run_number],
            )
            dropped.setdefault(s.run_number, []).append(s.name)
        return dropped

    def names(self) -> set[str]:
        """Sites with a session in any run."""
        with self._lock:
            return {n for _, n in self._by_key}

    def ever_in_run(self, run_number: int) -> set[str]:
        """Sites that have had a session in run `run_number` since this server started, gone or not."""
        with self._lock:
            return set(self._ever.get(run_number, ()))

    def run_names(self, run_number: int) -> set[str]:
        """Sites with a session in run `run_number`."""
        with self._lock:
            return {n for r, n in self._by_key if r == run_number}

    def _forget(self, session: SiteSession) -> None:
        del self._by_key[(session.run_number, session.name)]
        del self._by_token[session.token]
