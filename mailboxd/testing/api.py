"""What the in-process and the child-process servers share: the Message,
the config overrides a test may give, matching and failing a wait."""

from __future__ import annotations

import email
import email.policy
import fnmatch
import re
import ssl
from collections.abc import Callable
from email.message import EmailMessage
from html.parser import HTMLParser
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

    def _part(self, subtype: str) -> str | None:
        """The body's text/`subtype` part, decoded (transfer encoding and
        charset), with LF line ends; None if it has none."""
        part = self.message.get_body(preferencelist=(subtype,))
        if part is None:
            return None
        content = part.get_content()
        return content.replace("\r\n", "\n") if isinstance(content, str) else None

    @property
    def text(self) -> str | None:
        """The text/plain body (of a multipart/alternative, the plain part),
        decoded; None if there is none. Never derived from the HTML."""
        return self._part("plain")

    @property
    def html(self) -> str | None:
        """The text/html body, decoded; None if there is none."""
        return self._part("html")

    @property
    def links(self) -> list[str]:
        """The http(s) URLs in the text part, then the `<a href>`s of the HTML
        part, each once, in the order first seen."""
        found = [_trim_url(u) for u in _URL.findall(self.text or "")]
        if (html := self.html) is not None:
            anchors = _Anchors()
            anchors.feed(html)
            anchors.close()
            found += anchors.hrefs
        return list(dict.fromkeys(u for u in found if u))

    def find(self, pattern: str | re.Pattern[str]) -> str | None:
        """The first match of the regular expression `pattern` in the text
        part (in the HTML part if there is no text part): its first group if
        it has groups, else the whole match; None if nothing matches.

            code = message.find(r"code: (\\d{6})")
        """
        where = self.text
        if where is None:
            where = self.html or ""
        found = re.search(pattern, where)
        if found is None:
            return None
        return found.group(1) if found.re.groups else found.group(0)

    def __repr__(self) -> str:
        to = ", ".join(self.recipients)
        return f"<Message from <{self.envelope_from}> to {to}: {self.subject!r}>"


_URL = re.compile(r"https?://[^\s<>\"'`]+", re.IGNORECASE)


def _trim_url(url: str) -> str:
    """A URL found in text, without the punctuation of the sentence around it."""
    while url and (
        url[-1] in ".,;:!?"
        or (url[-1] == ")" and url.count("(") < url.count(")"))
        or (url[-1] == "]" and url.count("[") < url.count("]"))
    ):
        url = url[:-1]
    return url


class _Anchors(HTMLParser):
    """The href of each <a> in an HTML document, in order (entities resolved)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            for name, value in attrs:
                if name == "href" and value and value.strip():
                    self.hrefs.append(value.strip())
                    return


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
