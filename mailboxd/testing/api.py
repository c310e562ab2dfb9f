"""What the in-process and the child-process servers share: the Message,
the config overrides a test may give, matching and failing a wait."""

from __future__ import annotations

import email
import email.policy
import fnmatch
import ssl
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import attrs

from ..config import SPEC

# Keys MailServer manages itself; everything else in the contract may be overridden.
_MANAGED = {
    "domains",  # the constructor's first argument
    "listen",
    "submission",
    "accounts",
    "aliases",
    "mail_dir",
    "certificate",
    "private_key",
}


def _override_names() -> dict[str, tuple[str, str]]:
    names: dict[str, tuple[str, str]] = {}
    for section, keys in SPEC.items():
        for key in keys:
            if key in _MANAGED:
                continue
            if key in names:  # idle_timeout is in [smtp] and [pop3]
                names[f"{section}_{key}"] = (section, key)
            else:
                names[key] = (section, key)
    return names


OVERRIDES = _override_names()


@attrs.frozen
class Message:
    """A message the server received, or relayed (then captured)."""

    envelope_from: str  # "" for <>
    recipients: tuple[str, ...]
    raw: bytes  # as stored (LF line ends), or as sent on for a captured one (CRLF)
    account: str | None = None  # the mailbox it is in; None for a captured one
    authenticated: str | None = None  # the account that sent it with AUTH, if any
    tls: str | None = None  # the TLS version and cipher it arrived over, if any

    @property
    def message(self) -> EmailMessage:
        return email.message_from_bytes(self.raw, policy=email.policy.default)

    @property
    def subject(self) -> str:
        return str(self.message.get("Subject", ""))

    def __repr__(self) -> str:
        to = ", ".join(self.recipients)
        return f"<Message from <{self.envelope_from}> to {to}: {self.subject!r}>"


def check_overrides(overrides: dict[str, Any]) -> None:
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(
            f"MailServer: unknown config override(s) {', '.join(unknown)}; "
            f"valid names: {', '.join(sorted(OVERRIDES))}"
        )


def not_found(to: str | None, subject: str | None, timeout: float, arrived: list) -> AssertionError:
    return AssertionError(
        f"no message to={to!r} subject={subject!r} within {timeout} s; arrived: {arrived!r}"
    )


def trusting_context(certificate: Path | None) -> ssl.SSLContext:
    """A client context that trusts a test server's throwaway certificate."""
    if certificate is None:
        raise RuntimeError("this MailServer was started without tls=True")
    ctx = ssl.create_default_context(cafile=str(certificate))
    ctx.check_hostname = False  # clients connect to 127.0.0.1, not the hostname
    return ctx


class ServerAPI:
    """What the in-process and the child-process servers share."""

    # Each server has these.
    start: Callable[[], Any]
    stop: Callable[[], Any]
    wait_for_message: Callable[..., Any]

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def assert_no_message(
        self,
        to: str | None = None,
        subject: str | None = None,
        predicate: Callable[[Message], bool] | None = None,
        within: float = 0.5,
        *,
        outbound: bool = False,
    ) -> None:
        """Fail if a matching message arrives (or has arrived) within `within` seconds."""
        try:
            found = self.wait_for_message(to, subject, predicate, within, outbound=outbound)
        except AssertionError:
            return
        raise AssertionError(f"unexpected message: {found!r}")


def match_message(
    m: Message,
    to: str | None,
    subject: str | None,
    predicate: Callable[[Message], bool] | None,
    outbound: bool,
) -> bool:
    """Does `m` match? `to` is a lower-case recipient (outbound) or mailbox key."""
    if to is not None:
        where = [r.lower() for r in m.recipients] if outbound else [m.account]
        if to not in where:
            return False
    if subject is not None and not fnmatch.fnmatchcase(m.subject, subject):
        return False
    return predicate is None or bool(predicate(m))
