"""ESMTP server: commands, limits and the SMTP side of AUTH.

Each command handler checks state and policy first and returns ``(code,
text)`` (or a Deferred of it); `reply` formats it. Multi-line text is sent as
a multi-line reply. What happens to the data after DATA is `reception`'s.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from .accounts import Account, Directory
from .addresses import Address, parse_mailbox
from .auth import Authenticator, AuthResult, LoginOutcome
from .clocks import Wall
from .config import Config
from .connections import ConnectionCount
from .dnsbl import Blocklists, Listing
from .dnsbl import refusal as dnsbl_refusal
from .faults import Faults
from .faults import apply as apply_fault
from .filtering import Filters
from .guard import refusal
from .inbound import Checker
from .limits import SETTING as LIMIT_SETTING
from .limits import RelayLimits, limited_reply, relay_sender
from .lines import LineProtocol, SMTPReply
from .maildir import QUOTA_SETTING, full_mailboxes
from .metrics import Metrics
from .policy import (
    Client,
    Decision,
    Listener,
    Verdict,
    decide,
    decide_sender,
    is_trusted,
    rcpt_needs_pop,
    sender_needs_pop,
    signing_domains,
)
from .popauth import PopAuthRegistry
from .printable import arg_safe, shown
from .queue import Entry
from .reception import (
    MAILBOX_FULL,
    Delivery,
    Intake,
    Reception,
    Trace,
    Transaction,
)
from .sasl import Aborted, Challenge, Credentials, Exchange, Forbidden, Malformed, Unsupported
from .signing import Signer
from .state import StateError
from .tls import ServerTLS, describe, tls_connection
from .workers import Workers

log = Logger()


COMMAND_LINE_MAX = 512  # RFC 5321 §4.5.3.1.4, CRLF included
SASL_LINE_MAX = 12288  # RFC 4954 §4
TEXT_LINE_MAX = 1000  # RFC 5321 §4.5.3.1.6, CRLF included

_PATH = re.compile(r"^(FROM|TO):\s*(<[^<>]*>|[^\s<>]+)(?:\s+(.*))?$", re.IGNORECASE)
_SOURCE_ROUTE = re.compile(r"^@[^:]+:")

__all__ = ["Delivery", "SMTPFactory", "SMTPServer"]


@attrs.define(repr=False)
class SMTPFactory(ServerFactory["SMTPServer"]):
    config: Config
    directory: Callable[[], Directory]
    clock: IReactorTime
    workers: Workers
    auth: Authenticator
    popauth: PopAuthRegistry
    listener: Listener = Listener.MTA
    # Hands new entries to the queue (with the message, if held: see Intake).
    queued: Callable[[Entry, bytes | None], object] = lambda entry, message: None
    tls: ServerTLS | None = None  # offered as STARTTLS when set
    delivered: Callable[[Delivery], object] | None = None  # told of each accepted message
    faults: Faults | None = None  # test-only fault injection (mailboxd.testing)
    connections: ConnectionCount | None = None  # shared by every listener
    wall: Wall = time.time  # for the instants a message carries (Received:, queue entries)
    metrics: Metrics = attrs.field(factory=Metrics)  # one for the process, shared
    signer: Signer | None = None  # DKIM keys for what authorised clients relay
    checker: Checker | None = None  # checks mail from the world on `listen`
    relay_limits: RelayLimits | None = None  # counts what each sender relays
    blocklists: Blocklists | None = None  # [inbound] dnsbl, for clients on `listen`
    filters: Filters | None = None  # asked about each message before 250

    noisy = False  # the connection log lines say more

    def __repr__(self) -> str:
        return f"<SMTPFactory {self.listener.value}>"

    @property
    def intake(self) -> Intake:
        return Intake(
            self.config,
            self.wall,
            self.workers,
            self.queued,
            self.delivered,
            self.signer,
            self.checker,
            self.filters,
        )

    def buildProtocol(self, addr: Any) -> SMTPServer:
        p = SMTPServer()
        p.factory = self
        return p


def _wire(reply: SMTPReply) -> str:
    """A reply as it is sent, without its last CRLF: every line of a
    multi-line reply but the last marked "code-", all in one write."""
    code, text = reply
    *more, last = text.split("\n")
    return "".join(f"{code}-{line}\r\n" for line in more) + f"{code} {last}"


class SMTPServer(LineProtocol):
    factory: SMTPFactory
    max_line = COMMAND_LINE_MAX
    known_errors = (StateError,)
    began = 0.0  # when the session began, on the factory's clock
    accepted = 0  # messages answered 250 after their data

    def connectionMade(self) -> None:
        cfg = self.factory.config
        self.clock = self.factory.clock
        self.tls_pending = tls_connection(self.transport) is not None  # implicit TLS
        self.hostname = cfg.mailbox.hostname
        peer = self.transport.getPeer()
        self.peer_ip = getattr(peer, "host", "unknown")
        self.helo: str | None = None
        self.esmtp = False
        self.tx: Transaction | None = None
        self.reception: Reception | None = None
        self.errors = 0
        self.account: Account | None = None
        self.sasl = Exchange(("PLAIN", "LOGIN"))
        self.setTimeout(cfg.smtp.idle_timeout)
        # One line a session, at its end (as Dovecot does), not one at each
        # end: at a message a connection, a log line is a good part of the
        # cost of a message (two lines fewer: 14% more messages a second).
        self.began = self.factory.clock.seconds()
        self.listing: Listing | None = None
        lists = self.factory.blocklists
        if lists is not None and lists.zones and self.factory.listener is Listener.MTA:
            if not is_trusted(self.peer_ip, cfg.mailbox.trusted_networks):
                self.listing = Listing(lists.listed(self.peer_ip))  # asked now, used at RCPT
        listener = self.factory.listener.value + ("-tls" if self.tls_pending else "")
        self.factory.metrics.connections[listener].inc()
        if not self.count_connection(self.factory.connections):
            log.info("smtp refused {client}: too many connections", client=self.peer_ip, code=421)
            self.close((421, f"4.7.0 Too many connections from {self.peer_ip}"))
            return
        self._wait(
            self.factory.auth.guard.turned_away(self.peer_ip).addCallbacks(self.greet, self.unsure)
        )

    def greet(self, blocked: bool) -> None:
        if self._closed:
            return
        if blocked:
            log.info("smtp refused blocked {client}", client=self.peer_ip, code=554)
            self.close((554, "5.7.1 " + refusal(self.peer_ip)))
            return
        self.reply((220, f"{self.hostname} ESMTP Mailbox"))

    def unsure(self, f: Any) -> None:
        # The store cannot say whether the client is blocked: it is greeted,
        # since mail for local mailboxes needs no store; what does need it
        # (AUTH, POP-before-SMTP, relay limits) gets its temporary error then.
        f.trap(StateError)
        log.error("{error}", error=str(f.value))
        self.greet(False)

    def _failed(self, error: BaseException, failure: Any = None) -> None:
        if isinstance(error, StateError) and not self._closed and self.reception is None:
            log.error("{error}", error=str(error))
            self.answer((451, "4.3.0 Temporary failure of the state store, try again later"))
            return
        super()._failed(error, failure)

    def client(self, needs_pop: Callable[[Client], bool]) -> Deferred:
        """Fires with what the policy needs to know about this client, asked now;
        its POP authorisation is looked up only if `needs_pop` says it matters."""
        client = Client(
            listener=self.factory.listener,
            ip=self.peer_ip,
            account=self.account,
            trusted_networks=self.factory.config.mailbox.trusted_networks,
        )
        if not needs_pop(client):
            return succeed(client)
        d = self.factory.popauth.domains(client.ip)
        return d.addCallback(lambda domains: attrs.evolve(client, pop_domains=domains))

    # --- plumbing -----------------------------------------------------------

    def reply(self, reply: SMTPReply) -> None:
        self.sendLine(_wire(reply))

    def close(self, reply: SMTPReply) -> None:
        self.hang_up(_wire(reply))

    def answer(self, reply: SMTPReply | Deferred | None) -> Deferred | None:
        if isinstance(reply, Deferred):
            return reply.addCallback(self.answer)
        if reply is None or self._closed:
            return None
        code = reply[0]
        if code >= 400 and self.reception is None:
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
        if self.reception is not None:
            self.reception.discard()
            self.reception = None
        log.info(
            "smtp session from {client} on {listener}: {accepted} accepted, {seconds:.1f} s",
            client=self.peer_ip,
            listener=self.factory.listener.value,
            accepted=self.accepted,
            seconds=self.factory.clock.seconds() - self.began,
        )

    def lineTooLong(self) -> Deferred | None:
        self.resetTimeout()
        if self.reception is not None:
            self.reception.too_long()
            return None
        if self.sasl.waiting:
            self.end_sasl()
            return self.answer((500, "5.5.6 Authentication exchange line is too long"))
        return self.answer((500, "5.5.2 Error: line too long"))

    def lineReceived(self, line: bytes) -> Deferred | None:
        self.resetTimeout()
        if self.reception is not None:
            if line == b".":
                return self.end_of_data()
            return self.reception.line(line)
        text = line.decode("latin-1")
        if self.sasl.waiting:
            self.max_line = COMMAND_LINE_MAX
            return self.answer(self.sasl_step(self.sasl.respond(text)))
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

    def smtp_EHLO(self, arg: str) -> SMTPReply:
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

    def smtp_HELO(self, arg: str) -> SMTPReply:
        if not arg:
            return (501, "5.5.4 Syntax: HELO hostname")
        self.helo, self.esmtp, self.tx = arg, False, None
        return (250, self.hostname)

    def smtp_MAIL(self, arg: str) -> SMTPReply | Deferred:
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

        must_match = self.factory.config.relay.sender_must_match_login

        def decided(client: Client) -> SMTPReply:
            decision = decide_sender(client, self.factory.directory(), address, must_match)
            if decision.verdict is Verdict.REJECT:
                log.info(
                    "smtp sender refused {sender} from {client}",
                    sender=shown(str(address)),
                    client=self.peer_ip,
                    code=decision.code,
                )
                return (decision.code, decision.text)
            self.tx = Transaction("" if address is None else str(address))
            return (decision.code, decision.text)

        needs_pop = partial(sender_needs_pop, sender=address, must_match=must_match)
        return self.client(needs_pop).addCallback(decided)

    def check_mail_params(self, params: dict[str, str | None]) -> SMTPReply | None:
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

    def smtp_RCPT(self, arg: str) -> SMTPReply | Deferred:
        reply = self.rcpt(arg)
        if isinstance(reply, Deferred):
            return reply.addCallback(self._rcpt_counted)
        return self._rcpt_counted(reply)

    def _rcpt_counted(self, reply: SMTPReply) -> SMTPReply:
        if reply[0] >= 400:  # those accepted are counted by verdict
            self.factory.metrics.recipients["rejected"].inc()
        return reply

    def rcpt(self, arg: str) -> SMTPReply | Deferred:
        tx = self.tx
        if tx is None:
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
        if len(tx.recipients) >= self.factory.config.smtp.max_recipients:
            return (452, "4.5.3 Error: too many recipients")

        sender = parse_mailbox(tx.sender) if tx.sender else None
        must_match = self.factory.config.relay.sender_must_match_login

        async def decided(client: Client) -> SMTPReply:
            directory = self.factory.directory()
            decision = decide(client, directory, rcpt, sender, must_match)
            if decision.verdict is Verdict.REJECT:
                return self._rcpt_refused(rcpt, (decision.code, decision.text))
            if self.listing is not None and not client.authorised:
                zone = await self.listing.zone()
                if zone is not None and client.pop_domains is None:
                    # For a local recipient its POP authorisation was not asked:
                    # it matters now, since it lets a listed client in.
                    client = await self.client(lambda _: True)
                if zone is not None and not client.authorised:
                    return self._rcpt_refused(rcpt, dnsbl_refusal(self.peer_ip, zone), zone)
            default = self.factory.config.mailbox.quota
            quotas = {
                a.address: q
                for a in decision.accounts
                if (q := directory.setting(a.address, QUOTA_SETTING, default))
            }
            if quotas:
                mail_dir = self.factory.config.mailbox.mail_dir
                full = await self.factory.workers.disk(
                    full_mailboxes, mail_dir, decision.accounts, quotas, 0
                )
                if full:
                    return self._rcpt_refused(rcpt, MAILBOX_FULL)
            limits = self.factory.relay_limits
            prefix = self.factory.config.limits.ipv6_prefix
            counted = relay_sender(client, prefix) if decision.verdict is Verdict.RELAY else None
            if counted is not None and limits is not None:
                limit = self.factory.config.limits.relay_recipients_per_hour
                if client.account is not None:
                    limit = directory.setting(client.account.address, LIMIT_SETTING, limit)
                if not await limits.take(counted, limit):
                    return limited_reply(counted)
            tx.quotas.update(quotas)
            return accept(decision)

        def accept(decision: Decision) -> SMTPReply:
            verdict = "relay" if decision.verdict is Verdict.RELAY else "local"
            self.factory.metrics.recipients[verdict].inc()
            tx.recipients.append(rcpt)
            for account in decision.accounts:
                tx.accounts.setdefault(account.address, account)
            if decision.verdict is Verdict.RELAY:
                tx.relay.setdefault(rcpt.key, str(rcpt))
            for target in decision.forwards:  # forwarding aliases keep the envelope sender
                tx.relay.setdefault(target.lower(), target)
            domain = self.factory.config.canonical_domain(rcpt.domain)
            if decision.forwards and domain is not None and domain not in tx.forwarders:
                tx.forwarders.append(domain)
            return (decision.code, decision.text)

        needs_pop = partial(rcpt_needs_pop, directory=self.factory.directory(), rcpt=rcpt)
        return self.client(needs_pop).addCallback(lambda c: ensureDeferred(decided(c)))

    def _rcpt_refused(self, rcpt: Address, reply: SMTPReply, zone: str | None = None) -> SMTPReply:
        log.info(
            "smtp rcpt refused {rcpt} from {client}: {code}"
            + (" (listed in {zone})" if zone else ""),
            rcpt=shown(str(rcpt)),
            client=self.peer_ip,
            code=reply[0],
            zone=zone,
        )
        return reply

    def smtp_DATA(self, arg: str) -> SMTPReply | Deferred:
        tx = self.tx
        if tx is None:
            return (503, "5.5.1 Error: need MAIL command")
        if not tx.recipients:
            return (503, "5.5.1 Error: need RCPT command")
        if arg:
            return (501, "5.5.4 Syntax: DATA")
        trace = Trace(
            self.peer_ip,
            self.helo or "",
            self.esmtp,
            describe(self.transport),
            self.account.address if self.account else None,
        )

        self.reception = self.factory.intake.begin(tx, trace)
        self.strict_crlf = True
        self.max_line = TEXT_LINE_MAX
        self.setTimeout(max(600, self.factory.config.smtp.idle_timeout))  # RFC 5321 §4.5.3.2.6
        return (354, "End data with <CR><LF>.<CR><LF>")

    def end_of_data(self) -> Deferred | None:
        reception = self.reception
        assert reception is not None
        self.reception = None
        self.tx = None
        self.strict_crlf = False
        self.max_line = COMMAND_LINE_MAX
        self.setTimeout(self.factory.config.smtp.idle_timeout)
        ended = self.factory.clock.seconds()
        result: SMTPReply | Deferred
        signing = reception.tx.relay and self.factory.signer is not None
        checking = self.factory.checker is not None and self.factory.listener is Listener.MTA
        if reception.error is None and (signing or checking):
            result = self._finish(reception)
        else:
            result = reception.finish()
        if isinstance(result, Deferred):
            result.addCallback(self._counted, ended)
        elif result is not None:
            self._counted(result, ended)
        return self.answer(result)

    def _finish(self, reception: Reception) -> Deferred:
        """Finish with what this client's authorisation calls for: DKIM
        signing for the domains it may use, or the checks of mail from the world."""
        config = self.factory.config.mailbox

        def finish(client: Client) -> SMTPReply | Deferred:
            may_sign: frozenset[str] = frozenset()
            if reception.tx.relay and self.factory.signer is not None:
                may_sign = signing_domains(client, config.domains, config.domain_aliases)
            check = self.factory.checker is not None and not client.authorised
            return reception.finish(may_sign, check and client.listener is Listener.MTA)

        def not_finished(f: Any) -> Any:
            reception.discard()
            return f

        needs_pop = lambda c: c.account is None and not c.trusted  # noqa: E731
        return self.client(needs_pop).addCallbacks(finish, not_finished)

    def _counted(self, reply: SMTPReply, ended: float) -> SMTPReply:
        metrics = self.factory.metrics
        if reply[0] == 250:
            self.accepted += 1
            metrics.messages["accepted"].inc()
            metrics.data_seconds.observe(self.factory.clock.seconds() - ended)
        else:
            metrics.messages["rejected"].inc()
        return reply

    def smtp_RSET(self, arg: str) -> SMTPReply:
        self.tx = None
        return (250, "2.0.0 Ok")

    def smtp_NOOP(self, arg: str) -> SMTPReply:
        return (250, "2.0.0 Ok")

    def smtp_VRFY(self, arg: str) -> SMTPReply:
        if not arg:
            return (501, "5.5.4 Syntax: VRFY address")
        return (252, "2.5.2 Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, arg: str) -> SMTPReply:
        return (502, "5.5.1 Error: EXPN not supported")

    def smtp_HELP(self, arg: str) -> SMTPReply:
        return (214, "2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY QUIT")

    def smtp_QUIT(self, arg: str) -> None:
        self.close((221, "2.0.0 Bye"))

    # --- AUTH (RFC 4954); the exchange itself is `sasl`'s ---------------------

    def smtp_AUTH(self, arg: str) -> SMTPReply | Deferred:
        if not self.auth_allowed:
            return (538, "5.7.11 Encryption required for requested authentication mechanism")
        if not self.esmtp:
            return (503, "5.5.1 Error: send EHLO first")
        if self.account is not None:
            return (503, "5.5.1 Error: already authenticated")
        if self.tx is not None:
            return (503, "5.5.1 Error: MAIL transaction in progress")
        mechanism, _, initial = arg.partition(" ")
        if not mechanism:
            return (501, "5.5.4 Syntax: AUTH mechanism [initial-response]")
        return self.sasl_step(self.sasl.start(mechanism, initial.strip() or None))

    def sasl_step(self, step: Any) -> SMTPReply | Deferred:
        if isinstance(step, Challenge):
            self.max_line = SASL_LINE_MAX
            return (334, step.text)
        if isinstance(step, Credentials):
            d = self.factory.auth.login("smtp", self.peer_ip, step.username, step.password)
            return d.addCallback(self.auth_result)
        if isinstance(step, Malformed):
            return (501, f"5.5.2 {step.why}")
        if isinstance(step, Forbidden):
            d = self.factory.auth.refuse("smtp", self.peer_ip, step.username, step.why)
            return d.addCallback(self.auth_result)
        if isinstance(step, Aborted):
            return (501, "5.7.0 Authentication aborted")
        assert isinstance(step, Unsupported)
        return (504, "5.5.4 Unrecognized authentication type")

    def end_sasl(self) -> None:
        self.sasl.cancel()
        self.max_line = COMMAND_LINE_MAX

    def auth_result(self, result: AuthResult) -> SMTPReply | None:
        if result.outcome is LoginOutcome.OK:
            self.account = result.account
            return (235, "2.7.0 Authentication successful")
        if result.outcome is LoginOutcome.BLOCKED:
            self.reply((535, "5.7.8 Authentication credentials invalid"))
            self.close((421, "4.7.1 " + refusal(self.peer_ip)))
            return None
        return (535, "5.7.8 Authentication credentials invalid")

    def smtp_STARTTLS(self, arg: str) -> SMTPReply | None:
        if self.factory.tls is None:
            return (502, "5.5.1 Error: TLS not available")
        if self.secure:
            return (503, "5.5.1 Error: TLS already active")
        if arg:
            return (501, "5.5.4 Syntax: STARTTLS")
        self.reply((220, "2.0.0 Ready to start TLS"))
        self.helo, self.esmtp, self.tx, self.account = None, False, None, None
        self.end_sasl()
        self.start_tls(self.factory.tls)
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
