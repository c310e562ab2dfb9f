"""The fixture's HTTP API and web page: ``MailServer(http=True)``, and
``python -m mailboxd.testing --http PORT``.

A twisted.web resource on the fixture's own reactor, bound to 127.0.0.1. It
answers in the reactor thread, so it calls the server's reactor-side methods
(`_add_account_now`, ...) and never blocks: a long-polling `wait` is a
Deferred that an arrival (or the timeout) fires. The API is described by
openapi.json beside this file (served at /api/v1/openapi.json); the page is
static/index.html with static/app.js and static/app.css, and no build step.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from .. import __version__

if TYPE_CHECKING:
    from .inprocess import InProcessMailServer, Record

HERE = Path(__file__).resolve().parent
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
# The page: its own files only; nothing inline, nothing from elsewhere.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
# A message's HTML: no script, no request anywhere (remote images only with
# ?images=1); `sandbox` makes it a sandboxed document even when opened alone.
HTML_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data: cid:; sandbox"
HTML_CSP_IMAGES = "default-src 'none'; style-src 'unsafe-inline'; img-src * data: cid:; sandbox"
MAX_WAIT = 300.0  # seconds a `wait` may be asked to last


log = Logger()


class HTTPError(Exception):
    def __init__(self, status: int, error: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.error, self.extra = status, error, extra


def bad(message: str) -> HTTPError:
    return HTTPError(400, "bad_request", message)


def missing(message: str) -> HTTPError:
    return HTTPError(404, "not_found", message)


class _Timeout(Exception):
    pass


def _plain(value: Any) -> Any:
    """A value as JSON: tuples as lists, attrs classes as objects."""
    if attrs.has(type(value)):
        return {k: _plain(v) for k, v in attrs.asdict(value, recurse=False).items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def message_json(record: Record) -> dict[str, Any]:
    """A message as the API gives it (see openapi.json, Message)."""
    m = record.message
    return {
        "id": record.id,
        "outbound": record.outbound,
        "envelope_from": m.envelope_from,
        "recipients": list(m.recipients),
        "account": m.account,
        "authenticated": m.authenticated,
        "tls": m.tls,
        "subject": m.subject,
        "headers": _header_pairs(m.raw),
        "size": len(m.raw),
        "text": m.text,
        "html": m.html,
        "links": m.links,
    }


def _header_pairs(raw: bytes) -> list[list[str]]:
    """The header fields in order, each [name, decoded value]."""
    import email
    import email.policy

    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    pairs = []
    for name, value in parsed.raw_items():
        try:
            decoded = str(parsed.policy.header_fetch_parse(name, value))
        except Exception:  # noqa: BLE001 - a malformed field is shown as it is
            decoded = str(value)
        pairs.append([name, decoded])
    return pairs


def _arg(request: Any, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[-1].decode("utf-8", "replace") if values else None


def _number(request: Any, name: str, default: float, low: float, high: float) -> float:
    text = _arg(request, name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise bad(f"{name}={text!r}: not a number") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise bad(f"{name}={text}: must be from {low} to {high}")
    return value


class MessageQuery:
    """The query of a list or a wait: to, subject, outbound, after, pattern."""

    def __init__(self, server: InProcessMailServer, request: Any) -> None:
        self.mail = server
        self.subject = _arg(request, "subject")
        self.pattern = _arg(request, "pattern")
        outbound = (_arg(request, "outbound") or "false").lower()
        if outbound not in ("true", "false", "any"):
            raise bad(f"outbound={outbound!r}: true, false or any")
        self.outbound = outbound
        after = _arg(request, "after")
        try:
            self.after = int(after) if after is not None else 0
        except ValueError:
            raise bad(f"after={after!r}: not a message id") from None
        to = _arg(request, "to")
        self.to = to.lower() if to is not None else None
        self.mailbox: str | None = None
        if to is not None:
            try:
                self.mailbox = server._local(to).key
            except ValueError as e:
                if outbound == "false":  # as wait_for_message: not local is a mistake
                    raise bad(str(e)) from None
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise bad(f"pattern={self.pattern!r}: {e}") from None

    def matches(self, record: Record) -> bool:
        m = record.message
        if record.id <= self.after:
            return False
        if self.outbound != "any" and record.outbound != (self.outbound == "true"):
            return False
        if self.to is not None:
            if record.outbound and self.to not in [r.lower() for r in m.recipients]:
                return False
            if not record.outbound and (self.mailbox is None or m.account != self.mailbox):
                return False
        if self.subject is not None and not fnmatch.fnmatchcase(m.subject, self.subject):
            return False
        return self.pattern is None or (hasattr(m, "find") and bool(m.find(self.pattern)))

    def select(self) -> list[Record]:
        return [r for r in self.mail._record_list() if self.matches(r)]


def _body(request: Any) -> dict[str, Any]:
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise bad(f"the body is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise bad("the body must be a JSON object")
    return value


def _field(
    body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    if name not in body or body[name] is None:
        if default is ...:
            raise bad(f"{name!r} is required")
        return default
    value = body[name]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise bad(f"{name!r} has the wrong type")
    return value


def _rule_args(body: dict[str, Any]) -> dict[str, Any]:
    """match, reply, drop, delay, times: the keywords of faults.on and world.on."""
    unknown = set(body) - {"point", "stage", "match", "reply", "drop", "delay", "times"}
    if unknown:
        raise bad(f"unknown field(s): {', '.join(sorted(unknown))}")
    reply = body.get("reply")
    if isinstance(reply, list):
        reply = tuple(reply)
    return {
        "match": _field(body, "match", str, None),
        "reply": reply,
        "drop": _field(body, "drop", bool, False),
        "delay": float(_field(body, "delay", (int, float), 0.0)),
        "times": _field(body, "times", int, None),
    }


Handler = Callable[..., Any]


class API(Resource):
    """Every path: the page, its files, and /api/v1/..."""

    isLeaf = True

    def __init__(self, server: InProcessMailServer) -> None:
        super().__init__()
        self.mail = server
        r = r"(\d+)"
        table: list[tuple[str, dict[str, Handler]]] = [
            (r"", {"GET": self.page}),
            (r"(app\.js|app\.css|index\.html)", {"GET": self.static}),
            (r"api/v1", {"GET": self.info}),
            (r"api/v1/openapi\.json", {"GET": self.openapi}),
            (r"api/v1/messages", {"GET": self.list, "POST": self.deliver}),
            (f"api/v1/messages/{r}", {"GET": self.one, "DELETE": self.delete}),
            (f"api/v1/messages/{r}/raw", {"GET": self.raw}),
            (f"api/v1/messages/{r}/html", {"GET": self.html}),
            (f"api/v1/messages/{r}/find", {"GET": self.find}),
            (r"api/v1/wait", {"GET": self.wait}),
            (r"api/v1/accounts", {"GET": self.accounts, "POST": self.add_account}),
            (r"api/v1/accounts/([^/]+)", {"DELETE": self.remove_account}),
            (r"api/v1/advance", {"POST": self.advance}),
            (
                r"api/v1/faults",
                {"GET": self.faults, "POST": self.fault_on, "DELETE": self.faults_clear},
            ),
            (
                r"api/v1/world",
                {"GET": self.world, "POST": self.world_on, "DELETE": self.world_clear},
            ),
            (r"api/v1/reset", {"POST": self.reset}),
        ]
        self.routes = [(re.compile(p), h) for p, h in table]

    # --- plumbing -------------------------------------------------------------------

    def render(self, request: Any) -> Any:
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Cache-Control", b"no-store")
        path = "/".join(s.decode("utf-8", "replace") for s in request.postpath).strip("/")
        method = request.method.decode()
        try:
            for pattern, handlers in self.routes:
                found = pattern.fullmatch(path)
                if found is None:
                    continue
                if method == "HEAD" and "GET" in handlers:
                    method = "GET"
                if method not in handlers:
                    request.setHeader(b"Allow", ", ".join(sorted(handlers)).encode())
                    raise HTTPError(405, "method_not_allowed", f"{method} /{path}: not allowed")
                try:
                    self.mail._running_or_raise()
                except RuntimeError as e:
                    raise HTTPError(503, "unavailable", str(e)) from None
                return handlers[method](request, *found.groups())
            raise missing(f"/{path}: no such resource")
        except HTTPError as e:
            return self.error(request, e)
        except Exception:  # a bug here: said in the log, and as JSON to the caller
            log.failure("HTTP API: {method} /{path} failed", method=method, path=path)
            return self.error(request, HTTPError(500, "internal", f"{method} /{path} failed"))

    def json(self, request: Any, value: Any, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(value, indent=1).encode() + b"\n"

    def error(self, request: Any, e: HTTPError) -> bytes:
        return self.json(request, {"error": e.error, "message": str(e), **e.extra}, e.status)

    def empty(self, request: Any) -> bytes:
        request.setResponseCode(204)
        return b""

    def record(self, ident: str) -> Record:
        for record in self.mail._record_list():
            if record.id == int(ident):
                return record
        raise missing(f"no message {ident}")

    # --- the page -----------------------------------------------------------------------

    def page(self, request: Any) -> bytes:
        return self.static(request, "index.html")

    def static(self, request: Any, name: str) -> bytes:
        request.setHeader(b"Content-Type", STATIC[name].encode())
        request.setHeader(b"Content-Security-Policy", PAGE_CSP.encode())
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        return (HERE / "static" / name).read_bytes()

    def openapi(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return (HERE / "openapi.json").read_bytes()

    def info(self, request: Any) -> bytes:
        s = self.mail
        return self.json(
            request,
            {
                "api": "v1",
                "version": __version__,
                "host": s.host,
                "domains": list(s.domains),
                "smtp_port": s.smtp_port,
                "submission_port": s.submission_port,
                "pop3_port": s.pop3_port,
                "smtps_port": s.smtps_port,
                "pop3s_port": s.pop3s_port,
                "http_port": s.http_port,
            },
        )

    # --- messages -------------------------------------------------------------------------

    def list(self, request: Any) -> bytes:
        found = MessageQuery(self.mail, request).select()
        return self.json(request, {"messages": [message_json(r) for r in found]})

    def one(self, request: Any, ident: str) -> bytes:
        return self.json(request, message_json(self.record(ident)))

    def raw(self, request: Any, ident: str) -> bytes:
        record = self.record(ident)
        request.setHeader(b"Content-Type", b"message/rfc822")
        return record.message.raw

    def html(self, request: Any, ident: str) -> bytes:
        record = self.record(ident)
        html = record.message.html
        if html is None:
            raise missing(f"message {ident} has no HTML part")
        images = _arg(request, "images") in ("1", "true", "yes")
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(
            b"Content-Security-Policy", (HTML_CSP_IMAGES if images else HTML_CSP).encode()
        )
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        return str(html).encode("utf-8")

    def find(self, request: Any, ident: str) -> bytes:
        record = self.record(ident)
        pattern = _arg(request, "pattern")
        if pattern is None:
            raise bad("pattern= is required")
        try:
            found = record.message.find(pattern)
        except re.error as e:
            raise bad(f"pattern={pattern!r}: {e}") from None
        return self.json(request, {"pattern": pattern, "found": _plain(found)})

    def delete(self, request: Any, ident: str) -> bytes:
        self.mail._delete_now(self.record(ident))
        return self.empty(request)

    def deliver(self, request: Any) -> bytes:
        body = _body(request)
        to = _field(body, "to", str)
        raw = _field(body, "raw", str).encode("utf-8")
        sender = _field(body, "sender", str, "")
        try:
            message = self.mail._deliver_now(to, raw, sender)
        except ValueError as e:
            raise bad(str(e)) from None
        record = next(r for r in self.mail._record_list() if r.message is message)
        return self.json(request, message_json(record), 201)

    def wait(self, request: Any) -> Any:
        query = MessageQuery(self.mail, request)
        timeout = _number(request, "timeout", 5.0, 0.0, MAX_WAIT)

        def first() -> Record | None:
            return next(iter(query.select()), None)

        d = self.mail._wait_deferred(first, timeout, _Timeout)
        finished = request.notifyFinish()
        finished.addErrback(lambda _: d.cancel())  # the client went away

        def answer(record: Record) -> None:
            request.write(self.json(request, message_json(record)))
            request.finish()

        def failed(f: Failure) -> None:
            if f.check(CancelledError):
                return
            if f.check(_Timeout):
                e = HTTPError(
                    404,
                    "timeout",
                    f"no matching message within {timeout} s",
                    arrived=len(self.mail._record_list()),
                )
            else:
                e = HTTPError(503, "unavailable", f.getErrorMessage())
            request.write(self.error(request, e))
            request.finish()

        d.addCallbacks(answer, failed)
        return NOT_DONE_YET

    # --- accounts, time, faults, world, reset ---------------------------------------------

    def accounts(self, request: Any) -> bytes:
        return self.json(request, {"accounts": self.mail.accounts()})

    def add_account(self, request: Any) -> bytes:
        body = _body(request)
        address = _field(body, "address", str)
        password = _field(body, "password", str)
        try:
            self.mail._add_account_now(address, password)
        except ValueError as e:
            raise bad(str(e)) from None
        return self.json(request, {"address": address}, 201)

    def remove_account(self, request: Any, address: str) -> bytes:
        from .inprocess import NoSuchAccount

        try:
            self.mail._remove_account_now(address)
        except NoSuchAccount as e:
            raise missing(str(e)) from None
        except ValueError as e:
            raise bad(str(e)) from None
        return self.empty(request)

    def advance(self, request: Any) -> bytes:
        seconds = _field(_body(request), "seconds", (int, float))
        if not math.isfinite(seconds) or seconds < 0:
            raise bad("seconds must be a number, 0 or more")
        self.mail._advance_now(float(seconds))
        return self.json(request, {"offset": self.mail.clock.offset})

    def faults(self, request: Any) -> bytes:
        return self.json(request, {"faults": [_plain(r) for r in list(self.mail.faults.rules)]})

    def fault_on(self, request: Any) -> bytes:
        body = _body(request)
        point = _field(body, "point", str)
        try:
            rule = self.mail.faults.on(point, **_rule_args(body))
        except (ValueError, TypeError) as e:
            raise bad(str(e)) from None
        return self.json(request, _plain(rule), 201)

    def faults_clear(self, request: Any) -> bytes:
        self.mail.faults.clear()
        return self.empty(request)

    def world(self, request: Any) -> bytes:
        return self.json(request, {"world": [_plain(r) for r in list(self.mail.world.rules)]})

    def world_on(self, request: Any) -> bytes:
        world = self.mail.world
        body = _body(request)
        stage = _field(body, "stage", str)
        try:
            rule = world.on(stage, **_rule_args(body))
        except (ValueError, TypeError) as e:
            raise bad(str(e)) from None
        return self.json(request, _plain(rule), 201)

    def world_clear(self, request: Any) -> bytes:
        self.mail.world.clear()
        return self.empty(request)

    def reset(self, request: Any) -> bytes:
        self.mail._reset_now()
        return self.empty(request)


def root(server: InProcessMailServer) -> Resource:
    return API(server)
