"""Receiving one message after DATA: the spool file, the limits, the bare-LF
check, the trace header, and the commit to every Maildir and the queue.

The SMTP protocol gathers the envelope and hands each line of data here; it
only asks and replies. `250` is sent only once `finish` says every copy is on
disk.
"""

from __future__ import annotations

import datetime
import errno
import random
from collections.abc import Callable
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .accounts import Account
from .addresses import Address
from .clocks import Wall
from .config import Config
from .filtering import FAILED, Filters, FilterVerdict, Incoming
from .inbound import Checked, Checker, claims, from_domain, is_results
from .lines import SMTPReply
from .maildir import IncomingMessage, full_mailboxes
from .printable import arg_safe, shown
from .queue import Entry, Recipient, enqueue, enqueue_bytes, queue_dir
from .signing import Signer
from .workers import Workers

log = Logger()


BARE_CR_OR_LF = (550, "5.6.0 Error: message contains a bare CR or LF; lines must end in CRLF")
NUL = (550, "5.6.0 Error: message contains a NUL byte")
TOO_BIG = (552, "5.3.4 Message size exceeds fixed limit")
NOT_SPOOLED = (451, "4.3.0 Error: local storage unavailable, try again later")
NOT_STORED = (451, "4.3.0 Error: could not store the message, try again later")
NO_SPACE = (452, "4.3.1 Insufficient system storage")  # RFC 5321 §4.2.3, RFC 3463
TOO_MANY_HOPS = (554, "5.4.6 Too many hops")  # RFC 5321 §6.3: a loop, most likely
MAILBOX_FULL = (452, "4.2.2 Mailbox full")  # RFC 3463: the sender keeps the message
# An incoming Authentication-Results field is held until it is whole, to be
# judged unfolded (inbound.claims); one longer than this is removed unjudged.
RESULTS_HELD_MAX = 16 * 1024


def storage_error(error: BaseException, otherwise: SMTPReply) -> SMTPReply:
    """The reply for a failed write: 452 4.3.1 if the disk (or quota) is full."""
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    return NO_SPACE if full else otherwise


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
    """The envelope, as MAIL and RCPT build it."""

    sender: str  # '' for the null sender
    recipients: list[Address] = attrs.field(factory=list)
    accounts: dict[str, Account] = attrs.field(factory=dict)  # local deliveries
    relay: dict[str, str] = attrs.field(factory=dict)  # key -> address, for the queue
    # Local domains whose aliases forward this message off-site: the first
    # with a DKIM key seals it (ARC).
    forwarders: list[str] = attrs.field(factory=list)
    quotas: dict[str, int] = attrs.field(factory=dict)  # account -> bytes, for those with one


@attrs.frozen
class Trace:
    """Who handed the message over: the Received header and the log say so."""

    ip: str
    helo: str
    esmtp: bool
    tls: str | None  # as `tls.describe` gives it
    account: str | None  # the authenticated account


@attrs.frozen(repr=False)
class Intake:
    """What every reception shares: where mail goes and who is told of it."""

    config: Config
    wall: Wall
    workers: Workers
    # Hands each new entry to the outbound queue, with its message (as sent
    # on, after `offset`) if it was held in memory.
    queued: Callable[[Entry, bytes | None], object]
    delivered: Callable[[Delivery], object] | None = None  # told of each accepted message
    signer: Signer | None = None  # DKIM keys for relayed mail
    checker: Checker | None = None  # SPF, DKIM and DMARC of mail from the world
    filters: Filters | None = None  # the site's and the shipped message filters

    def __repr__(self) -> str:
        return "<Intake>"

    def begin(self, tx: Transaction, trace: Trace) -> Reception:
        """A Reception holding the trace headers; nothing is on disk yet."""
        # Random for uniqueness, not secrecy: no getrandom call a message.
        message_id = f"{random.getrandbits(48):012X}"
        header = received_header(self.config.mailbox.hostname, trace, tx, message_id, self.wall())
        spool = self.config.mailbox.mail_dir / ".incoming"
        message = IncomingMessage(spool, self.config.state.node, spill_inline=False)
        message.write_line(f"Return-Path: <{tx.sender}>".encode())
        return_path_size = message.size
        for line in header.split("\n"):
            message.write_line(line.encode())
        return Reception(self, tx, trace, message_id, message, return_path_size)


