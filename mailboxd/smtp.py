"""ESMTP server: commands, limits and durable local delivery.

Each command handler checks state and policy first and returns ``(code,
text)`` (or a Deferred of it); `reply` formats it. Multi-line text is sent as
a multi-line reply.
"""

from __future__ import annotations

import datetime
import re
import secrets
from collections.abc import Callable
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.threadpool import ThreadPool

from .accounts import Account, Directory
from .addresses import Address, parse_mailbox
from .auth import Authenticator, AuthResult, Outcome, SASLError, b64decode, decode_plain
from .config import Config
from .faults import Faults
from .faults import apply as apply_fault
from .guard import refusal
from .lines import LineProtocol
from .maildir import IncomingMessage
from .policy import Client, Listener, Verdict, decide, decide_sender
from .popauth import PopAuthRegistry
from .queue import Entry, Recipient, enqueue, queue_dir
from .state import StateError
from .tls import ServerTLS, describe, tls_connection

log = Logger()

Reply = tuple[int, str]

COMMAND_LINE_MAX = 512  # RFC 5321 §4.5.3.1.4, CRLF included
SASL_LINE_MAX = 12288  # RFC 4954 §4
TEXT_LINE_MAX = 1000  # RFC 5321 §4.5.3.1.6, CRLF included

_PATH = re.compile(r"^(FROM|TO):\s*(<[^<>]*>|[^\s<>]+)(?:\s+(.*))?$", re.IGNORECASE)
_SOURCE_ROUTE = re.compile(r"^@[^:]+:")


@attrs.define(repr=False)
class SMTPFactory(ServerFactory):
    config: Config
    directory: Callable[[], Directory]
    clock: IReactorTime
    reactor: Any
    pool: ThreadPool
    auth: Authenticator
    popauth: PopAuthRegistry
    listener: Listener = Listener.MTA
    queued: Callable[[Entry], object] = lambda entry: None  # hands new entries to the queue
    tls: ServerTLS | None = None  # offered as STARTTLS when set
    delivered: Callable[[Delivery], object] | None = None  # told of each accepted message
    faults: Faults | None = None  # test-only fault injection (mailboxd.testing)

    noisy = False  # the connection log lines say more

    def __repr__(self) -> str:
        return f"<SMTPFactory {self.listener.value}>"

    def buildProtocol(self, addr: Any) -> SMTPServer:
        p = SMTPServer()
        p.factory = self
        return p


@attrs.frozen
class Delivery:
    """An accepted message, as told to an observer (mailboxd.testing)."""

    id: str
    sender: str  # "" for <>
    recipients: tuple[str, ...]  # as given at RCPT
    accounts: tuple[str, ...]  # local accounts it was delivered to
    paths: tuple[Path, ...]  # the Maildir files, in `accounts` order
    relayed: tuple[str, ...]  # handed to the outbound queue
    account: str | None  # the authenticated account
    tls: str | None  # "TLSv1.3 TLS_AES_256_GCM_SHA384", or None


@attrs.define
class Transaction:
    sender: str  # '' for the null sender
    recipients: list[Address] = attrs.field(factory=list)
    accounts: dict[str, Account] = attrs.field(factory=dict)  # local deliveries
    relay: dict[str, str] = attrs.field(factory=dict)  # key -> address, for the queue


