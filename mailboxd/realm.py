"""The one realm and bcrypt checker that POP3 and SMTP AUTH share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import bcrypt
from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from .accounts import Account, Directory
from .addresses import parse_mailbox


class IAccount(Interface):
    """Avatar interface: the authenticated local account."""


@implementer(IRealm)
@attrs.frozen
class MailboxRealm:
    """Turns an authenticated address into its Account."""

    directory: Callable[[], Directory]

    def requestAvatar(self, avatarId: bytes, mind: object, *interfaces: Any) -> tuple:
        if IAccount not in interfaces:
            raise NotImplementedError("only IAccount avatars are served")
        address = parse_mailbox(avatarId.decode("utf-8"))
        account = None if address is None else self.directory().account(address)
        if account is None:  # deleted between the check and here
            raise error.UnauthorizedLogin()
        return IAccount, account, lambda: None


@implementer(ICredentialsChecker)
@attrs.define
class BcryptChecker:
    """Checks a username and password against the accounts' bcrypt hashes.

    bcrypt runs in `pool`, off the reactor thread. An unknown user is checked
    against a dummy hash at the cost most accounts use, so the answer takes as
    long as for a wrong password and timing does not tell which accounts exist.
    """

    directory: Callable[[], Directory]
    reactor: Any
    pool: ThreadPool
    rounds: int = 12
    credentialInterfaces = (credentials.IUsernamePassword,)
    _dummies: dict[int, bytes] = attrs.field(init=False, repr=False, factory=dict)

    def dummy_hash(self, cost: int) -> bytes:
        """Runs in the pool: making a hash costs as much as checking one."""
        if cost not in self._dummies:
            self._dummies[cost] = bcrypt.hashpw(b"no such account", bcrypt.gensalt(cost))
        return self._dummies[cost]

    def requestAvatarId(self, creds: credentials.IUsernamePassword) -> Deferred:
        username = _text(creds.username)
        password = creds.password if isinstance(creds.password, bytes) else creds.password.encode()
        address = parse_mailbox(username)
        directory = self.directory()
        hashed = None if address is None else directory.password_hash(address)
        account = None if address is None else directory.account(address)
        cost = directory.typical_cost or self.rounds

        def check() -> bool:
            target = hashed if hashed is not None else self.dummy_hash(cost)
            try:
                return bcrypt.checkpw(password, _normalise(target))
            except ValueError:
                return False

        def decide(ok: bool) -> bytes:
            if ok and hashed is not None and account is not None:
                return account.address.encode("utf-8")
            raise error.UnauthorizedLogin()

        return deferToThreadPool(self.reactor, self.pool, check).addCallback(decide)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _normalise(hashed: bytes) -> bytes:
    # htpasswd writes $2y$ (PHP's name for the fixed algorithm); same as $2b$.
    return b"$2b$" + hashed[4:] if hashed.startswith(b"$2y$") else hashed


def make_portal(realm: MailboxRealm, checker: BcryptChecker) -> Portal:
    return Portal(realm, [checker])


async def login(portal: Portal, username: str, password: bytes) -> Account:
    """Log in through `portal`; raise UnauthorizedLogin on failure."""
    creds = credentials.UsernamePassword(username.encode("utf-8"), password)
    _iface, account, _logout = await portal.login(creds, None, IAccount)
    return account
