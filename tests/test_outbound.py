"""The outbound queue runner against scripted SMTP servers, all in memory.

`Net.connect` stands in for the TCP endpoint: it builds the sender's protocol
and joins it to a `FakeSMTP` server with twisted.test.iosim transports; bytes
move only when a test pumps. Like a real endpoint, it never calls the
factory's clientConnectionLost. DNS is a `FakeResolver`, time a task.Clock,
the thread pool a SyncPool.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from conftest import unit_config
from test_routes import FakeResolver
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.logger import globalLogPublisher
from twisted.names import error as dns_error
from twisted.protocols.basic import LineReceiver
from twisted.test import iosim

from mailboxd import outbound, queue
from mailboxd.outbound import (
    BAD_HOST_SECONDS,
    REUSE_SECONDS,
    Outbound,
    backoff,
)
from mailboxd.queue import Entry, Recipient
from mailboxd.routes import Hop

HANG = "<hang>"  # the server says nothing
CLOSE = "<close>"  # the server drops the connection

DEFAULT = {
    "greeting": "220 mx.far.test ESMTP ready",
    "ehlo": "250-mx.far.test hello\r\n250-PIPELINING\r\n250 8BITMIME",
    "helo": "250 mx.far.test",
    "mail": "250 2.1.0 sender ok",
    "rcpt": "250 2.1.5 recipient ok",
    "data": "354 end with <CRLF>.<CRLF>",
    "eod": "250 2.0.0 queued as 123",
    "rset": "250 2.0.0 reset",
    "starttls": "220 2.0.0 ready to start TLS",
    "auth": "235 2.7.0 Authentication successful",
    "quit": "221 2.0.0 bye",
}


# --- the fake network ---------------------------------------------------------


class Session:
    """What one server connection received."""

    def __init__(self, hop: Hop) -> None:
        self.hop = hop
        self.commands: list[bytes] = []
        self.helo: bytes | None = None
        self.sender: bytes | None = None
        self.recipients: list[bytes] = []  # every RCPT TO
        self.accepted: list[bytes] = []  # the ones answered 2xx
        self.data: bytes | None = None  # the wire bytes before the final ".\r\n"
        self.accepted_data = False  # answered 2xx at the end of the data
        self.messages = 0  # answered 2xx at the end of the data, over the session
        self.batches: list[list[bytes]] = []  # the commands, as they arrived together
        self.open = True
        self.tls = False  # STARTTLS was answered 220
        self.auth: list[bytes] = []  # every AUTH command

    @property
    def delivered(self) -> bool:
        return self.accepted_data


class FakeSMTP(LineReceiver):
    """An SMTP server that answers from a script: stage -> reply, HANG or CLOSE.
    "rcpt" may also be a dict: address -> reply (default for the others)."""

    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, script: dict, session: Session, net: Net) -> None:
        self.script = script
        self.session = session
        self.net = net
        self.buffer = b""
        # This transaction's state, as a real server keeps it: RCPT needs an
        # accepted MAIL, DATA an accepted RCPT.
        self.mail_ok = False
        self.rcpt_ok = 0

    def answer(self, stage: str, key: str | None = None) -> str:
        reply = self.script.get(stage, DEFAULT[stage])
        if isinstance(reply, dict):
            reply = reply.get(key, DEFAULT[stage])
        if reply == CLOSE:
            self.transport.loseConnection()
        elif reply != HANG:
            self.transport.write(reply.encode() + b"\r\n")
        return reply

    def connectionMade(self) -> None:
        self.answer("greeting")

    def connectionLost(self, reason=None) -> None:
        self.session.open = False
        self.net.open -= 1

    def dataReceived(self, data: bytes) -> None:
        self.session.batches.append([])
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        s = self.session
        s.commands.append(line)
        if s.batches:
            s.batches[-1].append(line.split(b":")[0].split(b" ")[0].upper())
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"EHLO":
            s.helo = line[5:]
            self.answer("ehlo")
        elif verb == b"HELO":
            s.helo = line[5:]
            self.answer("helo")
        elif line.upper().startswith(b"MAIL FROM:"):
            if s.sender is not None and self.script.get("drop_second_mail"):
                self.transport.loseConnection()  # its idle limit, just as we came back
                return
            s.sender = line[10:].split(b" ")[0].strip(b"<>")
            self.mail_ok = self.answer("mail").startswith("2")
            self.rcpt_ok = 0
        elif line.upper().startswith(b"RCPT TO:") and not self.mail_ok:
            self.transport.write(b"503 5.5.1 Error: need MAIL command\r\n")
        elif line.upper().startswith(b"RCPT TO:"):
            address = line[8:].split(b" ")[0].strip(b"<>")
            s.recipients.append(address)
            if self.answer("rcpt", address.decode()).startswith("2"):
                s.accepted.append(address)
                self.rcpt_ok += 1
        elif verb == b"DATA" and not self.rcpt_ok and not self.script.get("always_354"):
            self.transport.write(b"554 5.5.1 Error: no valid recipients\r\n")
        elif verb == b"DATA":
            if self.answer("data").startswith("354"):
                self.setRawMode()
        elif verb == b"RSET":
            self.mail_ok, self.rcpt_ok = False, 0
            self.answer("rset")
        elif verb == b"STARTTLS":
            if self.answer("starttls").startswith("220"):
                self.transport.startTLS(FakeTLS())
                s.tls = True
        elif verb == b"AUTH":
            s.auth.append(line)
            self.answer("auth")
        elif verb == b"QUIT":
            self.answer("quit")
            self.transport.loseConnection()
        else:
            self.transport.write(b"500 5.5.2 what?\r\n")

    def rawDataReceived(self, data: bytes) -> None:
        if self.script.get("drop_in_data"):
            self.transport.loseConnection()
            return
        self.buffer += data
        if self.buffer == b".\r\n" or self.buffer.endswith(b"\r\n.\r\n"):
            self.session.data, self.buffer = self.buffer[:-3], b""
            self.mail_ok, self.rcpt_ok = False, 0
            self.setLineMode()
            self.session.accepted_data = self.answer("eod").startswith("2")
            self.session.messages += self.session.accepted_data
            if self.script.get("quit_after_eod"):
                self.transport.loseConnection()


class FakeTLS:
    """A TLS context for iosim's pretend handshake (FakeTransport.startTLS)."""

    def iosimVerify(self, other: object) -> bool:
        return isinstance(other, FakeTLS)


class Transport(iosim.FakeTransport):
    def reportDisconnect(self) -> None:
        # As a real transport does: stop the producer (the message being sent)
        # before telling the protocol.
        if self.producer is not None:
            producer, self.producer = self.producer, None
            producer.stopProducing()
        super().reportDisconnect()


class Pump(iosim.IOPump):
    def pump(self, debug=False, advanceClock=True):
        # A server's hang-up reaches the client before any more of its data
        # goes out (iosim would first drain a producing client).
        if self.serverIO.disconnecting and not self.serverIO.disconnected:
            data = self.serverIO.getOutBuffer()
            if data:
                self.clientIO.bufferReceived(data)
            self.serverIO.disconnected = True
            self.serverIO.reportDisconnect()  # the side that hung up is closed first
            self.clientIO.disconnecting = True
            self.clientIO.reportDisconnect()
            return True
        return super().pump(debug, advanceClock)


class Host:
    """A mail server: one script per connection (the last one repeats)."""

    def __init__(self, scripts: list[dict]) -> None:
        self.scripts = scripts or [{}]
        self.sessions: list[Session] = []

    def next_script(self) -> dict:
        return self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]

    @property
    def delivered(self) -> list[Session]:
        return [s for s in self.sessions if s.delivered]

    @property
    def messages(self) -> int:
        """Messages accepted, over every session."""
        return sum(s.messages for s in self.sessions)


