"""A message filter that asks rspamd (`[filters] rspamd = http://host:11333`)
about each message with its HTTP protocol (`POST /checkv2`, Twisted's own
HTTP client), and acts on the action it answers: `reject` refuses the
message, `soft reject` and `greylist` ask the client to try again later,
`add header` and `rewrite subject` mark it with X-Spam headers. Shipped with
the package; a site may copy it into its plugins folder to adapt it.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from zope.interface import implementer

from mailboxd.filtering import FilterVerdict, IMessageFilter, Incoming, accept, reject, tempfail

MARKED = ("add header", "rewrite subject")


class RspamdError(Exception):
    """rspamd did not give an answer we can act on."""


def verdict_of(answer: dict) -> FilterVerdict:
    """rspamd's /checkv2 answer as a FilterVerdict."""
    action = answer.get("action")
    score, required = answer.get("score"), answer.get("required_score")
    if not isinstance(action, str) or not isinstance(score, (int, float)):
        raise RspamdError(f"no action and score in {str(answer)[:200]!r}")
    if action == "reject":
        return reject(554, "5.7.1 Message refused as spam")
    if action in ("soft reject", "greylist"):
        return tempfail("4.7.1 Try again later")
    spam = action in MARKED
    headers = [
        ("X-Spam", "Yes" if spam else "No"),
        (
            "X-Spam-Score",
            f"{score:.2f} / {required:.2f}"
            if isinstance(required, (int, float))
            else f"{score:.2f}",
        ),
        ("X-Spam-Action", action.replace("\r", " ").replace("\n", " ")[:40]),
    ]
    return accept(*headers)


@implementer(IMessageFilter)
@attrs.frozen
class Rspamd:
    url: str  # http://127.0.0.1:11333
    reactor: Any
    name: str = "rspamd"
    blocking = False  # a class attribute, not a field

    def check(self, incoming: Incoming) -> Deferred:
        headers = Headers(
            {
                b"IP": [incoming.ip.encode("ascii", "replace")],
                b"Helo": [incoming.helo.encode("latin-1", "replace")],
                b"From": [incoming.sender.encode("utf-8", "replace")],
                b"Rcpt": [r.encode("utf-8", "replace") for r in incoming.recipients],
            }
        )
        if incoming.account:
            headers.addRawHeader(b"User", incoming.account.encode("utf-8", "replace"))
        body = FileBodyProducer(BytesIO(incoming.data))
        url = self.url.rstrip("/").encode("ascii") + b"/checkv2"
        d = Agent(self.reactor).request(b"POST", url, headers, body)
        return d.addCallback(self._answered)

    def _answered(self, response: Any) -> Deferred:
        if response.code != 200:
            raise RspamdError(f"HTTP {response.code}")
        return readBody(response).addCallback(lambda body: verdict_of(json.loads(body)))


def make_filters(config: Any, reactor: Any) -> list[Rspamd]:
    url = config.filters.rspamd
    return [Rspamd(url, reactor)] if url else []
