"""Logging in, for both protocols: the guard, then the shared portal.

Also the SASL PLAIN decoding (RFC 4616) that SMTP and POP3 share.
"""

from __future__ import annotations

import base64
import binascii
import enum
from typing import Any

import attrs
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger

from .accounts import Account
from .guard import Guard
from .realm import login

log = Logger()


class Outcome(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    BLOCKED = "blocked"  # this IP is blocked now: end the session
    BUSY = "busy"  # too many attempts from this IP are in flight: try later


@attrs.frozen
class AuthResult:
    outcome: Outcome
    account: Account | None = None


@attrs.frozen(repr=False)
class Authenticator:
    portal: Portal
    guard: Guard

    def __repr__(self) -> str:
        return "<Authenticator>"

    def login(self, protocol: str, ip: str, username: str, password: bytes) -> Deferred:
        """Check `username`/`password` for a client at `ip`; fires with an AuthResult."""
        if not self.guard.begin(ip):
            blocked = self.guard.blocked(ip)
            log.info(
                "{protocol} login refused for {user} from {client}: {why}",
                protocol=protocol,
                user=username,
                client=ip,
                why="blocked" if blocked else "too many attempts in flight",
            )
            return succeed(AuthResult(Outcome.BLOCKED if blocked else Outcome.BUSY))

        def ok(account: Account) -> AuthResult:
            self.guard.succeeded(ip)
            log.info(
                "{protocol} login {user} from {client}",
                protocol=protocol,
                user=account.address,
                client=ip,
            )
            return AuthResult(Outcome.OK, account)

        def refused(f: Any) -> AuthResult:
            if not f.check(UnauthorizedLogin):
                log.failure(
                    "{protocol} login error for {user}", f, protocol=protocol, user=username
                )
            blocked = self.guard.failed(ip)
            log.info(
                "{protocol} login failed for {user} from {client}",
                protocol=protocol,
                user=username,
                client=ip,
            )
            return AuthResult(Outcome.BLOCKED if blocked else Outcome.FAILED)

        d = ensureDeferred(login(self.portal, username, password))
        return d.addCallbacks(ok, refused)

    def refuse(self, protocol: str, ip: str, username: str, why: str) -> AuthResult:
        """Count a refusal decided without a password check (e.g. a foreign authzid)."""
        blocked = self.guard.failed(ip, reserved=False)
        log.info(
            "{protocol} login refused for {user} from {client}: {why}",
            protocol=protocol,
            user=username,
            client=ip,
            why=why,
        )
        return AuthResult(Outcome.BLOCKED if blocked else Outcome.FAILED)


class SASLError(ValueError):
    """A malformed SASL response; str() says what was wrong."""


def b64decode(response: str) -> bytes:
    """Decode a SASL response line; ``=`` is the empty response (RFC 4954)."""
    if response == "=":
        return b""
    try:
        return base64.b64decode(response, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError("cannot decode the response as base64") from None


def decode_plain(response: str) -> tuple[str, bytes]:
    """The authcid and password of a PLAIN response (RFC 4616).

    An authzid other than the authcid is refused: nobody may act for another.
    """
    parts = b64decode(response).split(b"\0")
    if len(parts) != 3 or not parts[1]:
        raise SASLError("expected authzid NUL authcid NUL password")
    authzid, authcid, password = parts
    if authzid and authzid != authcid:
        raise PermissionError("authorization identity differs from authentication identity")
    return authcid.decode("utf-8", "replace"), password
