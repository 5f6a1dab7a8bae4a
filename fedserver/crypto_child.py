"""The server's checks that need the cryptography package (its kit, the CRL's signature, archive signatures), each
run in a short-lived child process: the long-running server never loads that library, which at 100 sites was
10-12 MiB of its memory (benchmarks/README.md, issue 25). Peers' certificates are read without it
(fedcommon.cert_fields).

Each check is the same function a site or the console runs in its own process; the child gets a JSON request on
stdin and answers one JSON object on stdout. A child that fails, hangs or answers nonsense refuses: nothing is ever
trusted because a check could not run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only what the child needs at once is imported here: it starts for every check (kit imports grpc: the parent only).
from fedcommon.archive_signature import ArchiveSignature, SignatureChecks, SignatureError, file_digest
from fedcommon.bounded_json import JsonBoundsError, loads_object
from fedcommon.identity import PeerIdentity
from fedcommon.revocation import RevocationError, file_stamp

if TYPE_CHECKING:
    from fedcommon.kit import Kit

TIMEOUT_S = 60.0
MAX_REQUEST_BYTES = 4 << 20
MAX_ANSWER_BYTES = 64 << 20  # a CRL's serials, as decimal text
_PIPE_BYTES = 16 << 10  # a Linux pipe holds 64 KiB: writing this much never waits for a reader
MAX_REMEMBERED = 1024  # signatures accepted lately (ChildArchiveVerifier)
# CRLs the kit check's child checked as the server started: the server's first load of the same file, unchanged
# since, takes that answer instead of starting another child.
_checked_crls: dict[tuple[str, str, tuple[int, int, int]], tuple[int, frozenset[int]]] = {}


class _Check:
    """One check, running in its child from the moment it is made; answer() waits for it (TIMEOUT_S at most)."""

    def __init__(self, op: str, request: dict[str, Any], error: type[Exception]) -> None:
        self.op, self.error = op, error
        data = json.dumps({"op": op, **request}).encode()
        # A request this small goes into the pipe before the child starts, which then works on it at once while
        # this process goes on; a larger one is written by answer().
        self._input: bytes | None = None if len(data) <= _PIPE_BYTES else data
        stdin: int = subprocess.PIPE
        if self._input is None:
            stdin, write_end = os.pipe()
            try:
                while data:
                    data = data[os.write(write_end, data) :]
            finally:
                os.close(write_end)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", __name__], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as e:
            raise error(f"the {op} check could not run in its own process: {e}") from None
        finally:
            if self._input is None:
                os.close(stdin)

    def answer(self) -> dict[str, Any]:
        """The child's answer; the check's own refusal raised as `error` (SignatureError keeps its kind)."""
        try:
            out, err = self._proc.communicate(self._input, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
            raise self.error(f"the {self.op} check did not answer within {TIMEOUT_S:g} s") from None
        try:
            answer = loads_object(out[: MAX_ANSWER_BYTES + 1], "the check's answer", MAX_ANSWER_BYTES)
        except JsonBoundsError:
            answer = {}
        if self._proc.returncode != 0 or not answer:
            lines = err.decode(errors="replace").strip().splitlines()
            why = lines[-1] if lines else f"exit {self._proc.returncode}"
            raise self.error(f"the {self.op} check failed in its own process ({why})")
        if "error" in answer:
            if self.error is SignatureError:
                raise SignatureError(str(answer["error"]), permission=answer.get("permission") is True)
            raise self.error(str(answer["error"]))
        return answer


class KitCheck:
    """The check of a kit (loaded without its certificate checks) as load_participant_kit makes it, and of its
    startup/crl.pem as load_crl makes it, running in a child from the moment this is made: the server goes on
    starting meanwhile, and opens no port before kit() has answered."""

    def __init__(self, kit: Kit, role: str, command: str) -> None:
        from fedcommon.kit import KitError
        from fedcommon.revocation import CRL_FILE

        self._kit = kit
        self._crl = kit.folder / "startup" / CRL_FILE
        self._stamp = _safe_stamp(self._crl)
        request = {"folder": str(kit.folder), "role": role, "command": command, "crl": str(self._crl)}
        self._check = _Check("kit", request, KitError)

    def kit(self) -> Kit:
        """The kit, its org taken from the certificate when fed.json names none; KitError names what is wrong. A
        CRL's problem is left for the server's own load to report."""
        from dataclasses import replace

        from fedcommon.kit import KitError

        answer = self._check.answer()
        org = answer.get("org")
        if not isinstance(org, str):
            raise KitError(f"{self._kit.folder}: the kit check gave no organization")
        loaded = _crl_of(answer.get("crl"))
        if loaded is not None and self._stamp is not None and self._stamp == _safe_stamp(self._crl):
            _checked_crls[(str(self._crl), hashlib.sha256(self._kit.ca_pem).hexdigest(), self._stamp)] = loaded
        return replace(self._kit, org=org)


def load_crl(path: Path, ca_pem: bytes) -> tuple[int, frozenset[int]]:
    """fedcommon.revocation.load_crl, in a child: (CRL number, revoked serials); RevocationError if not trusted."""
    stamp = _safe_stamp(path)
    if stamp is not None:
        checked = _checked_crls.pop((str(path), hashlib.sha256(ca_pem).hexdigest(), stamp), None)
        if checked is not None:
            return checked
    loaded = _crl_of(_Check("crl", {"path": str(path), "ca_pem": ca_pem.decode("ascii")}, RevocationError).answer())
    if loaded is None:
        raise RevocationError(f"{path}: the CRL check gave no list")
    return loaded


def _safe_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        return file_stamp(path)
    except OSError:  # unreadable: no answer is kept for it, and the server's own load says why
        return None


def _crl_of(answer: Any) -> tuple[int, frozenset[int]] | None:
    if not isinstance(answer, dict):
        return None
    number, revoked = answer.get("number"), answer.get("revoked")
    if not isinstance(number, int) or not isinstance(revoked, list):
        return None
    return number, frozenset(int(s) for s in revoked)


class ChildArchiveVerifier(SignatureChecks):
    """fedcommon.archive_signature.ArchiveVerifier's checks, each in a child; the revoked serials are the server's
    own list at the time of the check.

    A deploy checks one signature up to four times in a few seconds (an upload's header, its bytes, the deploy
    request, the server's own deploy). A signature a child accepted is accepted again without a child only while
    what can change since is unchanged: its signer not revoked, the signer's and CA's certificates valid now, and
    the same uploader. Anything else goes to a child again, which gives the refusal in its own words.
    """

    def __init__(self, ca_pem: bytes, revoked: Callable[[], frozenset[int]], remember_s: float = 600.0) -> None:
        self._ca_pem = ca_pem
        self._revoked = revoked
        self._remember_s = remember_s
        self._lock = threading.Lock()
        self._accepted: dict[tuple, _Accepted] = {}

    def check_signer(self, signature: ArchiveSignature | None, uploader: str | None = None) -> PeerIdentity:
        return self._check(signature, uploader, None, None)

    def verify_digest(
        self, signature: ArchiveSignature | None, sha256: str, size: int, uploader: str | None = None
    ) -> PeerIdentity:
        return self._check(signature, uploader, sha256, size)

    def verify_file(
        self, path: str | os.PathLike, signature: ArchiveSignature | None, uploader: str | None = None
    ) -> PeerIdentity:
        if signature is None:  # the cheap refusal, before the file is read
            return self.check_signer(None, uploader)
        sha256, size = file_digest(path)
        return self.verify_digest(signature, sha256, size, uploader)

    def _check(
        self, signature: ArchiveSignature | None, uploader: str | None, sha256: str | None, size: int | None
    ) -> PeerIdentity:
        revoked = self._revoked()
        key = None if signature is None else (signature.signature, signature.signer_certificate, sha256, size)
        with self._lock:
            now = time.time()
            for k in [k for k, v in self._accepted.items() if v.until < time.monotonic()]:
                del self._accepted[k]
            accepted = self._accepted.get(key) if key is not None else None
            if accepted is not None and accepted.still(now, revoked, uploader):
                return accepted.signer
        request: dict[str, Any] = {
            "ca_pem": self._ca_pem.decode("ascii"),
            "revoked": [str(s) for s in revoked],
            "uploader": uploader,
            "sha256": sha256,
            "size": size,
        }
        if signature is not None:
            request["signature"] = base64.b64encode(signature.signature).decode("ascii")
            request["certificate"] = signature.signer_certificate.decode("latin-1")
        answer = _Check("signature", request, SignatureError).answer()
        signer, valid = answer.get("signer"), answer.get("valid")
        if not isinstance(signer, dict) or not isinstance(valid, list) or len(valid) != 2:
            raise SignatureError("the signature check named no signer", permission=True)
        peer = PeerIdentity(**{**signer, "serial": int(signer["serial"])})
        if key is not None:
            accepted = _Accepted(peer, float(valid[0]), float(valid[1]), time.monotonic() + self._remember_s)
            with self._lock:
                if len(self._accepted) < MAX_REMEMBERED:
                    self._accepted[key] = accepted
                    if sha256 is not None:  # its bytes' check included its signer's
                        self._accepted[key[:2] + (None, None)] = accepted
        return peer


@dataclass(frozen=True)
class _Accepted:
    """A signature a child accepted: its signer, and when the signer's and CA's certificates are both valid."""

    signer: PeerIdentity
    valid_from: float  # POSIX seconds
    valid_to: float
    until: float  # monotonic: forgotten then

    def still(self, now: float, revoked: frozenset[int], uploader: str | None) -> bool:
        return (
            self.signer.serial not in revoked
            and self.valid_from <= now <= self.valid_to
            and (uploader is None or uploader == self.signer.name)
        )


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    if op == "kit":
        from fedcommon.kit import KitError, load_participant_kit

        try:
            kit = load_participant_kit(Path(request["folder"]), request["role"], request["command"])
        except KitError as e:
            return {"error": str(e)}
        try:
            crl = _crl_answer(Path(request["crl"]), kit.ca_pem)
        except RevocationError:
            crl = None  # the server's own load says what is wrong with it
        return {"org": kit.org, "crl": crl}
    if op == "crl":
        return _crl_answer(Path(request["path"]), request["ca_pem"].encode("ascii"))
    if op == "signature":
        from fedcommon.archive_signature import ArchiveVerifier

        revoked = frozenset(int(s) for s in request["revoked"])
        verifier = ArchiveVerifier(request["ca_pem"].encode("ascii"), revoked.__contains__)
        signature = None
        if "signature" in request:
            signature = ArchiveSignature(
                base64.b64decode(request["signature"]), request["certificate"].encode("latin-1")
            )
        if request["sha256"] is None:
            signer = verifier.check_signer(signature, request["uploader"])
        else:
            signer = verifier.verify_digest(signature, request["sha256"], request["size"], request["uploader"])
        return {
            "signer": {**signer.__dict__, "serial": str(signer.serial)},
            "valid": _valid(request["certificate"], request["ca_pem"]),
        }
    raise ValueError(f"unknown check {op!r}")


def _valid(certificate: str, ca_pem: str) -> list[float]:
    """[from, to] in POSIX seconds: when the signer's certificate and the CA's are both valid."""
    from cryptography import x509

    signer = x509.load_pem_x509_certificate(certificate.encode("latin-1"))
    ca = x509.load_pem_x509_certificate(ca_pem.encode("ascii"))
    return [
        max(signer.not_valid_before_utc, ca.not_valid_before_utc).timestamp(),
        min(signer.not_valid_after_utc, ca.not_valid_after_utc).timestamp(),
    ]


def _crl_answer(path: Path, ca_pem: bytes) -> dict[str, Any]:
    from fedcommon import revocation

    number, revoked = revocation.load_crl(path, ca_pem)
    return {"number": number, "revoked": [str(s) for s in sorted(revoked)]}


def main() -> None:
    request = loads_object(sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1), "the check's request", MAX_REQUEST_BYTES)
    try:
        answer = _answer(request)
    except SignatureError as e:
        answer = {"error": str(e), "permission": e.permission}
    except RevocationError as e:
        answer = {"error": str(e)}
    sys.stdout.write(json.dumps(answer))


if __name__ == "__main__":
    main()
