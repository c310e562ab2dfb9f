"""POP3 server (RFC 1939, RFC 2449 CAPA, RFC 5034 AUTH PLAIN).

No APOP: it needs the plaintext password on the server, and accounts hold
only bcrypt hashes; so the greeting carries no timestamp.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.threadpool import ThreadPool

from .auth import Authenticator, AuthResult, Outcome, SASLError, decode_plain
from .faults import Faults
from .faults import apply as apply_fault
from .guard import refusal
from .lines import LineProtocol
from .maildir import Mailbox, MailboxLocked, dot_stuff, maildir_path, read_message
from .popauth import PopAuthRegistry
from .state import StateError
from .tls import ServerTLS, tls_connection

log = Logger()

Reply = str | bytes  # a one-line reply, or a full multi-line response
LINE_MAX = 255  # RFC 2449 §4: command lines up to 255 octets, CRLF included

CAPABILITIES = ("UIDL", "TOP", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING")
TLS_REQUIRED = "-ERR [AUTH] Authentication needs TLS here: send STLS first"

AUTH_FAILED = "-ERR [AUTH] Authentication failed"


@attrs.define(repr=False)
class POP3Factory(ServerFactory):
    config: Any
    auth: Authenticator
    popauth: PopAuthRegistry
    clock: IReactorTime
    reactor: Any
    pool: ThreadPool
    tls: ServerTLS | None = None  # offered as STLS when set
    faults: Faults | None = None  # test-only fault injection (mailboxd.testing)

    noisy = False  # the connection log lines say more

    def __repr__(self) -> str:
        return "<POP3Factory>"

    def buildProtocol(self, addr: Any) -> POP3Server:
        p = POP3Server()
        p.factory = self
        return p


def plural(count: int) -> str:
    return f"{count} message" if count == 1 else f"{count} messages"


def multiline(first: str, lines: list[str] | list[bytes]) -> bytes:
    body = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\r\n" for x in lines)
    return first.encode() + b"\r\n" + body + b".\r\n"


class POP3Server(LineProtocol, TimeoutMixin):
    factory: POP3Factory
    max_line = LINE_MAX
    known_errors = (StateError,)

    def connectionMade(self) -> None:
        self.callLater = self.factory.clock.callLater
        self.tls_pending = tls_connection(self.transport) is not None  # implicit TLS
        self.peer_ip = getattr(self.transport.getPeer(), "host", "unknown")
        self.username: str | None = None
        self.account: Any = None
        self.mailbox: Mailbox | None = None
        self.sasl: Callable[[str], Any] | None = None
        self.setTimeout(self.factory.config.pop3.idle_timeout)
        log.info("pop3 connection from {client}", client=self.peer_ip)
        try:
            blocked = self.factory.auth.guard.blocked(self.peer_ip)
        except StateError as e:
            log.error("{error}", error=str(e))
            self.close("-ERR [SYS/TEMP] service unavailable, try again later")
            return
        if blocked:
            log.info("pop3 refused blocked {client}", client=self.peer_ip)
            self.close("-ERR [SYS/TEMP] " + refusal(self.peer_ip))
            return
        self.sendLine(f"+OK {self.factory.config.mailbox.hostname} POP3 Mailbox ready")

    # --- plumbing -----------------------------------------------------------

    def answer(self, reply: Reply | Deferred | None) -> Deferred | None:
        if isinstance(reply, Deferred):
            return reply.addCallback(self.answer)
        if reply is None or self._closed:
            return None
        if isinstance(reply, bytes):
            self.transport.write(reply)
        else:
            self.sendLine(reply)
        return None

    def close(self, reply: str) -> None:
        self.hang_up(reply)

    def idle(self) -> None:
        # RFC 1939 §3: autologout closes without entering the UPDATE state.
        log.info("pop3 timeout for {client}", client=self.peer_ip)
        self.close("-ERR autologout timer expired, closing")

    def internalError(self) -> None:
        if not self._closed:
            self.close("-ERR [SYS/TEMP] internal error, closing")

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.setTimeout(None)
        if self.mailbox is not None:
            self.mailbox.close()  # nothing marked deleted is removed
            self.mailbox = None
        if self.account is not None:
            # The end of an authenticated session refreshes POP-before-SMTP.
            try:
                self.factory.popauth.authorise(self.peer_ip, self.account.domain)
            except StateError as e:
                log.error("{error}", error=str(e))
            self.account = None
        log.info("pop3 disconnect from {client}", client=self.peer_ip)

    def lineTooLong(self) -> None:
        self.resetTimeout()
        self.sasl = None
        self.answer("-ERR line too long")

    def lineReceived(self, line: bytes) -> Deferred | None:
        self.resetTimeout()
        text = line.decode("utf-8", "replace")
        if self.sasl is not None:
            step, self.sasl = self.sasl, None
            return self.answer(step(text.strip()))
        verb, _, arg = text.partition(" ")
        handler = getattr(self, f"pop_{verb.upper()}", None) if verb.isalpha() else None
        if handler is None:
            return self.answer("-ERR unknown command")
        faults = self.factory.faults
        rule = faults.take(f"pop3.{verb.upper()}", arg.strip()) if faults else None
        if rule is not None:
            reply = apply_fault(rule, self.transport, self.factory.clock, lambda: handler(arg))
            return self.answer(reply)
        return self.answer(handler(arg))

    def in_transaction(self) -> bool:
        return self.mailbox is not None

    def thread(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return deferToThreadPool(self.factory.reactor, self.factory.pool, f, *args)

    # --- AUTHORIZATION state -------------------------------------------------

    @property
    def secure(self) -> bool:
        return tls_connection(self.transport) is not None

    @property
    def auth_allowed(self) -> bool:
        return self.secure or not self.factory.config.smtp.require_tls_for_auth

    def pop_CAPA(self, arg: str) -> bytes:
        caps = list(CAPABILITIES)
        if self.factory.tls is not None and not self.secure and not self.in_transaction():
            caps.append("STLS")
        if self.auth_allowed and not self.in_transaction():
            caps += ["USER", "SASL PLAIN"]
        return multiline("+OK Capability list follows", caps + ["IMPLEMENTATION Mailbox"])

    def pop_STLS(self, arg: str) -> Reply | None:
        if self.factory.tls is None:
            return "-ERR TLS not available"
        if self.in_transaction():
            return "-ERR STLS is only allowed before login"
        if self.secure:
            return "-ERR TLS already active"
        self.sendLine("+OK Begin TLS negotiation")
        # RFC 2595 §4 and the STARTTLS injection attacks: forget what was said in
        # plaintext, including anything pipelined behind STLS.
        self.discard_input()
        self.username, self.sasl = None, None
        self.tls_pending = True
        self.transport.startTLS(self.factory.tls)
        log.info("pop3 STLS from {client}", client=self.peer_ip)
        return None

    def pop_USER(self, arg: str) -> Reply:
        if self.in_transaction():
            return "-ERR already authenticated"
        if not self.auth_allowed:
            return TLS_REQUIRED
        if not arg.strip():
            return "-ERR USER needs a user name (your full mail address)"
        self.username = arg.strip()
        return "+OK send your password"

    def pop_PASS(self, arg: str) -> Reply | Deferred:
        if self.in_transaction():
            return "-ERR already authenticated"
        if not self.auth_allowed:
            return TLS_REQUIRED
        if self.username is None:
            return "-ERR send USER first"
        if not arg:
            return "-ERR PASS needs a password"
        username, self.username = self.username, None
        return self.authenticate(username, arg.encode("utf-8"))

    def pop_APOP(self, arg: str) -> Reply:
        return "-ERR APOP is not supported; use USER/PASS or AUTH PLAIN"

    def pop_AUTH(self, arg: str) -> Reply | Deferred:
        if self.in_transaction():
            return "-ERR already authenticated"
        if not self.auth_allowed:
            return TLS_REQUIRED
        mechanism, _, initial = arg.strip().partition(" ")
        if not mechanism:
            return multiline("+OK SASL mechanisms follow", ["PLAIN"])
        if mechanism.upper() != "PLAIN":
            return "-ERR unsupported SASL mechanism; use PLAIN"
        if initial:
            return self.auth_plain(initial.strip())
        self.sasl = self.auth_plain
        return "+ "

    def auth_plain(self, response: str) -> Reply | Deferred:
        if response == "*":
            return "-ERR authentication cancelled"
        try:
            username, password = decode_plain(response)
        except SASLError as e:
            return f"-ERR {e}"
        except PermissionError as e:
            return self.auth_result(self.factory.auth.refuse("pop3", self.peer_ip, "?", str(e)))
        return self.authenticate(username, password)

    def authenticate(self, username: str, password: bytes) -> Deferred:
        d = self.factory.auth.login("pop3", self.peer_ip, username, password)
        return d.addCallback(self.auth_result)

    def auth_result(self, result: AuthResult) -> Reply | Deferred | None:
        if result.outcome is Outcome.BUSY:
            return "-ERR [SYS/TEMP] too many logins in progress from your address, try again later"
        if result.outcome is Outcome.BLOCKED:
            self.close("-ERR [AUTH] Authentication failed. " + refusal(self.peer_ip))
            return None
        if result.outcome is Outcome.FAILED:
            return AUTH_FAILED
        account = result.account
        self.account = account
        self.factory.popauth.authorise(self.peer_ip, account.domain)
        path = maildir_path(self.factory.config.mailbox.mail_dir, account)

        def opened(mailbox: Mailbox) -> Reply | None:
            if self._closed:
                mailbox.close()
                return None
            self.mailbox = mailbox
            live = mailbox.live()
            log.info(
                "pop3 {user} opened {count} messages",
                user=account.address,
                count=len(live),
            )
            return f"+OK {plural(len(live))} ({sum(m.size for _, m in live)} octets)"

        def not_opened(f: Any) -> Reply:
            self.account = None
            if f.check(MailboxLocked):
                log.info("pop3 mailbox in use for {user}", user=account.address)
                return "-ERR [IN-USE] Mailbox is locked by another session"
            log.failure("pop3 cannot open mailbox for {user}", f, user=account.address)
            return "-ERR [SYS/TEMP] mailbox unavailable, try again later"

        return self.thread(Mailbox.open, path).addCallbacks(opened, not_opened)

    # --- TRANSACTION state ---------------------------------------------------

    def _message_arg(self, arg: str) -> tuple[int, Any] | str:
        if self.mailbox is None:
            return "-ERR not authenticated"
        try:
            number = int(arg.split()[0])
        except (ValueError, IndexError):
            return "-ERR expected a message number"
        message = self.mailbox.get(number)
        if message is None:
            return "-ERR no such message"
        return number, message

    def pop_STAT(self, arg: str) -> Reply:
        if self.mailbox is None:
            return "-ERR not authenticated"
        live = self.mailbox.live()
        return f"+OK {len(live)} {sum(m.size for _, m in live)}"

    def pop_LIST(self, arg: str) -> Reply:
        return self._listing(arg, lambda n, m: f"{n} {m.size}")

    def pop_UIDL(self, arg: str) -> Reply:
        return self._listing(arg, lambda n, m: f"{n} {m.uid}")

    def _listing(self, arg: str, entry: Callable[[int, Any], str]) -> Reply:
        if self.mailbox is None:
            return "-ERR not authenticated"
        if arg.strip():
            found = self._message_arg(arg)
            return found if isinstance(found, str) else "+OK " + entry(*found)
        live = self.mailbox.live()
        return multiline(f"+OK {plural(len(live))}", [entry(n, m) for n, m in live])

    def pop_RETR(self, arg: str) -> Reply | Deferred:
        found = self._message_arg(arg)
        if isinstance(found, str):
            return found
        return self._send(found[1], None, "RETR")

    def pop_TOP(self, arg: str) -> Reply | Deferred:
        words = arg.split()
        if len(words) != 2 or not words[1].isdigit():
            return "-ERR usage: TOP message lines"
        found = self._message_arg(words[0])
        if isinstance(found, str):
            return found
        return self._send(found[1], int(words[1]), "TOP")

    def _send(self, message: Any, lines: int | None, command: str) -> Deferred:
        def build() -> bytes:
            data = read_message(message, lines)
            return (
                b"+OK " + str(message.size).encode() + b" octets\r\n" + dot_stuff(data) + b".\r\n"
            )

        def sent(response: bytes) -> bytes:
            log.info(
                "pop3 {command} {uid} by {user}",
                command=command,
                uid=message.uid,
                user=self.account.address,
            )
            return response

        def missing(f: Any) -> Reply:
            f.trap(OSError)
            log.warn("pop3 cannot read {path}: {error}", path=str(message.path), error=str(f.value))
            return "-ERR [SYS/TEMP] message no longer available"

        return self.thread(build).addCallbacks(sent, missing)

    def pop_DELE(self, arg: str) -> Reply:
        found = self._message_arg(arg)
        if isinstance(found, str):
            return found
        found[1].deleted = True
        return f"+OK message {found[0]} marked for deletion at QUIT"

    def pop_RSET(self, arg: str) -> Reply:
        if self.mailbox is None:
            return "-ERR not authenticated"
        self.mailbox.undelete_all()
        return f"+OK {plural(len(self.mailbox.live()))}"

    def pop_NOOP(self, arg: str) -> Reply:
        return "+OK" if self.mailbox is not None else "-ERR not authenticated"

    def pop_QUIT(self, arg: str) -> Deferred | None:
        mailbox = self.mailbox
        if mailbox is None:
            self.close(f"+OK {self.factory.config.mailbox.hostname} POP3 Mailbox signing off")
            return None

        def done(removed: int) -> None:
            log.info(
                "pop3 {user} deleted {count} messages", user=self.account.address, count=removed
            )
            mailbox.close()
            self.mailbox = None
            self.close(f"+OK {plural(removed)} deleted, signing off")

        def failed(f: Any) -> None:
            log.failure("pop3 deletion failed for {user}", f, user=self.account.address)
            mailbox.close()
            self.mailbox = None
            self.close("-ERR [SYS/TEMP] some deleted messages were not removed")

        return self.thread(mailbox.commit).addCallbacks(done, failed)