@attrs.define(eq=False)
class Reception:
    intake: Intake
    tx: Transaction
    trace: Trace
    id: str
    message: IncomingMessage
    return_path_size: int  # where the queue's copy starts: relayed mail has no Return-Path
    header_size: int = attrs.field(init=False)
    error: SMTPReply | None = attrs.field(init=False, default=None)
    in_header: bool = True  # until the empty line that ends the message's header
    hops: int = 0  # Received: fields the message came with
    dropping: bool = False  # inside a header field that is not kept
    # The lines of an Authentication-Results field being read, and their size.
    held: list[bytes] | None = None
    held_size: int = 0

    def __attrs_post_init__(self) -> None:
        self.header_size = self.message.wire_size

    def line(self, line: bytes) -> Deferred | None:
        """One line of data, with the SMTP transparency dot and CRLF removed.
        Returns a Deferred while the spool file is being made: the next line
        must wait for it."""
        if self.error is not None:
            return None
        if b"\r" in line or b"\n" in line:
            # A bare CR or LF never ends the message (SMTP smuggling); refuse it whole.
            self.error = BARE_CR_OR_LF
            return None
        if b"\0" in line:
            # RFC 5321 §4.5.2 allows no NUL, and a next hop that drops it could
            # find an end of data where we saw none (smuggling again).
            self.error = NUL
            return None
        if line.startswith(b"."):
            line = line[1:]
        return self._keep(self._header_line(line) if self.in_header else [line])

    def _keep(self, lines: list[bytes]) -> Deferred | None:
        """Write `lines` to the message; a Deferred while it spills to disk."""
        if not self._write(lines) or not self.message.must_spill:
            return None
        # A spool file is a directory update, which can wait for the disk.
        return self.intake.workers.disk(self.message.spill).addErrback(self._spill_failed)

    def _write(self, lines: list[bytes]) -> bool:
        """Write `lines` within the size limit; False (and the error set) if not."""
        for line in lines:
            body_size = self.message.wire_size - self.header_size + len(line) + 2
            if body_size > self.intake.config.smtp.max_message_size:
                self.error = TOO_BIG
                return False
            try:
                self.message.write_line(line)
            except OSError as e:
                self._not_spooled(e)
                return False
        return True

    def _header_line(self, line: bytes) -> list[bytes]:
        """Count the hops; the lines to keep now. An Authentication-Results
        field is held until it is whole, and not kept if it claims this
        server's name (it came from somebody else), however it is folded."""
        if line[:1] in (b" ", b"\t"):  # a folded field goes on
            if self.held is None:
                return [] if self.dropping else [line]
            self.held_size += len(line) + 2
            if self.held_size > RESULTS_HELD_MAX:
                self.held, self.dropping = None, True
            else:
                self.held.append(line)
            return []
        kept = self._judged()
        self.dropping = False
        if not line:
            self.in_header = False
            return [*kept, line]
        if line[:9].lower() == b"received:":
            self.hops += 1
            if self.hops > self.intake.config.smtp.max_hops:
                self.error = TOO_MANY_HOPS
        if is_results(line):
            self.held, self.held_size = [line], len(line) + 2
            return kept
        return [*kept, line]

    def _judged(self) -> list[bytes]:
        """The held Authentication-Results field's lines, or none if it is not kept."""
        held, self.held = self.held, None
        if held is None or claims(b"\r\n".join(held), self.intake.config.mailbox.hostname):
            return []
        return held

    def _spill_failed(self, f: Any) -> None:
        f.trap(OSError)
        self._not_spooled(f.value)

    def _not_spooled(self, e: BaseException) -> None:
        # Read on to the final dot and say so there (RFC 5321 §4.2.5): the
        # client keeps the message and tries again later.
        log.error("smtp cannot spool {queue_id}: {error}", queue_id=self.id, error=str(e))
        self.error = storage_error(e, NOT_SPOOLED)

    def too_long(self) -> None:
        self.error = self.error or (500, "5.5.2 Error: line too long")

    def discard(self) -> None:
        self.message.discard()

    def finish(
        self, may_sign: frozenset[str] = frozenset(), check: bool = False
    ) -> Deferred | SMTPReply:
        """After the final dot: fires with the reply once every copy is on
        disk. Relayed mail whose From: domain is in `may_sign` is signed
        with that domain's DKIM key first (see signing.py); with `check`,
        the message is checked first (inbound.py), and may be refused."""
        if self.held is not None and self.error is None:  # the data ended in the header
            # At most RESULTS_HELD_MAX more in memory: the commit writes it whole.
            self._write(self._judged())
        if self.error is not None:
            return self._refused(self.error)
        filters = self.intake.filters
        if filters:
            d = self.intake.workers.disk(self._incoming)
            d.addCallback(filters.run)
            return d.addCallback(self._filtered, may_sign, check).addErrback(self._failed)
        return self._store(may_sign, check)

    def _incoming(self) -> Incoming:
        """What the filters see. Blocking (a big message is read from its file)."""
        content = self.message.content(self.return_path_size).replace(b"\n", b"\r\n")
        tx, trace = self.tx, self.trace
        recipients = tuple(str(r) for r in tx.recipients)
        return Incoming(
            trace.ip, trace.helo, trace.account, trace.tls, tx.sender, recipients, content
        )

    def _filtered(
        self, verdict: FilterVerdict, may_sign: frozenset[str], check: bool
    ) -> Deferred | SMTPReply:
        if verdict.action != "accept":
            return self._refused(verdict.reply or FAILED)
        if not verdict.headers:
            return self._store(may_sign, check)
        lines = [f"{name}: {value}".encode("utf-8", "replace") for name, value in verdict.headers]
        d = self.intake.workers.disk(self.message.insert_after_first_line, lines)
        return d.addCallback(lambda _: self._store(may_sign, check))

    def _store(self, may_sign: frozenset[str], check: bool) -> Deferred | SMTPReply:
        """Check, sign, and put every copy on disk (see finish)."""
        intake, tx = self.intake, self.tx
        accounts = tuple(tx.accounts.values())
        mail_dir = intake.config.mailbox.mail_dir
        entry = relay = relay_held = None
        if tx.relay:
            now = intake.wall()
            entry = Entry(
                id=self.id,
                sender=tx.sender,
                offset=self.return_path_size,
                received=now,
                recipients=[Recipient(a, next_attempt=now) for a in tx.relay.values()],
                client=self.trace.ip,
                account=self.trace.account,
            )

            def relay(path: Path) -> None:
                enqueue(queue_dir(mail_dir), path, entry, intake.config.state.node)

            def relay_held(data: bytes) -> None:
                enqueue_bytes(queue_dir(mail_dir), data, entry, intake.config.state.node)

        def commit(_: object = None) -> Deferred:
            if not tx.quotas:
                return intake.workers.disk(
                    self.message.commit, mail_dir, accounts, relay, relay_held
                )
            return intake.workers.disk(self._commit_within_quota, accounts, relay, relay_held)

        signer, checker = intake.signer, intake.checker
        if check and checker is not None:
            d = intake.workers.check(self._check, checker)
            return d.addCallback(self._checked, commit, accounts, entry).addErrback(self._failed)
        if tx.relay and may_sign and signer is not None:
            d = intake.workers.check(self._sign, signer, may_sign).addCallback(commit)
        else:
            d = commit()
        return d.addCallbacks(self._stored, self._failed, callbackArgs=(accounts, entry))

    def _commit_within_quota(
        self, accounts: tuple[Account, ...], relay: Any, relay_held: Any
    ) -> list[Path] | SMTPReply:
        """Commit, unless the message would overflow a mailbox: then nothing
        is delivered, and the sender keeps it (452). Blocking."""
        mail_dir = self.intake.config.mailbox.mail_dir
        if full_mailboxes(mail_dir, accounts, self.tx.quotas, self.message.size):
            self.message.discard()
            return MAILBOX_FULL
        return self.message.commit(mail_dir, accounts, relay, relay_held)

    def _refused(self, reply: SMTPReply) -> SMTPReply:
        self.message.discard()
        log.info(
            "smtp message refused from {client}: {reason}",
            client=self.trace.ip,
            reason=reply[1],
            code=reply[0],
        )
        return reply

    def _check(self, checker: Checker) -> Checked:
        """Check the message and add the Authentication-Results. Blocking."""
        content = self.message.content(self.return_path_size).replace(b"\n", b"\r\n")
        checked = checker(content, self.trace.ip, self.trace.helo, self.tx.sender)
        if checked.refusal is None:
            self.message.insert_after_first_line(checked.lines)
            signer = self.intake.signer
            if self.tx.forwarders and signer is not None and checked.arc != "temperror":
                self._seal(signer)
        return checked

    def _seal(self, signer: Signer) -> None:
        """ARC-seal what an alias forwards off-site, with the results it
        arrived with (now at the top). Blocking."""
        content = self.message.content(self.return_path_size).replace(b"\n", b"\r\n")
        hostname = self.intake.config.mailbox.hostname
        for domain in self.tx.forwarders:
            fields = signer.seal(content, domain, hostname)
            if fields is not None:
                self.message.insert_after_first_line(fields.rstrip(b"\r\n").split(b"\r\n"))
                return

    def _checked(
        self, checked: Checked, commit: Callable[[], Deferred], accounts: Any, entry: Any
    ) -> Deferred | SMTPReply:
        if checked.refusal is not None:
            return self._refused(checked.refusal)
        d = commit()
        return d.addCallbacks(self._stored, self._failed, callbackArgs=(accounts, entry))

    def _sign(self, signer: Signer, may_sign: frozenset[str]) -> None:
        """Add the DKIM signature the message's From: domain may have. Blocking."""
        content = self.message.content(self.return_path_size)
        domain = from_domain(content)
        if domain is None or domain not in may_sign:
            return
        field = signer.sign(content.replace(b"\n", b"\r\n"), domain)
        if field is not None:
            self.message.insert_after_first_line(field.rstrip(b"\r\n").split(b"\r\n"))

    def _stored(
        self, paths: list[Path] | SMTPReply, accounts: tuple[Account, ...], entry: Any
    ) -> SMTPReply:
        if isinstance(paths, tuple):  # not stored: refused in the storage thread
            return self._refused(paths)
        tx = self.tx
        log.info(
            "accepted {queue_id} ({size} bytes) from <{sender}>: delivered to {recipients}, "
            "queued for {relayed}",
            queue_id=self.id,
            size=self.message.size,
            sender=shown(tx.sender),
            recipients=[a.address for a in accounts],
            relayed=[shown(a) for a in tx.relay.values()],
            client=self.trace.ip,
            account=self.trace.account,
            code=250,
        )
        if entry is not None:
            whole = self.message.whole  # what the queue need not read back from disk
            self.intake.queued(entry, None if whole is None else whole[entry.offset :])
        if self.intake.delivered is not None:
            self.intake.delivered(
                Delivery(
                    self.id,
                    tx.sender,
                    tuple(str(r) for r in tx.recipients),
                    tuple(a.address for a in accounts),
                    tuple(paths),
                    tuple(tx.relay.values()),
                    self.trace.account,
                    self.trace.tls,
                )
            )
        return (250, f"2.0.0 Ok: queued as {self.id}")

    def _failed(self, f: Any) -> SMTPReply:
        # Whichever step failed (filters, checks, signing, the commit), the
        # spool file goes: the client keeps the message and tries again.
        self.message.discard()
        log.error(
            "delivery of {queue_id} failed, not acknowledged: {error}",
            queue_id=self.id,
            error=str(f.value),
        )
        return storage_error(f.value, NOT_STORED)


def received_header(
    hostname: str, trace: Trace, tx: Transaction, message_id: str, when: float
) -> str:
    """RFC 5321 §4.4 trace header; the client's address as a literal."""
    ip = trace.ip
    literal = f"IPv6:{ip}" if ":" in ip else ip
    # RFC 3848: ESMTPS marks TLS, ESMTPA authentication, ESMTPSA both.
    proto = "ESMTP" + ("S" if trace.tls else "") + ("A" if trace.account else "")
    if not trace.esmtp:
        proto = "SMTP" if not trace.tls else "SMTPS"
    rcpt = f"\n\tfor <{tx.recipients[0]}>" if len(tx.recipients) == 1 else ""
    using = f"\n\t(using {trace.tls})" if trace.tls else ""
    now = format_datetime(datetime.datetime.fromtimestamp(when).astimezone())
    return (
        f"Received: from {arg_safe(trace.helo or 'unknown')} ([{literal}]){using}\n"
        f"\tby {hostname} (Mailbox) with {proto} id {message_id}{rcpt};\n"
        f"\t{now}"
    )
