"""Logging in, for both protocols: the guard, then the shared portal."""

from __future__ import annotations

import enum
from typing import Any

import attrs
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from .accounts import Account
from .guard import Guard
from .metrics import Metrics
from .printable import shown
from .realm import login
from .state import StateError

log = Logger()


class LoginOutcome(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    BLOCKED = "blocked"  # this IP is blocked now: end the session


@attrs.frozen
class AuthResult:
    outcome: LoginOutcome
    account: Account | None = None


@attrs.frozen(repr=False)
class Authenticator:
    portal: Portal
    guard: Guard
    metrics: Metrics = attrs.field(factory=Metrics)  # one for the process, shared

    def __repr__(self) -> str:
        return "<Authenticator>"

    def login(self, protocol: str, ip: str, username: str, password: bytes) -> Deferred:
        """Check `username`/`password` for a client at `ip`; fires with an AuthResult."""
        d = ensureDeferred(self._login(protocol, ip, username, password))
        return d.addCallback(self._counted, protocol)

    def _counted(self, result: AuthResult, protocol: str) -> AuthResult:
        ok = result.outcome is LoginOutcome.OK
        self.metrics.auth[protocol, "success" if ok else "failure"].inc()
        return result

    async def _login(self, protocol: str, ip: str, username: str, password: bytes) -> AuthResult:
        if await self.guard.blocked(ip):
            return self._refused_blocked(protocol, ip, username)
        try:
            account = await login(self.portal, username, password, ip)
        except UnauthorizedLogin:
            return await self._failed(protocol, ip, username, None)
        except StateError:
            raise  # no verdict: the session gets a temporary error
        except Exception as e:
            log.failure(
                "{protocol} login error for {user}", None, protocol=protocol, user=shown(username)
            )
            return await self._failed(protocol, ip, username, str(e))
        # A right password that completes once the IP is blocked is refused too:
        # a guess made in parallel with the failures that blocked it tells nothing.
        if await self.guard.blocked(ip):
            return self._refused_blocked(protocol, ip, username)
        log.info(
            "{protocol} login {account} from {client}",
            protocol=protocol,
            account=account.address,
            client=ip,
        )
        return AuthResult(LoginOutcome.OK, account)

    def _refused_blocked(self, protocol: str, ip: str, username: str) -> AuthResult:
        log.info(
            "{protocol} login refused for {user} from {client}: blocked",
            protocol=protocol,
            user=shown(username),
            client=ip,
        )
        return AuthResult(LoginOutcome.BLOCKED)

    async def _failed(self, protocol: str, ip: str, username: str, why: Any) -> AuthResult:
        verdict = await self.guard.failed(ip)
        if not verdict.counted:  # blocked meanwhile, by failures in parallel with this one
            return self._refused_blocked(protocol, ip, username)
        log.info(
            "{protocol} login failed for {user} from {client}" + (": {why}" if why else ""),
            protocol=protocol,
            user=shown(username),
            client=ip,
            why=why,
        )
        return AuthResult(LoginOutcome.BLOCKED if verdict.blocked else LoginOutcome.FAILED)

    def refuse(self, protocol: str, ip: str, username: str, why: str) -> Deferred:
        """Count a refusal decided without a password check (e.g. a foreign authzid)."""
        d = ensureDeferred(self._failed(protocol, ip, username, why))
        return d.addCallback(self._counted, protocol)