class Net:
    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}
        self.attempts: list[Hop] = []
        self.pumps: list[iosim.IOPump] = []
        self.open = 0
        self.most_open = 0

    def add(self, name: str, *scripts: dict) -> Host:
        self.hosts[name] = Host(list(scripts))
        return self.hosts[name]

    def connect(self, hop: Hop, factory) -> defer.Deferred:
        self.attempts.append(hop)
        host = self.hosts.get(hop.host)
        if host is None:
            return defer.fail(ConnectionRefusedError(f"{hop.host}:{hop.port}"))
        try:  # as the endpoint's wrapping factory does
            client = factory.buildProtocol(IPv4Address("TCP", "192.0.2.25", hop.port))
        except Exception:
            return defer.fail()
        session = Session(hop)
        host.sessions.append(session)
        server = FakeSMTP(host.next_script(), session, self)
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        server_io = Transport(server, isServer=True)
        client_io = Transport(client, isServer=False)
        server.makeConnection(server_io)
        client.makeConnection(client_io)
        pump = Pump(client, server, client_io, server_io, debug=False)
        self.pumps.append(pump)
        return defer.succeed(client)

    def pump(self) -> None:
        """Move bytes until every connection is quiet (new ones included)."""
        moved = True
        while moved:
            moved = False
            for p in list(self.pumps):
                if p.flush():
                    moved = True
                if p.serverIO.disconnected and p.clientIO.disconnected:
                    self.pumps.remove(p)

    @property
    def sessions(self) -> list[Session]:
        return [s for h in self.hosts.values() for s in h.sessions]


# --- the runner under test ----------------------------------------------------

SMARTHOST = "[relay]\nsmarthost = 127.0.0.1:2525\n"
RETURN_PATH = b"Return-Path: <alice@example.test>\n"
MESSAGE = b"From: alice@example.test\nTo: someone\nSubject: hello\n\nHi there.\n"


class Runner:
    def __init__(self, unit, tmp_path: Path, extra: str, dns: dict, events: list) -> None:
        self.unit = unit
        self.config = unit_config(tmp_path, extra)
        self.dir = queue.queue_dir(self.config.mailbox.mail_dir)
        self.clock = unit.clock
        self.net = Net()
        self.resolver = FakeResolver(dns)
        self.events = events
        self.wall_step = 0.0  # how far the wall clock has been stepped
        self.outbound = Outbound(
            self.config,
            self.dir,
            unit.clock,
            unit.reactor,
            unit.pool,
            accounts=lambda: unit.store.directory,
            resolver=self.resolver,
            mx_port=25,
            connect=self.net.connect,
            wall=lambda: unit.clock.seconds() + self.wall_step,
        )
        self.outbound._client_tls = FakeTLS()  # iosim's pretend TLS, for STARTTLS

    def enqueue(
        self,
        entry_id: str,
        recipients: list[str],
        sender: str = "alice@example.test",
        message: bytes = MESSAGE,
        received: float | None = None,
    ) -> Entry:
        return_path = f"Return-Path: <{sender}>\n".encode()
        entry = Entry(
            entry_id,
            sender,
            len(return_path),
            self.clock.seconds() if received is None else received,
            [Recipient(r) for r in recipients],
            client="192.0.2.7",
        )
        queue.enqueue_bytes(self.dir, return_path + message, entry)
        return entry

    def start(self) -> None:
        self.outbound.start()
        self.net.pump()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.net.pump()

    def wake(self) -> None:
        self.outbound.wake()
        self.advance(0)

    def envelope(self, entry_id: str) -> dict:
        return json.loads((self.dir / f"{entry_id}.json").read_text())

    def recipient(self, entry_id: str, address: str) -> dict:
        (r,) = [r for r in self.envelope(entry_id)["recipients"] if r["address"] == address]
        return r

    def exists(self, entry_id: str) -> bool:
        return (self.dir / f"{entry_id}.json").exists() or (self.dir / f"{entry_id}.msg").exists()

    def queued(self) -> list[str]:
        return [p.stem for p in queue.entry_paths(self.dir)]

    def inbox(self, address: str) -> list[bytes]:
        local, domain = address.split("@")
        new = self.config.mailbox.mail_dir / domain / local / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []

    def logged(self, text: str) -> bool:
        from twisted.logger import formatEvent

        return any(text in formatEvent(e) for e in self.events)

    def failures(self) -> list:
        return [e for e in self.events if "log_failure" in e]


@pytest.fixture
def events():
    seen: list = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


@pytest.fixture
def make(unit, tmp_path, events):
    made: list[Runner] = []

    def make(extra: str = "", dns: dict | None = None) -> Runner:
        runner = Runner(unit, tmp_path, extra, dns or {}, events)
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.outbound.stop()
        assert not runner.failures(), [e.get("log_failure") for e in runner.failures()]


