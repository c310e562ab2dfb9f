"""The one realm and bcrypt checker that POP3 and SMTP AUTH share."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, cast

import attrs
import bcrypt
from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from zope.interface import Interface, implementer

from .accounts import Account, Directory
from .addresses import parse_mailbox
from .credcache import CredentialCache
from .state import normalise_ip


class IAccount(Interface):
    """Avatar interface: the authenticated local account."""


@implementer(IRealm)
@attrs.frozen
class MailboxRealm:
    """Turns an authenticated address into its Account."""

    directory: Callable[[], Directory]

    def requestAvatar(self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any) -> tuple:
        if IAccount not in interfaces:
            raise NotImplementedError("only IAccount avatars are served")
        if not isinstance(avatarId, bytes):  # () is Twisted's anonymous avatar: none here
            raise error.UnauthorizedLogin()
        address = parse_mailbox(avatarId.decode("utf-8"))
        account = None if address is None else self.directory().account(address)
        if account is None:  # deleted between the check and here
            raise error.UnauthorizedLogin()
        return IAccount, account, lambda: None


@implementer(credentials.IUsernamePassword)
@attrs.frozen(repr=False)
class ClientCredentials:
    """A user name and password, and the address of the client that sent them
    (so that the checker can keep one client's checks in line)."""

    username: bytes
    password: bytes
    client: str

    def __repr__(self) -> str:  # never show the password
        return "<ClientCredentials>"

    def checkPassword(self, password: bytes) -> bool:
        return hmac.compare_digest(password, self.password)


@attrs.define
class HashingQueue:
    """bcrypt checks in the hashing pool, at most `per_client` at once for
    any one client address: one client cannot take every core, and its
    other checks wait in line rather than being refused."""

    run: Callable[..., Deferred]  # Workers.hash
    per_client: int = 1
    # Asked when a check's turn comes after waiting in line: False (the client
    # was blocked meanwhile) fails it without spending a bcrypt check on it.
    admit: Callable[[str], Deferred] | None = None
    _lines: dict[str, DeferredSemaphore] = attrs.field(init=False, factory=dict)

    def check(self, client: str, password: bytes, hashed: bytes) -> Deferred:
        line = self._lines.get(client)
        if line is None:
            line = self._lines[client] = DeferredSemaphore(self.per_client)
        waited = line.tokens == 0

        def attempt() -> Deferred:
            if not waited or self.admit is None:
                return self.run(checkpw, password, hashed)
            d = self.admit(client)
            return d.addCallback(lambda ok: self.run(checkpw, password, hashed) if ok else False)

        def done(result: Any) -> Any:
            if line.tokens == line.limit and not line.waiting:
                self._lines.pop(client, None)
            return result

        return line.run(attempt).addBoth(done)

    def waiting(self, client: str) -> int:
        line = self._lines.get(client)
        return 0 if line is None else len(line.waiting)


def checkpw(password: bytes, hashed: bytes) -> bool:
    """Blocking: call it in the hashing pool."""
    try:
        return bcrypt.checkpw(password, _normalise(hashed))
    except ValueError:
        return False


@implementer(ICredentialsChecker)
@attrs.define
class BcryptChecker:
    """Checks a username and password against the accounts' bcrypt hashes.

    A password verified within `cache.ttl` is accepted from the cache; else
    bcrypt runs in the hashing pool, off the reactor thread, in the client's
    line (`HashingQueue`). An unknown user is checked against a dummy hash at
    the cost most accounts use, so the answer takes as long as for a wrong
    password and timing does not tell which accounts exist.
    """

    directory: Callable[[], Directory]
    hashing: HashingQueue
    cache: CredentialCache
    rounds: int = 12
    credentialInterfaces = (credentials.IUsernamePassword,)
    _dummies: dict[int, bytes] = attrs.field(init=False, repr=False, factory=dict)

    def dummy_hash(self, cost: int) -> bytes:
        """Blocking (making a hash costs as much as checking one): call it in a pool."""
        if cost not in self._dummies:
            self._dummies[cost] = bcrypt.hashpw(b"no such account", bcrypt.gensalt(cost))
        return self._dummies[cost]

    def requestAvatarId(self, creds: credentials.IUsernamePassword) -> Deferred:
        username = _text(creds.username)
        password = creds.password if isinstance(creds.password, bytes) else creds.password.encode()
        client = normalise_ip(getattr(creds, "client", ""))
        address = parse_mailbox(username)
        directory = self.directory()
        hashed = None if address is None else directory.password_hash(address)
        account = None if address is None else directory.account(address)
        if hashed is not None and account is not None:
            if self.cache.verified(account.address, hashed, password):
                return succeed(account.address.encode("utf-8"))
            target = succeed(hashed)
        else:
            cost = directory.typical_cost or self.rounds
            target = (
                succeed(self._dummies[cost])
                if cost in self._dummies
                else self.hashing.run(self.dummy_hash, cost)
            )

        def decide(ok: bool) -> bytes:
            if ok and hashed is not None and account is not None:
                self.cache.remember(account.address, hashed, password)
                return account.address.encode("utf-8")
            raise error.UnauthorizedLogin()

        d = target.addCallback(lambda h: self.hashing.check(client, password, h))
        return d.addCallback(decide)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _normalise(hashed: bytes) -> bytes:
    # htpasswd writes $2y$ (PHP's name for the fixed algorithm); same as $2b$.
    return b"$2b$" + hashed[4:] if hashed.startswith(b"$2y$") else hashed


def make_portal(realm: MailboxRealm, checker: BcryptChecker) -> Portal:
    return Portal(realm, [checker])


async def login(portal: Portal, username: str, password: bytes, client: str = "") -> Account:
    """Log in through `portal`; raise UnauthorizedLogin on failure."""
    creds = ClientCredentials(username.encode("utf-8"), password, client)
    _iface, account, _logout = await portal.login(creds, None, IAccount)
    return cast(Account, account)  # what MailboxRealm gives for IAccount