class SMTPServer(LineProtocol, TimeoutMixin):
    factory: SMTPFactory
    max_line = COMMAND_LINE_MAX
    known_errors = (StateError,)

    def connectionMade(self) -> None:
        cfg = self.factory.config
        self.callLater = self.factory.clock.callLater
        self.tls_pending = tls_connection(self.transport) is not None  # implicit TLS
        self.hostname = cfg.mailbox.hostname
        peer = self.transport.getPeer()
        self.peer_ip = getattr(peer, "host", "unknown")
        self.helo: str | None = None
        self.esmtp = False
        self.tx: Transaction | None = None
        self.message: IncomingMessage | None = None
        self.data_error: Reply | None = None
        self.errors = 0
        self.account: Account | None = None
        self.sasl: Callable[[str], Reply | Deferred] | None = None
        self.setTimeout(cfg.smtp.idle_timeout)
        log.info(
            "smtp connection from {client}",
            client=self.peer_ip,
            listener=self.factory.listener.value,
        )
        try:
            blocked = self.factory.auth.guard.blocked(self.peer_ip)
        except StateError as e:
            log.error("{error}", error=str(e))
            self.close((421, f"4.3.0 {self.hostname} Error: service unavailable, try again later"))
            return
        if blocked:
            log.info("smtp refused blocked {client}", client=self.peer_ip)
            self.close((554, "5.7.1 " + refusal(self.peer_ip)))
            return
        self.reply((220, f"{self.hostname} ESMTP Mailbox"))

    def client(self) -> Client:
        return Client(
            listener=self.factory.listener,
            ip=self.peer_ip,
            account=self.account,
            pop_domains=self.factory.popauth.domains(self.peer_ip),
            trusted_networks=self.factory.config.mailbox.trusted_networks,
        )

    # --- plumbing -----------------------------------------------------------

    def reply(self, reply: Reply) -> None:
        code, text = reply
        lines = text.split("\n")
        for line in lines[:-1]:
            self.sendLine(f"{code}-{line}")
        self.sendLine(f"{code} {lines[-1]}")

    def close(self, reply: Reply) -> None:
        code, text = reply
        lines = text.split("\n")
        for line in lines[:-1]:
            self.sendLine(f"{code}-{line}")
        self.hang_up(f"{code} {lines[-1]}")

    def answer(self, reply: Reply | Deferred | None) -> Deferred | None:
        if isinstance(reply, Deferred):
            return reply.addCallback(self.answer)
        if reply is None or self._closed:
            return None
        code = reply[0]
        if code >= 400 and self.message is None:
            self.errors += 1
            if self.errors >= self.factory.config.smtp.max_errors:
                self.reply(reply)
                log.info("smtp too many errors from {client}", client=self.peer_ip)
                self.close((421, f"4.7.0 {self.hostname} Error: too many errors"))
                return None
        self.reply(reply)
        return None

    def idle(self) -> None:
        log.info("smtp timeout for {client}", client=self.peer_ip)
        self.close((421, f"4.4.2 {self.hostname} Error: timeout exceeded"))

    def internalError(self) -> None:
        if not self._closed:
            self.close((421, f"4.3.0 {self.hostname} Error: internal error, closing"))

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.setTimeout(None)
        if self.message is not None:
            self.message.discard()
            self.message = None
        log.info("smtp disconnect from {client}", client=self.peer_ip)

    def lineTooLong(self) -> Deferred | None:
        self.resetTimeout()
        if self.message is not None:
            self.data_error = self.data_error or (500, "5.5.2 Error: line too long")
            return None
        if self.sasl is not None:
            self.sasl = None
            self.max_line = COMMAND_LINE_MAX
            return self.answer((500, "5.5.6 Authentication exchange line is too long"))
        return self.answer((500, "5.5.2 Error: line too long"))

    def lineReceived(self, line: bytes) -> Deferred | None:
        self.resetTimeout()
        if self.message is not None:
            return self.data_line(line)
        text = line.decode("latin-1")
        if self.sasl is not None:
            step, self.sasl = self.sasl, None
            self.max_line = COMMAND_LINE_MAX
            if text.strip() == "*":
                return self.answer((501, "5.7.0 Authentication aborted"))
            return self.answer(step(text.strip()))
        verb, _, arg = text.partition(" ")
        handler = getattr(self, f"smtp_{verb.upper()}", None) if verb.isalpha() else None
        if handler is None:
            return self.answer((500, "5.5.1 Error: command not recognized"))
        faults = self.factory.faults
        rule = faults.take(f"smtp.{verb.upper()}", arg.strip()) if faults else None
        if rule is not None:
            reply = apply_fault(
                rule, self.transport, self.factory.clock, lambda: handler(arg.strip())
            )
            return self.answer(reply)
        return self.answer(handler(arg.strip()))

    # --- commands -----------------------------------------------------------

    def smtp_EHLO(self, arg: str) -> Reply:
        if not arg:
            return (501, "5.5.4 Syntax: EHLO hostname")
        self.helo, self.esmtp, self.tx = arg, True, None
        return (250, "\n".join(self.extensions()))

    def extensions(self) -> list[str]:
        return (
            [
                f"{self.hostname} Hello {arg_safe(self.helo or '')} [{self.peer_ip}]",
                "PIPELINING",
                f"SIZE {self.factory.config.smtp.max_message_size}",
                "8BITMIME",
                "ENHANCEDSTATUSCODES",
            ]
            + (["STARTTLS"] if self.factory.tls and not self.secure else [])
            + (
                # AUTH= too: Outlook Express and other old clients look only for that form.
                ["AUTH PLAIN LOGIN", "AUTH=PLAIN LOGIN"] if self.auth_allowed else []
            )
        )

    @property
    def secure(self) -> bool:
        return tls_connection(self.transport) is not None

    @property
    def auth_allowed(self) -> bool:
        return self.secure or not self.factory.config.smtp.require_tls_for_auth

    def smtp_HELO(self, arg: str) -> Reply:
        if not arg:
            return (501, "5.5.4 Syntax: HELO hostname")
        self.helo, self.esmtp, self.tx = arg, False, None
        return (250, self.hostname)

    def smtp_MAIL(self, arg: str) -> Reply:
        if self.helo is None:
            return (503, "5.5.1 Error: send HELO/EHLO first")
        if self.tx is not None:
            return (503, "5.5.1 Error: nested MAIL command")
        parsed = parse_path(arg, "FROM")
        if parsed is None:
            return (501, "5.5.4 Syntax: MAIL FROM:<address>")
        path, params = parsed
        problem = self.check_mail_params(params)
        if problem:
            return problem
        address = None
        if path != "":
            address = parse_mailbox(path)
            if address is None:
                return (501, f"5.1.7 <{arg_safe(path)}>: Sender address syntax error")
        decision = decide_sender(
            self.client(),
            self.factory.directory(),
            address,
            self.factory.config.relay.sender_must_match_login,
        )
        if decision.verdict is Verdict.REJECT:
            log.info(
                "smtp sender refused {sender} from {client}",
                sender=str(address),
                client=self.peer_ip,
            )
            return (decision.code, decision.text)
        self.tx = Transaction("" if address is None else str(address))
        return (decision.code, decision.text)

    def check_mail_params(self, params: dict[str, str | None]) -> Reply | None:
        limit = self.factory.config.smtp.max_message_size
        for name, value in params.items():
            if name == "SIZE" and self.esmtp:
                if value is None or not value.isdigit():
                    return (501, "5.5.4 Syntax: SIZE=number")
                if int(value) > limit:
                    return (552, "5.3.4 Message size exceeds fixed limit")
            elif name == "BODY" and self.esmtp:
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    return (501, "5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME")
            else:
                return (555, f"5.5.4 Unsupported option: {arg_safe(name)}")
        return None

    def smtp_RCPT(self, arg: str) -> Reply:
        if self.tx is None:
            return (503, "5.5.1 Error: need MAIL command")
        parsed = parse_path(arg, "TO")
        if parsed is None:
            return (501, "5.5.4 Syntax: RCPT TO:<address>")
        path, params = parsed
        if params:
            return (555, f"5.5.4 Unsupported option: {arg_safe(next(iter(params)))}")
        if path.lower() == "postmaster":  # RFC 5321 §4.5.1: always accepted, no domain
            path = f"postmaster@{self.factory.config.mailbox.domains[0]}"
        rcpt = parse_mailbox(path)
        if rcpt is None:
            return (501, f"5.1.3 <{arg_safe(path)}>: Recipient address syntax error")
        if len(self.tx.recipients) >= self.factory.config.smtp.max_recipients:
            return (452, "4.5.3 Error: too many recipients")
        decision = decide(self.client(), self.factory.directory(), rcpt)
        if decision.verdict is Verdict.REJECT:
            log.info(
                "smtp rcpt refused {rcpt} from {client}: {code}",
                rcpt=str(rcpt),
                client=self.peer_ip,
                code=decision.code,
            )
            return (decision.code, decision.text)
        self.tx.recipients.append(rcpt)
        for account in decision.accounts:
            self.tx.accounts.setdefault(account.address, account)
        if decision.verdict is Verdict.RELAY:
            self.tx.relay.setdefault(rcpt.key, str(rcpt))
        for target in decision.forwards:  # forwarding aliases keep the envelope sender
            self.tx.relay.setdefault(target.lower(), target)
        return (decision.code, decision.text)

    def smtp_DATA(self, arg: str) -> Reply:
        if self.tx is None:
            return (503, "5.5.1 Error: need MAIL command")
        if not self.tx.recipients:
            return (503, "5.5.1 Error: need RCPT command")
        if arg:
            return (501, "5.5.4 Syntax: DATA")
        mail_dir = self.factory.config.mailbox.mail_dir
        try:
            self.message = IncomingMessage(mail_dir / ".incoming", self.hostname)
            self.message_id = secrets.token_hex(6).upper()
            self.message.write_line(f"Return-Path: <{self.tx.sender}>".encode())
            self.return_path_size = self.message.size
            for line in self.received_header().split("\n"):
                self.message.write_line(line.encode())
            self.header_size = self.message.wire_size
        except OSError as e:
            log.error("smtp cannot spool a message: {error}", error=str(e))
            if self.message is not None:
                self.message.discard()
                self.message = None
            return (451, "4.3.0 Error: local storage unavailable, try again later")
        self.data_error = None
        self.strict_crlf = True
        self.max_line = TEXT_LINE_MAX
        self.setTimeout(max(600, self.factory.config.smtp.idle_timeout))  # RFC 5321 §4.5.3.2.6
        return (354, "End data with <CR><LF>.<CR><LF>")

    def received_header(self) -> str:
        """RFC 5321 §4.4 trace header; the client's address as a literal."""
        assert self.tx is not None
        ip = self.peer_ip
        literal = f"IPv6:{ip}" if ":" in ip else ip
        # RFC 3848: ESMTPS marks TLS, ESMTPA authentication, ESMTPSA both.
        tls = describe(self.transport)
        proto = "ESMTP" + ("S" if tls else "") + ("A" if self.account else "")
        if not self.esmtp:
            proto = "SMTP" if not tls else "SMTPS"
        rcpt = f"\n\tfor <{self.tx.recipients[0]}>" if len(self.tx.recipients) == 1 else ""
        using = f"\n\t(using {tls})" if tls else ""
        now = format_datetime(_now(self.factory.clock))
        return (
            f"Received: from {arg_safe(self.helo or 'unknown')} ([{literal}]){using}\n"
            f"\tby {self.hostname} (Mailbox) with {proto} id {self.message_id}{rcpt};\n"
            f"\t{now}"
        )

    def data_line(self, line: bytes) -> Deferred | None:
        assert self.message is not None
        if line == b".":
            return self.end_of_data()
        if self.data_error is not None:
            return None
        if b"\r" in line or b"\n" in line:
            # A bare CR or LF never ends the message (SMTP smuggling); refuse it whole.
            self.data_error = (
                550,
                "5.6.0 Error: message contains a bare CR or LF; lines must end in CRLF",
            )
            return None
        if line.startswith(b"."):
            line = line[1:]
        body_size = self.message.wire_size - self.header_size + len(line) + 2
        if body_size > self.factory.config.smtp.max_message_size:
            self.data_error = (552, "5.3.4 Message size exceeds fixed limit")
            return None
        self.message.write_line(line)
        return None

    def end_of_data(self) -> Deferred | None:
        message, tx = self.message, self.tx
        assert message is not None and tx is not None
        self.strict_crlf = False
        self.max_line = COMMAND_LINE_MAX
        self.setTimeout(self.factory.config.smtp.idle_timeout)
        self.tx = None
        if self.data_error is not None:
            message.discard()
            self.message = None
            log.info(
                "smtp message refused from {client}: {reason}",
                client=self.peer_ip,
                reason=self.data_error[1],
            )
            return self.answer(self.data_error)
        accounts = tuple(tx.accounts.values())
        mail_dir = self.factory.config.mailbox.mail_dir
        message_id = self.message_id
        relay = entry = None
        if tx.relay:
            now = self.factory.clock.seconds()
            entry = Entry(
                id=message_id,
                sender=tx.sender,
                offset=self.return_path_size,
                received=now,
                recipients=[Recipient(a, next_attempt=now) for a in tx.relay.values()],
                client=self.peer_ip,
                account=self.account.address if self.account else None,
            )

            def relay(path: Path) -> None:
                enqueue(queue_dir(mail_dir), path, entry)

        d = deferToThreadPool(
            self.factory.reactor, self.factory.pool, message.commit, mail_dir, accounts, relay
        )

        def stored(paths: list[Path]) -> Reply:
            log.info(
                "accepted {id} ({size} bytes) from <{sender}>: delivered to {recipients}, "
                "queued for {relayed}",
                id=message_id,
                size=message.size,
                sender=tx.sender,
                recipients=[a.address for a in accounts],
                relayed=list(tx.relay.values()),
                client=self.peer_ip,
            )
            if entry is not None:
                self.factory.queued(entry)
            if self.factory.delivered is not None:
                self.factory.delivered(
                    Delivery(
                        message_id,
                        tx.sender,
                        tuple(str(r) for r in tx.recipients),
                        tuple(a.address for a in accounts),
                        tuple(paths),
                        tuple(tx.relay.values()),
                        self.account.address if self.account else None,
                        describe(self.transport),
                    )
                )
            return (250, f"2.0.0 Ok: queued as {message_id}")

        def failed(f: Any) -> Reply:
            log.error(
                "delivery of {id} failed, not acknowledged: {error}",
                id=message_id,
                error=str(f.value),
            )
            return (451, "4.3.0 Error: could not store the message, try again later")

        self.message = None
        return self.answer(d.addCallbacks(stored, failed))

    def smtp_RSET(self, arg: str) -> Reply:
        self.tx = None
        return (250, "2.0.0 Ok")

    def smtp_NOOP(self, arg: str) -> Reply:
        return (250, "2.0.0 Ok")

    def smtp_VRFY(self, arg: str) -> Reply:
        if not arg:
            return (501, "5.5.4 Syntax: VRFY address")
        return (252, "2.5.2 Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, arg: str) -> Reply:
        return (502, "5.5.1 Error: EXPN not supported")

    def smtp_HELP(self, arg: str) -> Reply:
        return (214, "2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY QUIT")

    def smtp_QUIT(self, arg: str) -> None:
        self.close((221, "2.0.0 Bye"))

    # --- AUTH (RFC 4954): PLAIN (RFC 4616) and LOGIN -------------------------

    def smtp_AUTH(self, arg: str) -> Reply | Deferred:
        if not self.auth_allowed:
            return (538, "5.7.11 Encryption required for requested authentication mechanism")
        if not self.esmtp:
            return (503, "5.5.1 Error: send EHLO first")
        if self.account is not None:
            return (503, "5.5.1 Error: already authenticated")
        if self.tx is not None:
            return (503, "5.5.1 Error: MAIL transaction in progress")
        mechanism, _, initial = arg.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if not mechanism:
            return (501, "5.5.4 Syntax: AUTH mechanism [initial-response]")
        if mechanism == "PLAIN":
            return self.auth_plain(initial) if initial else self.ask(self.auth_plain, "")
        if mechanism == "LOGIN":
            if initial:
                return self.login_username(initial)
            return self.ask(self.login_username, "VXNlcm5hbWU6")  # "Username:"
        return (504, "5.5.4 Unrecognized authentication type")

    def ask(self, step: Callable[[str], Reply | Deferred], challenge: str) -> Reply:
        self.sasl = step
        self.max_line = SASL_LINE_MAX
        return (334, challenge)

    def auth_plain(self, response: str) -> Reply | Deferred:
        try:
            username, password = decode_plain(response)
        except SASLError as e:
            return (501, f"5.5.2 {e}")
        except PermissionError as e:
            result = self.factory.auth.refuse("smtp", self.peer_ip, "?", str(e))
            return self.auth_result(result)
        return self.authenticate(username, password)

    def login_username(self, response: str) -> Reply | Deferred:
        try:
            username = b64decode(response).decode("utf-8", "replace")
        except SASLError as e:
            return (501, f"5.5.2 {e}")

        def password_step(answer: str) -> Reply | Deferred:
            try:
                password = b64decode(answer)
            except SASLError as e:
                return (501, f"5.5.2 {e}")
            return self.authenticate(username, password)

        return self.ask(password_step, "UGFzc3dvcmQ6")  # "Password:"

    def authenticate(self, username: str, password: bytes) -> Deferred:
        d = self.factory.auth.login("smtp", self.peer_ip, username, password)
        return d.addCallback(self.auth_result)

    def auth_result(self, result: AuthResult) -> Reply | None:
        if result.outcome is Outcome.OK:
            self.account = result.account
            return (235, "2.7.0 Authentication successful")
        if result.outcome is Outcome.BUSY:
            return (454, "4.7.0 Temporary authentication failure, try again later")
        if result.outcome is Outcome.BLOCKED:
            self.reply((535, "5.7.8 Authentication credentials invalid"))
            self.close((421, "4.7.1 " + refusal(self.peer_ip)))
            return None
        return (535, "5.7.8 Authentication credentials invalid")

    def smtp_STARTTLS(self, arg: str) -> Reply | None:
        if self.factory.tls is None:
            return (502, "5.5.1 Error: TLS not available")
        if self.secure:
            return (503, "5.5.1 Error: TLS already active")
        if arg:
            return (501, "5.5.4 Syntax: STARTTLS")
        self.reply((220, "2.0.0 Ready to start TLS"))
        # RFC 3207 §4.2: forget everything said in plaintext, including any
        # commands the client (or an attacker) sent behind STARTTLS.
        self.discard_input()
        self.helo, self.esmtp, self.tx, self.account, self.sasl = None, False, None, None, None
        self.tls_pending = True
        self.transport.startTLS(self.factory.tls)
        log.info("smtp STARTTLS from {client}", client=self.peer_ip)
        return None


def parse_path(arg: str, keyword: str) -> tuple[str, dict[str, str | None]] | None:
    """Split ``FROM:<path> PARAM=value ...``; None on a syntax error."""
    m = _PATH.match(arg)
    if m is None or m.group(1).upper() != keyword:
        return None
    path = m.group(2)
    if path.startswith("<"):
        path = path[1:-1]
    # RFC 5321 §4.1.1.3: source routes are accepted and ignored.
    routed, path = path, _SOURCE_ROUTE.sub("", path)
    if routed and not path:
        return None  # a route to nowhere is not the null sender
    params: dict[str, str | None] = {}
    for word in (m.group(3) or "").split():
        name, eq, value = word.partition("=")
        params[name.upper()] = value if eq else None
    return path, params


def arg_safe(text: str) -> str:
    """Client text fit to echo in a reply or a header: printable ASCII only."""
    return "".join(c if 0x20 < ord(c) < 0x7F else "?" for c in text)[:255]


def _now(clock: IReactorTime) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(clock.seconds()).astimezone()
