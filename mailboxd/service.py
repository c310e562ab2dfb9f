"""Builds the appliance's MultiService from a Config."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from .accounts import AccountStore
from .config import Config
from .maildir import clean_spool
from .policy import Listener
from .pop3 import POP3Factory
from .realm import BcryptChecker, MailboxRealm, make_portal
from .smtp import SMTPFactory

log = Logger()


class ListenerService(StreamServerEndpointService):
    """An endpoint service that stops start-up with one line if it cannot listen."""

    def __init__(self, reactor: Any, description: str, factory: ServerFactory, name: str) -> None:
        super().__init__(serverFromString(reactor, description), factory)
        self.description = description
        self.setName(name)
        # Fail at start-up rather than log and run without the listener.
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(
                f"mailbox: cannot listen on {self.description}: {e.socketError}"
            ) from None
        log.info("{name} listening on {endpoint}", name=self.name, endpoint=self.description)


@attrs.define(eq=False)
class PoolService(Service):
    """Runs the thread pool for bcrypt and disk work while the service runs."""

    pool: ThreadPool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


@attrs.define(eq=False)
class AccountsService(Service):
    store: AccountStore

    def startService(self) -> None:
        super().startService()
        self.store.start()

    def stopService(self) -> None:
        super().stopService()
        self.store.stop()


def build(config: Config, reactor: Any) -> MultiService:
    """The whole appliance: thread pool, accounts, and one service per endpoint."""
    top = MultiService()
    m = config.mailbox
    pool = ThreadPool(minthreads=1, maxthreads=8, name="mailbox")
    PoolService(pool).setServiceParent(top)
    store = AccountStore(m.accounts, m.aliases, m.domains, dict(m.domain_aliases), clock=reactor)
    AccountsService(store).setServiceParent(top)
    try:
        m.mail_dir.mkdir(parents=True, exist_ok=True)
        stale = clean_spool(m.mail_dir / ".incoming")
    except OSError as e:
        raise SystemExit(
            f"mailbox: {config.path}: [mailbox] mail_dir = '{m.mail_dir}': cannot use it: {e.strerror}"
        ) from None
    if stale:
        log.info("removed {count} unacknowledged spool files left by a crash", count=stale)
    if not store.directory.hashes:
        log.warn(
            "no accounts yet: add one with 'mailboxctl --config {config} user add you@{domain}'",
            config=str(config.path),
            domain=m.domains[0],
        )

    def directory() -> Any:
        return store.directory

    checker = BcryptChecker(directory, reactor, pool, rounds=m.bcrypt_rounds)
    portal = make_portal(MailboxRealm(directory), checker)
    # Make the unknown-user hash before the first login needs it (see BcryptChecker).
    cost = store.directory.typical_cost or m.bcrypt_rounds
    reactor.callWhenRunning(pool.callInThread, checker.dummy_hash, cost)

    def smtp(listener: Listener) -> SMTPFactory:
        return SMTPFactory(config, directory, reactor, reactor, pool, listener)

    for i, desc in enumerate(config.smtp.listen):
        ListenerService(reactor, desc, smtp(Listener.MTA), f"smtp-{i}").setServiceParent(top)
    for i, desc in enumerate(config.smtp.submission):
        ListenerService(
            reactor, desc, smtp(Listener.SUBMISSION), f"submission-{i}"
        ).setServiceParent(top)
    pop3 = POP3Factory(config, portal, reactor, reactor, pool)
    for i, desc in enumerate(config.pop3.listen):
        ListenerService(reactor, desc, pop3, f"pop3-{i}").setServiceParent(top)
    return top
