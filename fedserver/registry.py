"""Registered sites: session tokens bound to the certificate they were issued to, liveness by last contact."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


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


class ClientRegistry:
    """Sites known to the server; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_token: dict[str, SiteSession] = {}
        self._by_name: dict[str, SiteSession] = {}

    def register(self, name: str, cert_name: str | None, max_sites: int | None, cert_fingerprint: str) -> SiteSession:
        """Open a session for `name`, which must be the caller's certificate name; replaces an older one.

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
            old = self._by_name.pop(name, None)
            if old is not None:
                self._by_token.pop(old.token, None)
            elif max_sites is not None and len(self._by_name) >= max_sites:
                raise RegistryError(
                    "resource_exhausted", f"registration refused: the run takes at most {max_sites} sites"
                )
            session = SiteSession(name, secrets.token_urlsafe(32), now, now, cert_fingerprint)
            self._by_name[name] = session
            self._by_token[session.token] = session
        log.info("site %s registered", name)
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

    def remove(self, name: str) -> bool:
        with self._lock:
            session = self._by_name.pop(name, None)
            if session is not None:
                self._by_token.pop(session.token, None)
        if session is not None:
            log.info("site %s left", name)
        return session is not None

    def remove_certificate(self, fingerprint: str) -> str | None:
        """End the session opened with this certificate (it was revoked); returns the site's name, or None."""
        with self._lock:
            session = next((s for s in self._by_name.values() if s.fingerprint == fingerprint), None)
            if session is not None:
                del self._by_name[session.name]
                del self._by_token[session.token]
        if session is not None:
            log.warning("site %s dropped: its certificate is revoked", session.name)
        return session.name if session is not None else None

    def drop_silent(self, timeout: float) -> list[str]:
        """Drop sites not heard from for `timeout` seconds; returns their names."""
        cutoff = time.monotonic() - timeout
        with self._lock:
            gone = [s for s in self._by_name.values() if s.last_seen < cutoff]
            for s in gone:
                del self._by_name[s.name]
                del self._by_token[s.token]
        for s in gone:
            log.warning("site %s dropped: no contact for %.0fs (heart_beat_timeout)", s.name, timeout)
        return [s.name for s in gone]

    def names(self) -> set[str]:
        with self._lock:
            return set(self._by_name)
