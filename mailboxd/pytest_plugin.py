"""pytest fixtures for Mailbox, registered through the ``pytest11`` entry point:
installing the package is enough, no conftest needed.

* ``mail_server``: a running ``mailboxd.testing.MailServer(...)`` (an
  :class:`~mailboxd.testing.InProcessMailServer`), one per test session (so
  one per pytest-xdist worker), reset before each test.
* ``mail_account``: a fresh account on it, with ``.address`` and ``.password``
  (it also unpacks: ``address, password = mail_account``).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import attrs
import pytest

from .testing import InProcessMailServer, MailServer


@attrs.frozen
class MailAccount:
    address: str
    password: str = attrs.field(repr=False)

    def __iter__(self) -> Iterator[str]:
        """So that ``address, password = mail_account`` works too."""
        return iter((self.address, self.password))


@pytest.fixture(scope="session")
def _mail_server_session() -> Iterator[InProcessMailServer]:
    with MailServer(domains=["example.test"]) as server:
        yield server


@pytest.fixture
def mail_server(_mail_server_session: InProcessMailServer) -> InProcessMailServer:
    """A real SMTP + POP3 server on 127.0.0.1, fresh for this test."""
    _mail_server_session.reset()
    return _mail_server_session


@pytest.fixture
def mail_account(mail_server: InProcessMailServer) -> MailAccount:
    """A new account on `mail_server`, with a random address and password."""
    account = MailAccount(
        f"user-{secrets.token_hex(4)}@{mail_server.domains[0]}", secrets.token_urlsafe(12)
    )
    mail_server.add_account(account.address, account.password)
    return account