def stuffed(message: bytes) -> bytes:
    """`message` (LF line ends) as it must be on the wire before the final dot."""
    lines = message.split(b"\n")
    assert lines[-1] == b""
    return b"".join(
        (b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines[:-1]
    )


# --- delivery via the smarthost ------------------------------------------------


def test_smarthost_delivery_is_byte_exact(make):
    r = make(SMARTHOST)
    smarthost = r.net.add("127.0.0.1")
    # A line starting with "." right at the 16 KiB chunk boundary of the sender.
    head = b"From: alice@example.test\nTo: x@far.test\nSubject: dots\n\n.first body line\n"
    filler_len = 16384 - len(head) - 1
    filler = b"".join(b"%-63d\n" % i for i in range(filler_len // 64))
    filler += b"y" * (filler_len - len(filler))
    message = head + filler + b"\n" + b".at the boundary\n..two\n.\nlast line\n"
    assert message[16383:16385] == b"\n."
    r.enqueue("E1", ["x@far.test", "y@else.test", "z@far.test"], message=message)
    r.start()

    (s,) = smarthost.sessions
    assert s.hop == Hop("127.0.0.1", 2525)
    assert s.helo == b"mail.example.test"
    assert s.sender == b"alice@example.test"
    assert s.recipients == [b"x@far.test", b"y@else.test", b"z@far.test"]
    assert s.data == stuffed(message)
    assert b"\r\n..at the boundary\r\n" in s.data
    assert b"Return-Path" not in s.data
    assert r.net.attempts == [Hop("127.0.0.1", 2525)]
    assert r.resolver.queries == []  # a smarthost needs no MX lookup
    assert not r.exists("E1") and r.outbound.entries == {}
    # The connection waits for another message, then says QUIT.
    assert s.commands[-1] == b"DATA" and s.open  # no RSET: the data's reply ended it
    r.advance(REUSE_SECONDS)
    assert s.commands[-1] == b"QUIT" and not s.open
    assert r.clock.getDelayedCalls() == [r.outbound._loop.call]  # no timeout left behind


def test_smarthost_message_without_a_final_line_end(make):
    r = make(SMARTHOST)
    smarthost = r.net.add("127.0.0.1")
    r.enqueue("E1", ["x@far.test"], message=b"Subject: x\n\n.no newline at the end")
    r.start()
    (s,) = smarthost.sessions
    assert s.data == b"Subject: x\r\n\r\n..no newline at the end\r\n"


def test_one_transaction_per_domain_through_mx(make):
    r = make(dns={"far.test": [(10, "mx.far.test")], "else.test": [(10, "mx.else.test")]})
    far = r.net.add("mx.far.test")
    other = r.net.add("mx.else.test")
    r.enqueue("E1", ["a@far.test", "b@else.test", "c@FAR.test"])
    r.start()
    (f,) = far.sessions
    assert f.recipients == [b"a@far.test", b"c@FAR.test"]
    assert f.data == stuffed(MESSAGE)
    (o,) = other.sessions
    assert o.recipients == [b"b@else.test"]
    assert sorted(r.resolver.queries) == ["else.test", "far.test"]
    assert not r.exists("E1")


# --- routes ---------------------------------------------------------------------


def test_mx_preference_order(make):
    r = make(dns={"far.test": [(30, "mx3.far.test"), (10, "mx1.far.test"), (20, "mx2.far.test")]})
    for name in ("mx1.far.test", "mx2.far.test", "mx3.far.test"):
        r.net.add(name)
    r.enqueue("E1", ["a@far.test"])
    r.start()
    assert r.net.attempts == [Hop("mx1.far.test", 25)]
    assert len(r.net.hosts["mx1.far.test"].delivered) == 1


def test_no_mx_goes_to_the_domain_itself(make):
    r = make(dns={"far.test": []})
    host = r.net.add("far.test")
    r.enqueue("E1", ["a@far.test"])
    r.start()
    assert r.net.attempts == [Hop("far.test", 25)]
    assert len(host.delivered) == 1


def bounce_of(r: Runner, address: str = "alice@example.test") -> bytes:
    (dsn,) = r.inbox(address)
    assert dsn.startswith(b"Return-Path: <>\n")
    assert b"Content-Type: multipart/report; report-type=delivery-status;" in dsn
    return dsn


def test_null_mx_fails_permanently_and_bounces(make):
    r = make(dns={"far.test": [(0, b".")]})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    assert r.net.attempts == []
    assert not r.exists("E1")
    dsn = bounce_of(r)
    assert b"Final-Recipient: rfc822; a@far.test" in dsn
    assert b"Status: 5.1.10" in dsn
    assert b"null MX" in dsn


def test_nxdomain_fails_permanently(make):
    r = make(dns={})  # every domain is NXDOMAIN
    r.enqueue("E1", ["a@nowhere.test"])
    r.start()
    assert r.net.attempts == []
    dsn = bounce_of(r)
    assert b"Status: 5.1.2" in dsn and b"NXDOMAIN" in dsn
    assert not r.exists("E1")


@pytest.mark.parametrize(
    "error",
    [dns_error.DNSServerError("far.test"), dns_error.DNSQueryTimeoutError(1), defer.TimeoutError()],
    ids=["SERVFAIL", "DNSQueryTimeoutError", "TimeoutError"],
)
def test_dns_trouble_defers(make, error):
    r = make(dns={"far.test": error})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    assert r.net.attempts == []
    rcpt = r.recipient("E1", "a@far.test")
    assert rcpt["status"] == "deferred"
    assert rcpt["status_code"] == "4.4.3"
    assert rcpt["last_error"].startswith("451 4.4.3 far.test: DNS")
    assert rcpt["next_attempt"] == 60
    assert r.inbox("alice@example.test") == []
    # The next attempt finds the DNS working again.
    r.resolver.answers["far.test"] = [(10, "mx.far.test")]
    host = r.net.add("mx.far.test")
    r.advance(60)
    assert len(host.delivered) == 1 and not r.exists("E1")


def test_refused_mx_is_marked_bad_and_skipped_for_a_while(make):
    r = make(dns={"far.test": [(10, "mx1.far.test"), (20, "mx2.far.test")]})
    mx2 = r.net.add("mx2.far.test")  # mx1 refuses connections
    r.enqueue("E1", ["a@far.test"])
    r.start()
    assert r.net.attempts == [Hop("mx1.far.test", 25), Hop("mx2.far.test", 25)]
    assert len(mx2.delivered) == 1 and not r.exists("E1")

    r.advance(BAD_HOST_SECONDS - 10)
    r.enqueue("E2", ["b@far.test"])
    r.wake()
    assert r.net.attempts[2:] == [Hop("mx2.far.test", 25)]  # mx1 skipped
    assert len(mx2.delivered) == 2 and not r.exists("E2")

    r.advance(10)  # the bad mark has run out
    r.enqueue("E3", ["c@far.test"])
    r.wake()
    assert r.net.attempts[3:] == [Hop("mx1.far.test", 25), Hop("mx2.far.test", 25)]
    assert len(mx2.delivered) == 3


def test_the_retry_of_the_same_entry_skips_the_refused_mx(make):
    r = make(dns={"far.test": [(10, "mx1.far.test"), (20, "mx2.far.test")]})
    mx2 = r.net.add("mx2.far.test", {"rcpt": "451 4.3.0 later"}, {})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    assert [h.host for h in r.net.attempts] == ["mx1.far.test", "mx2.far.test"]
    assert r.recipient("E1", "a@far.test")["last_error"] == "451 4.3.0 later"
    r.advance(60)
    assert [h.host for h in r.net.attempts[2:]] == ["mx2.far.test"]
    assert len(mx2.delivered) == 1 and not r.exists("E1")


def test_a_hanging_mx_is_marked_bad_from_when_it_timed_out(make):
    # The mark runs BAD_HOST_SECONDS from the failure, not from the start of
    # the attempt: else a host that takes the whole (default, 300 s) timeout
    # to fail would never be skipped.
    r = make(dns={"far.test": [(10, "mx1.far.test"), (20, "mx2.far.test")]})
    assert r.config.relay.timeout == BAD_HOST_SECONDS
    mx1 = r.net.add("mx1.far.test", {"greeting": HANG})
    mx2 = r.net.add("mx2.far.test")
    r.enqueue("E1", ["a@far.test"])
    r.start()
    r.advance(BAD_HOST_SECONDS)
    assert not mx1.sessions[0].open
    assert len(mx2.delivered) == 1 and not r.exists("E1")
    r.enqueue("E2", ["b@far.test"])
    r.wake()
    assert len(mx1.sessions) == 1, "mx1 was tried again right after it timed out"
    assert mx2.messages == 2 and not r.exists("E2")


def test_every_mx_refusing_defers(make):
    r = make(dns={"far.test": [(10, "mx1.far.test"), (20, "mx2.far.test")]})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    rcpt = r.recipient("E1", "a@far.test")
    assert rcpt["status"] == "deferred" and rcpt["status_code"] == "4.4.1"
    assert "mx2.far.test" in rcpt["last_error"]
    # All are bad now: the next attempt tries them all anyway.
    r.advance(60)
    assert [h.host for h in r.net.attempts] == ["mx1.far.test", "mx2.far.test"] * 2


def test_a_server_that_is_not_smtp_is_skipped_like_a_refusal(make):
    r = make(dns={"far.test": [(10, "web.far.test"), (20, "mx.far.test")]})
    web = r.net.add("web.far.test", {"greeting": "HTTP/1.1 400 Bad Request"})
    mx = r.net.add("mx.far.test")
    r.enqueue("E1", ["a@far.test"])
    r.start()
    assert len(web.sessions) == 1 and not web.sessions[0].open
    assert web.sessions[0].sender is None
    assert len(mx.delivered) == 1 and not r.exists("E1")


def test_a_smarthost_that_is_not_smtp_defers(make):
    r = make(SMARTHOST)
    r.net.add("127.0.0.1", {"greeting": "HTTP/1.1 400 Bad Request"})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    rcpt = r.recipient("E1", "a@far.test")
    assert rcpt["status"] == "deferred" and rcpt["status_code"] == "4.4.1"
    assert "HTTP/1.1 400 Bad Request" in rcpt["last_error"]


# --- temporary failures and back-off -----------------------------------------------


def test_backoff_schedule():
    assert [backoff(n) for n in range(8)] == [0, 60, 300, 900, 1800, 3600, 3600, 3600]


@pytest.mark.parametrize("stage", ["mail", "rcpt", "eod"])
def test_4xx_backs_off_60_then_300_seconds_then_delivers(make, stage):
    r = make(SMARTHOST)
    temporary = {stage: "451 4.3.0 try again later"}
    host = r.net.add("127.0.0.1", temporary, temporary, {})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    rcpt = r.recipient("E1", "a@far.test")
    assert rcpt["status"] == "deferred"
    assert rcpt["attempts"] == 1
    assert rcpt["next_attempt"] == 60
    assert rcpt["last_error"] == "451 4.3.0 try again later"
    assert rcpt["status_code"] == "4.3.0"

    r.advance(59)
    assert len(host.sessions) == 1
    r.advance(1)
    assert len(host.sessions) == 2
    rcpt = r.recipient("E1", "a@far.test")
    assert rcpt["attempts"] == 2 and rcpt["next_attempt"] == 60 + 300

    r.advance(299)
    assert len(host.sessions) == 2
    r.advance(1)
    assert len(host.sessions) == 3 and len(host.delivered) == 1
    assert host.delivered[0].data == stuffed(MESSAGE)
    assert not r.exists("E1")
    assert r.inbox("alice@example.test") == []


def test_4xx_greeting_defers(make):
    r = make(SMARTHOST)
    r.net.add("127.0.0.1", {"greeting": "421 4.3.2 too busy"})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    rcpt = r.recipient("E1", "a@far.test")
    assert rcpt["status"] == "deferred" and rcpt["last_error"] == "421 4.3.2 too busy"


# --- permanent failures and bounces ------------------------------------------------------


def test_5xx_at_rcpt_fails_that_recipient_only_and_bounces_to_a_local_sender(make):
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1", {"rcpt": {"b@far.test": "550 5.1.1 <b@far.test>: no such user"}})
    r.enqueue("E1", ["a@far.test", "b@far.test", "c@else.test"])
    r.start()
    (s,) = host.sessions
    assert s.accepted == [b"a@far.test", b"c@else.test"]
    assert s.data == stuffed(MESSAGE)
    assert not r.exists("E1")
    dsn = bounce_of(r)
    assert b"Final-Recipient: rfc822; b@far.test" in dsn
    assert b"Status: 5.1.1" in dsn
    assert b"no such user" in dsn
    assert b"a@far.test" not in dsn and b"c@else.test" not in dsn
    assert b"Subject: hello" in dsn  # the original's headers
    assert b"Hi there." not in dsn  # not its body
    assert r.queued() == []


def test_5xx_at_end_of_data_fails_every_recipient(make):
    r = make(SMARTHOST)
    r.net.add("127.0.0.1", {"eod": "552 5.3.4 message too big"})
    r.enqueue("E1", ["a@far.test", "b@far.test"])
    r.start()
    dsn = bounce_of(r)
    assert b"Final-Recipient: rfc822; a@far.test" in dsn
    assert b"Final-Recipient: rfc822; b@far.test" in dsn
    assert dsn.count(b"Status: 5.3.4") == 2
    assert not r.exists("E1")


@pytest.mark.parametrize(
    "reply, status",
    [
        ("550 5.7.1: relaying denied", b"5.0.0"),  # not quite an enhanced code
        ("550 5.x.1 odd", b"5.0.0"),
        ("550 2.1.5 wrong class", b"5.0.0"),  # a 5xx reply is a 5.x.x status
        ("554 no enhanced code at all", b"5.0.0"),
        ("550 5.1.1 fine", b"5.1.1"),
    ],
)
def test_the_bounce_status_comes_only_from_a_well_formed_enhanced_code(make, reply, status):
    # The reply text is the remote server's: whatever it says, the bounce goes out.
    r = make(SMARTHOST)
    r.net.add("127.0.0.1", {"rcpt": reply})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    assert not r.exists("E1")
    dsn = bounce_of(r)
    assert b"Status: " + status + b"\n" in dsn


def test_a_4xx_reply_with_a_5xx_enhanced_code_is_still_temporary(make):
    r = make(SMARTHOST)
    r.net.add("127.0.0.1", {"rcpt": "451 5.7.1 greylisted"})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    rcpt = r.recipient("E1", "a@far.test")
    assert rcpt["status"] == "deferred"
    assert rcpt["status_code"] == "4.0.0"


def test_mixed_outcomes_keep_the_entry_until_all_are_done(make):
    r = make(dns={"far.test": [(10, "mx.far.test")], "else.test": [(10, "mx.else.test")]})
    r.net.add("mx.far.test")
    other = r.net.add("mx.else.test", {"rcpt": "450 4.2.1 mailbox busy"}, {})
    r.enqueue("E1", ["a@far.test", "b@else.test"])
    r.start()
    assert r.recipient("E1", "a@far.test")["status"] == "delivered"
    assert r.recipient("E1", "b@else.test")["status"] == "deferred"
    assert (r.dir / "E1.msg").exists()
    r.advance(60)
    assert len(other.delivered) == 1
    assert not r.exists("E1") and r.inbox("alice@example.test") == []


def test_a_remote_senders_bounce_is_queued_with_the_null_sender(make):
    r = make(dns={"far.test": [(10, "mx.far.test")], "sender.test": [(10, "mx.sender.test")]})
    r.net.add("mx.far.test", {"rcpt": "550 5.1.1 no such user"})
    back = r.net.add("mx.sender.test")
    r.enqueue("E1", ["a@far.test"], sender="zed@sender.test")
    r.start()
    assert not r.exists("E1")
    (bounce_id,) = r.queued()
    envelope = r.envelope(bounce_id)
    assert envelope["sender"] == "" and envelope["offset"] == 0
    assert [x["address"] for x in envelope["recipients"]] == ["zed@sender.test"]
    data = (r.dir / f"{bounce_id}.msg").read_bytes()
    assert b"To: <zed@sender.test>" in data and b"Final-Recipient: rfc822; a@far.test" in data
    # The next tick sends it, from <>.
    r.advance(1)
    (s,) = back.sessions
    assert s.sender == b"" and s.recipients == [b"zed@sender.test"]
    assert s.data == stuffed(data)
    assert r.queued() == []


def add_postmaster(unit) -> None:
    aliases = unit.config.mailbox.aliases
    aliases.write_text(aliases.read_text() + "postmaster@example.test: alice@example.test\n")
    unit.store.reload()


def test_a_failed_bounce_goes_to_the_postmaster(make, unit):
    add_postmaster(unit)
    r = make(SMARTHOST)
    r.net.add("127.0.0.1", {"rcpt": "550 5.1.1 no such user"})
    r.enqueue("B1", ["zed@sender.test"], sender="", message=b"Subject: a bounce\n\nx\n")
    r.start()
    assert not r.exists("B1") and r.queued() == []
    dsn = bounce_of(r)
    assert b"To: <postmaster@example.test>" in dsn
    assert b"Final-Recipient: rfc822; zed@sender.test" in dsn
    assert b"Subject: a bounce" in dsn
    assert len(r.net.attempts) == 1  # never bounced back out


def test_a_failed_bounce_without_a_postmaster_is_logged_and_dropped(make):
    r = make(SMARTHOST)
    r.net.add("127.0.0.1", {"rcpt": "550 5.1.1 no such user"})
    r.enqueue("B1", ["zed@sender.test"], sender="")
    r.start()
    assert not r.exists("B1") and r.queued() == []
    assert r.inbox("alice@example.test") == [] and r.inbox("bob@other.test") == []
    assert len(r.net.attempts) == 1
    assert r.logged("a bounce could not be delivered to ['zed@sender.test']; dropped")


def test_queue_lifetime_expiry_fails_with_4_4_7_and_bounces(make):
    r = make(SMARTHOST + "queue_lifetime = 3600\n")
    r.net.add("127.0.0.1", {"rcpt": "451 4.3.0 try later"})
    r.advance(10_000)
    r.enqueue("E1", ["a@far.test"], received=10_000 - 3500)
    r.start()
    assert r.recipient("E1", "a@far.test")["status"] == "deferred"
    r.advance(60)  # 3560 s old: still deferred
    assert r.recipient("E1", "a@far.test")["status"] == "deferred"
    assert r.inbox("alice@example.test") == []
    r.advance(300)  # 3860 s old: given up
    assert not r.exists("E1")
    dsn = bounce_of(r)
    assert b"Final-Recipient: rfc822; a@far.test" in dsn
    assert b"Status: 4.4.7" in dsn
    assert b"451 4.3.0 try later" in dsn


def test_a_wall_clock_step_neither_expires_nor_delays_an_entry(make):
    r = make(SMARTHOST + "queue_lifetime = 3600\n")
    r.net.add("127.0.0.1", {"rcpt": "451 4.3.0 try later"})
    r.advance(10_000)
    r.enqueue("E1", ["a@far.test"])
    r.start()
    assert r.recipient("E1", "a@far.test")["attempts"] == 1
    r.wall_step = 2 * 3600  # two hours ahead: the entry is still seconds old
    r.advance(backoff(1))
    rcpt = r.recipient("E1", "a@far.test")
    assert (rcpt["status"], rcpt["attempts"]) == ("deferred", 2)
    r.wall_step = -3600  # three hours back: the next retry is not held back
    r.advance(backoff(2))
    rcpt = r.recipient("E1", "a@far.test")
    assert (rcpt["status"], rcpt["attempts"]) == ("deferred", 3)
    assert r.inbox("alice@example.test") == []


# --- servers that hang or go away ------------------------------------------------------


@pytest.mark.parametrize("stage", ["greeting", "ehlo", "mail", "rcpt", "data", "eod"])
def test_a_hanging_server_times_out_and_defers(make, stage):
    r = make(SMARTHOST + "timeout = 30\n")
    host = r.net.add("127.0.0.1", {stage: HANG}, {})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    assert host.sessions[0].open
    assert "E1" in r.outbound._busy
    assert r.recipient("E1", "a@far.test")["status"] == "pending"
    r.advance(29)
    assert host.sessions[0].open and r.recipient("E1", "a@far.test")["attempts"] == 0
    r.advance(1)
    assert not host.sessions[0].open
    rcpt = r.recipient("E1", "a@far.test")
    assert rcpt["status"] == "deferred" and rcpt["status_code"] == "4.4.1"
    assert "Timeout" in rcpt["last_error"]
    assert rcpt["next_attempt"] == 30 + 60
    assert "E1" not in r.outbound._busy
    r.advance(60)
    assert len(host.delivered) == 1 and not r.exists("E1")


@pytest.mark.parametrize("stage", ["greeting", "ehlo", "mail", "rcpt", "data"])
def test_a_dropped_connection_defers(make, stage):
    r = make(SMARTHOST + "timeout = 30\n")
    host = r.net.add("127.0.0.1", {stage: CLOSE}, {})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    assert not host.sessions[0].open
    rcpt = r.recipient("E1", "a@far.test")
    assert rcpt["status"] == "deferred", "the delivery must not wait for ever"
    assert rcpt["status_code"] == "4.4.1"
    assert rcpt["next_attempt"] == 60
    assert "E1" not in r.outbound._busy
    r.advance(60)
    assert len(host.delivered) == 1 and not r.exists("E1")


def test_a_connection_dropped_mid_message_defers(make):
    r = make(SMARTHOST + "timeout = 30\n")
    host = r.net.add("127.0.0.1", {"drop_in_data": True}, {})
    message = b"Subject: big\n\n" + (b"x" * 63 + b"\n") * 2000
    r.enqueue("E1", ["a@far.test"], message=message)
    r.start()
    assert not host.sessions[0].open and not host.sessions[0].delivered
    rcpt = r.recipient("E1", "a@far.test")
    assert rcpt["status"] == "deferred" and rcpt["status_code"] == "4.4.1"
    assert "E1" not in r.outbound._busy
    r.advance(60)
    assert host.delivered[0].data == stuffed(message)


# --- the queue directory --------------------------------------------------------


def test_a_corrupt_envelope_is_moved_aside_and_the_rest_delivers(make, events):
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1")
    r.enqueue("A1", ["a@far.test"])
    r.dir.joinpath("B2.json").write_text("{not json")
    r.dir.joinpath("B2.msg").write_bytes(b"Subject: x\n\n")
    r.enqueue("C3", ["c@far.test"])
    r.start()
    assert [s.recipients for s in host.delivered] == [[b"a@far.test"], [b"c@far.test"]]
    assert (r.dir / "corrupt" / "B2.json").read_text() == "{not json"
    assert (r.dir / "corrupt" / "B2.msg").exists()
    assert r.queued() == [] and not (r.dir / "B2.msg").exists()
    assert r.logged("moved unreadable entry")


@pytest.mark.parametrize(
    "field, value",
    [
        ("next_attempt", "soon"),  # breaks the due check: the runner's loop stops
        ("received", None),  # breaks the expiry check: retried every tick
        ("address", 5),  # breaks the sender: retried every tick
    ],
)
def test_an_envelope_with_wrong_types_is_corrupt_too(make, field, value):
    # Valid JSON with a field of the wrong type is as unreadable as bad JSON:
    # it must go to corrupt/, not stop or spin the runner.
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1", {"rcpt": {"a@far.test": "451 4.3.0 later"}})
    r.enqueue("A1", ["a@far.test"])
    envelope = r.envelope("A1")
    if field == "received":
        envelope[field] = value
    else:
        envelope["recipients"][0][field] = value
    r.dir.joinpath("A1.json").write_text(json.dumps(envelope))
    r.enqueue("C3", ["c@far.test"])
    r.start()
    for _ in range(5):
        r.advance(1)
    assert r.outbound._loop.running
    assert [s.recipients for s in host.sessions] == [[b"c@far.test"]]
    assert len(host.delivered) == 1
    assert (r.dir / "corrupt" / "A1.json").exists()
    assert (r.dir / "corrupt" / "A1.msg").exists()
    assert r.queued() == []


def test_flush_makes_deferred_recipients_due_at_once(make):
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1", {"rcpt": "451 4.3.0 later"}, {})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    assert r.recipient("E1", "a@far.test")["next_attempt"] == 60
    r.advance(5)
    assert len(host.sessions) == 1
    (r.dir / queue.FLUSH).touch()
    r.advance(1)
    assert len(host.delivered) == 1 and not r.exists("E1")


def test_a_flush_is_acted_on_once_each_time_it_is_asked_and_not_at_start(make):
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1", {"rcpt": "451 4.3.0 later"}, {})
    (r.dir / queue.FLUSH).parent.mkdir(parents=True, exist_ok=True)
    (r.dir / queue.FLUSH).touch()  # asked before this start: long done
    r.enqueue("E1", ["a@far.test"])
    r.start()
    r.advance(5)
    assert len(host.sessions) == 1  # the first attempt only
    os.utime(r.dir / queue.FLUSH, ns=(1, 1))  # asked again (by any front end's mailboxctl)
    r.advance(1)
    assert len(host.sessions) == 2
    r.advance(5)
    assert len(host.sessions) == 2  # once: the file stays, unchanged


def test_an_entry_deleted_while_deferred_is_dropped(make):
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1", {"rcpt": "451 4.3.0 later"}, {})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    assert queue.remove(r.dir, "E1")
    r.advance(60)
    r.advance(60)
    assert len(host.sessions) == 1
    assert "E1" not in r.outbound.entries
    assert r.inbox("alice@example.test") == []


def test_an_entry_deleted_while_deferred_and_due_before_a_rescan(make):
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1", {"rcpt": "451 4.3.0 later"}, {})
    r.outbound.rescan_every = 10_000
    r.enqueue("E1", ["a@far.test"])
    r.start()
    assert queue.remove(r.dir, "E1")
    r.advance(60)
    assert len(host.sessions) == 1
    assert "E1" not in r.outbound.entries
    assert r.logged("queue E1 was deleted")


def test_an_entry_deleted_during_delivery_is_not_written_back(make):
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1", {"rcpt": "451 4.3.0 later"})
    r.enqueue("E1", ["a@far.test"])
    r.outbound.start()  # connected, nothing said yet
    assert queue.remove(r.dir, "E1")
    r.net.pump()
    assert len(host.sessions) == 1
    assert not r.exists("E1") and "E1" not in r.outbound.entries
    assert r.logged("queue E1 was deleted during delivery")


def test_max_connections_per_destination(make):
    r = make(
        "[relay]\nmax_connections_per_destination = 2\n",
        dns={"far.test": [(10, "mx.far.test")], "else.test": [(10, "mx.else.test")]},
    )
    far = r.net.add("mx.far.test")
    other = r.net.add("mx.else.test")
    for i in range(5):
        r.enqueue(f"E{i}", [f"u{i}@far.test"])
    r.enqueue("X", ["x@else.test"])
    r.outbound.start()  # connections are made but not pumped
    assert len(far.sessions) == 2
    assert len(other.sessions) == 1
    r.net.pump()
    assert r.net.most_open == 3
    r.advance(1)
    r.advance(1)
    r.advance(1)
    # The two connections carried all five, one after the other.
    assert len(far.sessions) == 2 and far.messages == 5 and other.messages == 1
    assert r.net.most_open == 3
    assert r.queued() == []
    assert r.net.most_open == 3


def test_max_connections(make):
    r = make("[relay]\nmax_connections = 1\n")
    r.enqueue("E1", ["a@far.test"])
    r.enqueue("E2", ["b@else.test"])
    r.resolver.answers.update(
        {"far.test": [(10, "mx.far.test")], "else.test": [(10, "mx.else.test")]}
    )
    r.net.add("mx.far.test")
    r.net.add("mx.else.test")
    r.outbound.start()
    assert len(r.net.attempts) == 1
    r.net.pump()
    r.advance(1)
    assert len(r.net.attempts) == 2 and r.queued() == []
    assert r.net.most_open == 1


def test_a_server_refusing_ehlo_and_helo_gets_one_helo_and_a_deferral(make):
    r = make(SMARTHOST + "timeout = 30\n")
    refuse = "450 4.3.2 not now"
    host = r.net.add("127.0.0.1", {"ehlo": refuse, "helo": refuse}, {})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    [session] = host.sessions
    assert [c.split(b" ")[0] for c in session.commands].count(b"HELO") == 1  # not a loop
    rcpt = r.recipient("E1", "a@far.test")
    assert (rcpt["status"], rcpt["last_error"]) == ("deferred", refuse)
    assert "E1" not in r.outbound._busy  # its slot is free


# --- STARTTLS and AUTH ----------------------------------------------------------------

CREDENTIALS = "smarthost_username = alice@example.test\nsmarthost_password = s3cret\n"
OFFERS_TLS_AND_AUTH = "250-mx.far.test hello\r\n250-STARTTLS\r\n250-AUTH PLAIN\r\n250 PIPELINING"


def test_a_smarthost_gets_starttls_then_auth_with_the_configured_credentials(make):
    r = make(SMARTHOST + CREDENTIALS)
    host = r.net.add("127.0.0.1", {"ehlo": OFFERS_TLS_AND_AUTH})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    (s,) = host.sessions
    verbs = [c.split(b" ")[0] for c in s.commands]
    assert verbs[:5] == [b"EHLO", b"STARTTLS", b"EHLO", b"AUTH", b"MAIL"]
    assert s.tls and s.auth == [b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0s3cret")]
    assert s.delivered and not r.exists("E1")


def test_a_refused_auth_is_the_servers_answer_for_every_recipient(make):
    r = make(SMARTHOST + CREDENTIALS)
    refusal = "454 4.7.0 Temporary authentication failure"
    host = r.net.add("127.0.0.1", {"ehlo": OFFERS_TLS_AND_AUTH, "auth": refusal}, {})
    r.enqueue("E1", ["a@far.test", "b@far.test"])
    r.start()
    (s,) = host.sessions
    assert s.auth and s.sender is None and s.commands[-1] == b"QUIT"
    for address in ("a@far.test", "b@far.test"):
        rcpt = r.recipient("E1", address)
        assert (rcpt["status"], rcpt["last_error"]) == ("deferred", refusal)


def test_mail_to_a_smarthost_without_auth_is_not_sent_unauthenticated(make):
    r = make(SMARTHOST + CREDENTIALS)
    host = r.net.add("127.0.0.1", {"ehlo": "250-mx.far.test hello\r\n250 PIPELINING"})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    (s,) = host.sessions
    assert s.sender is None and not s.delivered and s.commands[-1] == b"QUIT"
    # A 502 of our own, as Twisted's sender said: a permanent failure, bounced.
    assert b"Final-Recipient: rfc822; a@far.test" in bounce_of(r)


def test_the_smarthost_credentials_never_go_to_an_mx(make):
    r = make("[relay]\n" + CREDENTIALS, dns={"far.test": [(10, "mx.far.test")]})
    mx = r.net.add("mx.far.test", {"ehlo": OFFERS_TLS_AND_AUTH})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    (s,) = mx.sessions
    assert s.auth == [] and s.delivered


def test_a_server_that_never_finishes_an_answer_meets_the_attempt_deadline(make):
    r = make(SMARTHOST + "timeout = 30\n")
    host = r.net.add("127.0.0.1", {"eod": HANG}, {})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    [pump] = r.net.pumps
    elapsed = 0
    # A line of a multi-line reply every 20 s: each resets the 30 s step
    # timeout, and the reply never ends.
    while elapsed < 580:
        pump.serverIO.write(b"250-still thinking\r\n")
        r.advance(20)
        elapsed += 20
        assert "E1" in r.outbound._busy, (elapsed, r.envelope("E1"))
    r.advance(20)
    assert "E1" not in r.outbound._busy  # its slot is free again
    rcpt = r.recipient("E1", "a@far.test")
    assert rcpt["status"] == "deferred"
    assert "took too long" in rcpt["last_error"]
    assert not host.sessions[0].open


# --- several messages a connection ---------------------------------------------------


def test_entries_that_finish_during_a_removal_are_removed_together(make, monkeypatch):
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1")
    held: list[tuple[defer.Deferred, list[str]]] = []
    thread = Outbound._thread

    def hold_removals(self, f, *args):
        if f is not queue.remove_all:
            return thread(self, f, *args)
        d: defer.Deferred = defer.Deferred()
        held.append((d, list(args[1])))
        return d

    monkeypatch.setattr(Outbound, "_thread", hold_removals)
    for entry_id in ("E1", "E2", "E3"):
        r.enqueue(entry_id, [f"{entry_id.lower()}@far.test"])
    r.start()
    r.advance(0)
    assert host.messages == 3
    assert [ids for _, ids in held] == [["E1"]]  # E2 and E3 wait for it
    first, ids = held.pop()
    first.callback(queue.remove_all(r.dir, ids))
    assert [ids for _, ids in held] == [["E2", "E3"]]
    second, ids = held.pop()
    second.callback(queue.remove_all(r.dir, ids))
    r.advance(0)
    assert r.outbound.entries == {} and not any(r.exists(e) for e in ("E1", "E2", "E3"))
    assert r.logged("queue E3 done")


def test_envelopes_from_another_process_are_delivered_without_reading_them(make):
    r = make(SMARTHOST)
    one, two = "0000000000E1", "0000000000E2"  # ids as the server makes them
    host = r.net.add("127.0.0.1")
    r.start()
    sent = r.enqueue(one, ["a@far.test"])
    (r.dir / f"{one}.json").write_text("not read")  # the envelope sent is what counts
    r.outbound.adopt(sent.to_json())
    for _ in range(3):
        r.advance(0)
    assert host.messages == 1 and not r.exists(one)
    # One that cannot be parsed is left to a scan of the directory.
    r.enqueue(two, ["b@far.test"])
    r.outbound.adopt("{broken")
    r.advance(1)
    assert host.messages == 2 and not r.exists(two)


def test_a_message_handed_over_when_queued_is_sent_without_reading_its_file(make):
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1")
    r.start()
    entry = r.enqueue("0000000000E1", ["a@far.test"])
    (r.dir / "0000000000E1.msg").write_bytes(b"not read")  # what was handed over counts
    r.outbound.adopt(entry.to_json(), MESSAGE)
    r.advance(0)
    assert host.messages == 1 and host.delivered[0].data == stuffed(MESSAGE)
    assert not r.exists("0000000000E1") and r.outbound._held == {}


def test_a_handed_over_message_serves_the_first_attempt_only(make):
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1", {"rcpt": "451 4.3.0 later"}, {})
    r.start()
    entry = r.enqueue("E1", ["a@far.test"])
    r.outbound.add(entry, b"Subject: as handed over\n\nfirst\n")
    r.advance(0)
    assert r.recipient("E1", "a@far.test")["status"] == "deferred"
    assert r.outbound._held == {} and r.outbound._held_bytes == 0
    r.advance(backoff(1))  # the retry reads the file
    assert host.messages == 1 and host.delivered[-1].data == stuffed(MESSAGE)


def test_handed_over_messages_are_kept_up_to_a_limit(make, monkeypatch):
    monkeypatch.setattr(outbound, "HELD_MAX", 2 * len(MESSAGE))
    r = make(SMARTHOST)  # not started: nothing is delivered, so all stay held
    for n in range(3):
        r.outbound.add(r.enqueue(f"E{n}", ["a@far.test"]), MESSAGE)
    r.outbound.add(r.enqueue("E3", ["a@far.test"]), b"x" * (outbound.ONE_WRITE + 1))
    assert sorted(r.outbound._held) == ["E0", "E1"]
    assert r.outbound._held_bytes == 2 * len(MESSAGE)


def test_a_handed_over_message_of_an_entry_deleted_before_its_attempt_is_let_go(make):
    r = make(SMARTHOST + "max_connections = 1\n")
    r.net.add("127.0.0.1", {"greeting": HANG})
    r.start()
    r.outbound.add(r.enqueue("E1", ["a@far.test"]))  # takes the one connection
    r.advance(0)
    r.outbound.add(r.enqueue("E2", ["b@far.test"]), MESSAGE)  # waits for it
    assert list(r.outbound._held) == ["E2"]
    queue.remove(r.dir, "E2")  # mailboxctl queue delete
    r.wake()
    assert "E2" not in r.outbound.entries and r.outbound._held_bytes == 0


def held_scans(monkeypatch) -> list[tuple[defer.Deferred, object]]:
    """Queue scans from now on run at once but report only when the test
    fires their Deferred (with the listing they made, held beside it)."""
    held: list[tuple[defer.Deferred, object]] = []
    thread = Outbound._thread

    def hold_scans(self, f, *args):
        if f == self._scan:
            d: defer.Deferred = defer.Deferred()
            held.append((d, f(*args)))
            return d
        return thread(self, f, *args)

    monkeypatch.setattr(Outbound, "_thread", hold_scans)
    return held


def test_an_entry_added_while_the_queue_is_scanned_is_delivered_at_once(make, monkeypatch):
    # The scan lists the directory, then the SMTP server queues E2 (after the
    # listing), then the scan's result arrives: E2 must not be dropped until
    # the next rescan.
    r = make(SMARTHOST + "max_connections = 1\n")
    host = r.net.add("127.0.0.1", {"eod": HANG}, {})
    r.enqueue("E1", ["a@far.test"])
    r.start()  # E1 takes the only slot, and hangs at the end of its data
    held = held_scans(monkeypatch)
    r.wake()
    ((scan, listing),) = held
    r.outbound.add(r.enqueue("E2", ["b@far.test"]))
    scan.callback(listing)
    assert "E2" in r.outbound.entries
    for _ in range(2):  # E1 goes; E2 follows on its connection at once
        r.net.pumps[0].serverIO.write(b"250 2.0.0 ok\r\n")
        r.advance(0)
    assert not r.exists("E1") and not r.exists("E2")  # the server's answers were ours
    assert len(host.sessions) == 1 and r.logged("b@far.test delivered after attempt 1")


def test_an_entry_finished_while_the_queue_is_scanned_is_not_sent_again(make, monkeypatch):
    # The scan lists E1's envelope, then E1 (handed over by the SMTP server,
    # not known to the scan) is delivered and removed, then the scan's result
    # arrives, with E1 as it was on disk: it must not be delivered again.
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1", {}, {})
    r.start()
    held = held_scans(monkeypatch)
    entry = r.enqueue("E1", ["a@far.test"])
    r.wake()
    ((scan, listing),) = held
    assert "E1" in listing[0]  # listed as it is on disk: pending
    r.outbound.add(entry)
    for _ in range(3):
        r.advance(0)
    assert not r.exists("E1") and r.logged("a@far.test delivered after attempt 1")
    scan.callback(listing)
    for _ in range(3):
        r.advance(0)
    assert "E1" not in r.outbound.entries
    assert host.messages == 1


def test_a_handover_that_comes_after_a_scan_delivered_the_entry_sends_nothing(make):
    # A worker queues an entry and hands it over; before the handover reaches this
    # process, a scan finds it on disk, delivers it and removes it. The late
    # handover (with its message, which spares a read) must not send it again.
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1", {}, {})
    entry = r.enqueue("0123456789AB", ["a@far.test"])
    r.start()
    for _ in range(3):
        r.advance(0)
    assert host.messages == 1 and not r.exists("0123456789AB")
    r.outbound.adopt(entry.to_json(), MESSAGE)
    for _ in range(3):
        r.advance(0)
    assert host.messages == 1
    assert "0123456789AB" not in r.outbound.entries and r.outbound._held_bytes == 0
    assert r.logged("queue 0123456789AB was handed over after it was done")


def test_messages_to_one_host_share_a_connection(make):
    r = make(SMARTHOST + "max_connections_per_destination = 1\n")
    host = r.net.add("127.0.0.1", {"rcpt": {"bad@far.test": "550 5.1.1 no such user"}})
    r.enqueue("E1", ["a@far.test"])
    r.enqueue("E2", ["bad@far.test"])  # refused: the connection goes on all the same
    r.enqueue("E3", ["c@far.test"], message=b"Subject: third\n\nthree\n")
    r.start()
    for _ in range(3):
        r.advance(0)
    (s,) = host.sessions
    verbs = [c.split(b" ")[0] for c in s.commands]
    assert verbs.count(b"EHLO") == 1 and verbs.count(b"MAIL") == 3
    # Only the refused transaction may still be open at the server: after the
    # others, the reply to the data ended them.
    assert verbs.count(b"RSET") == 1 and verbs[verbs.index(b"RSET") - 1] == b"DATA"
    assert host.messages == 2 and s.data == stuffed(b"Subject: third\n\nthree\n")
    assert not r.exists("E1") and not r.exists("E2") and not r.exists("E3")
    assert b"Final-Recipient: rfc822; bad@far.test" in bounce_of(r)  # E2's, to alice
    assert s.open
    r.advance(REUSE_SECONDS)
    assert s.commands[-1] == b"QUIT" and not s.open


def test_a_connection_the_server_closed_while_waiting_is_not_used(make):
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1", {"quit_after_eod": True}, {})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    (first,) = host.sessions
    assert not first.open  # it hung up after the message
    r.enqueue("E2", ["b@far.test"])
    r.wake()
    assert len(host.sessions) == 2 and host.messages == 2
    assert not r.exists("E2")


def test_the_queue_stopping_says_quit_to_waiting_connections(make):
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1")
    r.enqueue("E1", ["a@far.test"])
    r.start()
    (s,) = host.sessions
    assert s.open
    r.outbound.stop()
    r.net.pump()
    assert s.commands[-1] == b"QUIT" and not s.open


def test_a_waiting_connection_lost_as_it_is_used_costs_the_message_nothing(make):
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1", {"drop_second_mail": True}, {})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    r.enqueue("E2", ["b@far.test"])
    r.wake()
    assert len(host.sessions) == 2 and host.messages == 2
    assert not r.exists("E2")  # delivered at its first attempt, on a new connection
    assert r.logged("b@far.test delivered after attempt 1")


def test_the_queue_stopping_lets_go_a_connection_whose_rset_is_unanswered(make):
    r = make(SMARTHOST)
    # A refused transaction may still be open at the server: RSET follows it.
    host = r.net.add("127.0.0.1", {"rset": HANG, "rcpt": "550 5.1.1 no such user"})
    r.enqueue("E1", ["a@far.test"])
    r.start()
    (s,) = host.sessions
    assert s.commands[-1] == b"RSET" and s.open  # the attempt ended; no answer to RSET yet
    r.outbound.stop()

    pump = r.net.pumps[0]
    pump.serverIO.write(b"250 2.0.0 reset\r\n")
    r.net.pump()
    assert s.commands[-1] == b"QUIT" and not s.open


# --- PIPELINING (RFC 2920) ------------------------------------------------------

NO_PIPELINING = "250-mx.far.test hello\r\n250 8BITMIME"


def test_a_transaction_goes_in_one_write_where_the_server_pipelines(make):
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1", {})
    r.enqueue("E1", ["a@far.test", "b@far.test"])
    r.start()
    (session,) = host.delivered
    assert [b"MAIL", b"RCPT", b"RCPT", b"DATA"] in session.batches
    assert session.accepted == [b"a@far.test", b"b@far.test"]
    assert session.data == stuffed(MESSAGE)
    assert not r.exists("E1")


def test_one_command_at_a_time_where_the_server_does_not_pipeline(make):
    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1", {"ehlo": NO_PIPELINING})
    r.enqueue("E1", ["a@far.test", "b@far.test"])
    r.start()
    (session,) = host.delivered
    commands = [b for b in session.batches if b and b != [b"QUIT"]]
    assert all(len(batch) == 1 for batch in commands), commands
    assert session.data == stuffed(MESSAGE)


@pytest.mark.parametrize("ehlo", [DEFAULT["ehlo"], NO_PIPELINING])
def test_after_a_delivered_message_the_next_mail_needs_no_rset(make, ehlo):
    r = make(SMARTHOST + "max_connections_per_destination = 1\n")
    host = r.net.add("127.0.0.1", {"ehlo": ehlo})
    r.enqueue("E1", ["a@far.test"])
    r.enqueue("E2", ["b@far.test"], message=b"Subject: second\n\ntwo\n")
    r.start()
    r.advance(0)
    (s,) = host.sessions
    verbs = [c.split(b" ")[0].split(b":")[0] for c in s.commands]
    assert verbs == [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA"]
    assert host.messages == 2 and s.data == stuffed(b"Subject: second\n\ntwo\n")
    assert not r.exists("E1") and not r.exists("E2") and s.open


def test_a_save_replaces_a_temp_file_left_by_a_crash(make):
    r = make()
    entry = r.enqueue("E1", ["a@far.test"])
    left = r.dir / ".E1.json.tmp"
    left.write_text("half an envelope")
    left.chmod(0o400)
    entry.recipients[0].attempts = 3
    queue.save(r.dir, entry)
    assert r.envelope("E1")["recipients"][0]["attempts"] == 3
    assert not left.exists() and (r.dir / "E1.json").stat().st_mode & 0o777 == 0o600


def test_the_first_entry_makes_the_queue_folder(tmp_path):
    spool = tmp_path / "spool"
    spool.write_bytes(b"Subject: x\n\nbody\n")
    directory = tmp_path / "mail" / ".queue"
    queue.enqueue(directory, spool, Entry("E1", "", 0, 0.0, [Recipient("a@far.test")]))
    assert (directory / "E1.msg").read_bytes() == spool.read_bytes()
    assert queue.load(directory / "E1.json").recipients[0].address == "a@far.test"
    assert directory.stat().st_mode & 0o777 == 0o700


# The same outcomes, one command at a time or pipelined: script -> for each
# recipient (a, b), its last error ("" if delivered) and whether it is still queued.
OUTCOMES = [
    ({}, [("", False), ("", False)]),
    ({"mail": "451 4.3.0 later"}, [("451 4.3.0 later", True), ("451 4.3.0 later", True)]),
    (
        {"mail": "553 5.1.8 bad sender"},
        [("553 5.1.8 bad sender", False), ("553 5.1.8 bad sender", False)],
    ),
    (
        {"rcpt": {"a@far.test": "550 5.1.1 no such user"}},
        [("550 5.1.1 no such user", False), ("", False)],
    ),
    (
        {"rcpt": "450 4.2.1 busy"},
        [("450 4.2.1 busy", True), ("450 4.2.1 busy", True)],
    ),
    (
        {"rcpt": "450 4.2.1 busy", "always_354": True},
        [("450 4.2.1 busy", True), ("450 4.2.1 busy", True)],
    ),
    (
        {"data": "451 4.3.0 no data now"},
        [("451 4.3.0 no data now", True), ("451 4.3.0 no data now", True)],
    ),
    (
        {"eod": "554 5.7.1 spam"},
        [("554 5.7.1 spam", False), ("554 5.7.1 spam", False)],
    ),
]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
@pytest.mark.parametrize("script, expected", OUTCOMES)
def test_refusals_at_each_step_count_the_same_pipelined_or_not(make, script, expected, pipelining):
    r = make(SMARTHOST)
    if not pipelining:
        script = {**script, "ehlo": NO_PIPELINING}
    host = r.net.add("127.0.0.1", script)
    r.enqueue("E1", ["a@far.test", "b@far.test"])
    r.start()
    (session,) = host.sessions
    for address, (error, queued) in zip(["a@far.test", "b@far.test"], expected, strict=True):
        if not r.exists("E1"):
            assert not queued, address
            continue
        recipient = r.recipient("E1", address)
        assert (recipient["last_error"] or "") == error, address
        assert (recipient["status"] not in queue.DONE) == queued, (address, recipient)
    if script.get("always_354") and pipelining:
        assert session.data == b""  # a lone dot ended what nobody was to get
        return
    delivered = [
        a
        for a, (error, _) in zip([b"a@far.test", b"b@far.test"], expected, strict=True)
        if not error
    ]
    assert session.accepted_data == bool(delivered)
    assert session.messages == (1 if delivered else 0)


def test_an_entry_delivered_to_everyone_is_removed_without_saving_it_first(make, monkeypatch):
    saved = []
    real_save = queue.save
    monkeypatch.setattr(
        queue, "save", lambda d, entry, node="": saved.append(entry.id) or real_save(d, entry, node)
    )
    r = make(SMARTHOST)
    later = {"rcpt": {"b@far.test": "451 4.3.0 later"}}
    r.net.add("127.0.0.1", later, later)
    r.enqueue("E1", ["a@far.test"])
    r.enqueue("E2", ["a@far.test", "b@far.test"])
    r.start()
    assert not r.exists("E1")
    assert r.recipient("E2", "b@far.test")["status"] == "deferred"
    assert saved == ["E2"]  # what is left to do is remembered; what is done is just removed


def test_front_ends_sharing_a_queue_deliver_what_they_claim(make, tmp_path):
    from test_node import in_thread

    from mailboxd.node import Claims
    from mailboxd.state import SQLiteStateStore, state_path

    r = make(SMARTHOST)
    host = r.net.add("127.0.0.1", {}, {})
    store = SQLiteStateStore(state_path(tmp_path / "shared"))
    me = r.config.state.node
    r.outbound.claims = Claims(store, in_thread, r.outbound.wall, me, 30)
    r.enqueue("FREE", ["a@far.test"])  # nobody's: taken and delivered
    r.enqueue("HELD", ["d@far.test"])  # another front end's, while its lease lasts
    assert store.take_lease("queue:HELD", "other", r.outbound.wall(), 30) is None
    r.start()

    def sent() -> list[str]:
        return sorted(a.decode() for session in host.sessions for a in session.accepted)

    r.advance(1)
    assert sent() == ["a@far.test"]
    assert r.exists("HELD")
    r.advance(30)  # the other stopped renewing: its lease ends...
    for _ in range(10):  # ...and this one takes it at its next renewal (a third of a lease)
        r.advance(1)
    assert sent() == ["a@far.test", "d@far.test"]
    assert not r.exists("HELD")
