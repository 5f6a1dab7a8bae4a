"""The server's checks that need the cryptography package (its kit, the CRL's signature, archive signatures), each
run in a short-lived child process: the long-running server never loads that library, which at 100 sites was
16-19 MiB of its memory (benchmarks/README.md, issue 25). Peers' certificates are read without it
(fedcommon.cert_fields).

Each check is the same function a site or the console runs in its own process; the child gets a JSON request on
stdin and answers one JSON object on stdout. A child that fails, hangs or answers nonsense refuses: nothing is ever
trusted because a check could not run.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedcommon.archive_signature import ArchiveSignature, SignatureChecks, SignatureError, file_digest
from fedcommon.bounded_json import JsonBoundsError, loads_object
from fedcommon.identity import PeerIdentity
from fedcommon.kit import Kit, KitError
from fedcommon.revocation import RevocationError

TIMEOUT_S = 60.0
MAX_REQUEST_BYTES = 4 << 20
MAX_ANSWER_BYTES = 64 << 20  # a CRL's serials, as decimal text
_ERRORS: dict[str, type[Exception]] = {"kit": KitError, "crl": RevocationError, "signature": SignatureError}


class CheckFailed(Exception):
    """The child could not run the check; the message says why (the caller refuses)."""


def _ask(op: str, request: dict[str, Any]) -> dict[str, Any]:
    """The child's answer to `op`; the check's own error (KitError, RevocationError, SignatureError) as it raised it."""
    error = _ERRORS[op]
    try:
        done = subprocess.run(
            [sys.executable, "-m", __name__],
            input=json.dumps({"op": op, **request}).encode(),
            capture_output=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise error(f"the {op} check could not run in its own process: {e}") from None
    try:
        answer = loads_object(done.stdout[: MAX_ANSWER_BYTES + 1], "the check's answer", MAX_ANSWER_BYTES)
    except JsonBoundsError:
        answer = {}
    if done.returncode != 0 or not answer:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise error(f"the {op} check failed in its own process ({lines[-1] if lines else f'exit {done.returncode}'})")
    if "error" in answer:
        if op == "signature":
            raise SignatureError(str(answer["error"]), permission=answer.get("permission") is True)
        raise error(str(answer["error"]))
    return answer


def checked_kit(kit: Kit, role: str, command: str) -> Kit:
    """`kit` (loaded without its certificate checks) once a child has checked it as load_participant_kit does; the
    org taken from the certificate when fed.json names none. KitError names what is wrong."""
    answer = _ask("kit", {"folder": str(kit.folder), "role": role, "command": command})
    org = answer.get("org")
    if not isinstance(org, str):
        raise KitError(f"{kit.folder}: the kit check gave no organization")
    from dataclasses import replace

    return replace(kit, org=org)


def load_crl(path: Path, ca_pem: bytes) -> tuple[int, frozenset[int]]:
    """fedcommon.revocation.load_crl, in a child: (CRL number, revoked serials); RevocationError if not trusted."""
    answer = _ask("crl", {"path": str(path), "ca_pem": ca_pem.decode("ascii")})
    number, revoked = answer.get("number"), answer.get("revoked")
    if not isinstance(number, int) or not isinstance(revoked, list):
        raise RevocationError(f"{path}: the CRL check gave no list")
    return number, frozenset(int(s) for s in revoked)


class ChildArchiveVerifier(SignatureChecks):
    """fedcommon.archive_signature.ArchiveVerifier's checks, each in a child; the revoked serials are the server's
    own list at the time of the check."""

    def __init__(self, ca_pem: bytes, revoked: Any) -> None:
        self._ca_pem = ca_pem
        self._revoked = revoked  # () -> frozenset[int]

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
        request: dict[str, Any] = {
            "ca_pem": self._ca_pem.decode("ascii"),
            "revoked": [str(s) for s in self._revoked()],
            "uploader": uploader,
            "sha256": sha256,
            "size": size,
        }
        if signature is not None:
            request["signature"] = base64.b64encode(signature.signature).decode("ascii")
            request["certificate"] = signature.signer_certificate.decode("latin-1")
        signer = _ask("signature", request).get("signer")
        if not isinstance(signer, dict):
            raise SignatureError("the signature check named no signer", permission=True)
        return PeerIdentity(**{**signer, "serial": int(signer["serial"])})


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    if op == "kit":
        from fedcommon.kit import load_participant_kit

        kit = load_participant_kit(Path(request["folder"]), request["role"], request["command"])
        return {"org": kit.org}
    if op == "crl":
        from fedcommon.revocation import load_crl as load

        number, revoked = load(Path(request["path"]), request["ca_pem"].encode("ascii"))
        return {"number": number, "revoked": [str(s) for s in sorted(revoked)]}
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
        return {"signer": {**signer.__dict__, "serial": str(signer.serial)}}
    raise ValueError(f"unknown check {op!r}")


def main() -> None:
    request = loads_object(sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1), "the check's request", MAX_REQUEST_BYTES)
    try:
        answer = _answer(request)
    except SignatureError as e:
        answer = {"error": str(e), "permission": e.permission}
    except (KitError, RevocationError) as e:
        answer = {"error": str(e)}
    sys.stdout.write(json.dumps(answer))


if __name__ == "__main__":
    main()
