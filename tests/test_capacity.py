"""Unit tests of issue 9's parts: the credential cache, the SASL exchange, the
streaming wire encoder and flow control, over StringTransport and a Clock."""

from __future__ import annotations

import base64
import random

import bcrypt
import pytest
from test_pop3 import Session as POP
from test_pop3 import deliver
from test_smtp import Session as SMTP
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailboxd.credcache import CredentialCache
from mailboxd.sasl import (
    Aborted,
    Challenge,
    Credentials,
    Exchange,
    Forbidden,
    Malformed,
    Unsupported,
)
from mailboxd.wire import WireEncoder, wire_form

ALICE_PLAIN = base64.b64encode(b"\0alice@example.test\0alice pw").decode()

# --- the credential cache --------------------------------------------------------


def test_cache_remembers_a_verified_password_for_its_ttl():
    clock = Clock()
    cache = CredentialCache(60, clock.seconds)
    cache.remember("a@x", b"$2b$hash", b"pw")
    assert cache.verified("a@x", b"$2b$hash", b"pw")
    assert not cache.verified("a@x", b"$2b$hash", b"other")
    assert not cache.verified("b@x", b"$2b$hash", b"pw")
    clock.advance(59)
    assert cache.verified("a@x", b"$2b$hash", b"pw")
    clock.advance(1)
    assert not cache.verified("a@x", b"$2b$hash", b"pw")
    assert len(cache) == 0


def test_cache_misses_once_the_stored_hash_changes():
    cache = CredentialCache(60, Clock().seconds)
    cache.remember("a@x", b"$2b$old", b"pw")
    assert not cache.verified("a@x", b"$2b$new", b"pw")
    assert not cache.verified("a@x", b"$2b$old", b"pw")  # dropped, not kept for later


def test_cache_with_ttl_zero_remembers_nothing():
    cache = CredentialCache(0, Clock().seconds)
    cache.remember("a@x", b"$2b$hash", b"pw")
    assert not cache.verified("a@x", b"$2b$hash", b"pw")


def test_cache_keeps_no_password_and_shows_no_digest():
    cache = CredentialCache(60, Clock().seconds)
    cache.remember("a@x", b"$2b$hash", b"hunter2 secret")
    kept = repr(cache) + repr(cache._entries)
    assert b"hunter2" not in kept.encode() and "hunter2" not in kept
    assert "entries=1" in repr(cache) and "digest" not in repr(cache)
    # Another process (another key) cannot use the digest.
    other = CredentialCache(60, Clock().seconds)
    other._entries.update(cache._entries)
    assert not other.verified("a@x", b"$2b$hash", b"hunter2 secret")


def auth(unit, plain: str = ALICE_PLAIN, ip: str = "192.0.2.7") -> list[str]:
    s = SMTP(unit, ip=ip)
    s.cmd("EHLO client.test")
    return s.send(f"AUTH PLAIN {plain}\r\n")


def test_a_repeated_login_is_not_hashed_again(unit):
    assert auth(unit) == ["235 2.7.0 Authentication successful"]
    unit.hash_pool.paused = True  # any bcrypt check would now be held
    assert auth(unit) == ["235 2.7.0 Authentication successful"]
    assert unit.hash_pool.held == []


def test_a_wrong_password_is_always_hashed(unit):
    auth(unit)
    unit.hash_pool.paused = True
    wrong = base64.b64encode(b"\0alice@example.test\0nope").decode()
    assert auth(unit, wrong) == []
    assert len(unit.hash_pool.held) == 1
    unit.hash_pool.release()


def set_password(unit, address: str, password: bytes | None) -> None:
    path = unit.config.mailbox.accounts
    lines = [x for x in path.read_text().splitlines() if not x.startswith(address + ":")]
    if password is not None:
        lines.append(f"{address}:{bcrypt.hashpw(password, bcrypt.gensalt(4)).decode()}")
    path.write_text("\n".join(lines) + "\n")
    unit.store.reload()


def test_a_changed_password_misses_the_cache_at_once(unit):
    assert auth(unit) == ["235 2.7.0 Authentication successful"]
    set_password(unit, "alice@example.test", b"new pw")
    assert auth(unit) == ["535 5.7.8 Authentication credentials invalid"]
    new = base64.b64encode(b"\0alice@example.test\0new pw").decode()
    assert auth(unit, new) == ["235 2.7.0 Authentication successful"]


def test_a_removed_account_misses_the_cache_at_once(unit):
    assert auth(unit) == ["235 2.7.0 Authentication successful"]
    set_password(unit, "alice@example.test", None)
    assert auth(unit) == ["535 5.7.8 Authentication credentials invalid"]


def test_a_cache_hit_from_a_blocked_ip_is_refused(unit):
    from test_relay import block

    assert auth(unit, ip="192.0.2.50") == ["235 2.7.0 Authentication successful"]
    s = SMTP(unit, ip="192.0.2.50")
    s.cmd("EHLO client.test")
    block(unit, "192.0.2.50")
    assert s.send(f"AUTH PLAIN {ALICE_PLAIN}\r\n")[-1].startswith("421 4.7.1 Connection refused")


def test_a_cache_hit_over_pop3_authorises_pop_before_smtp(unit):
    p = POP(unit, ip="192.0.2.60")
    p.cmd("USER alice@example.test")
    assert p.cmd("PASS alice pw").startswith("+OK")
    p.cmd("QUIT")
    unit.state.revoke_popauth("192.0.2.60")
    unit.hash_pool.paused = True
    p = POP(unit, ip="192.0.2.60")
    p.cmd("USER alice@example.test")
    assert p.cmd("PASS alice pw").startswith("+OK")  # from the cache: nothing held
    assert unit.state.popauth("192.0.2.60", unit.clock.seconds()) is not None


# --- the SASL exchange -----------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "mechanism,initial,responses,expected",
    [
        ("PLAIN", b64(b"\0u@x\0pw"), [], Credentials("u@x", b"pw")),
        ("plain", None, [b64(b"u@x\0u@x\0pw")], Credentials("u@x", b"pw")),
        ("PLAIN", None, ["*"], Aborted()),
        ("PLAIN", "%%%", [], Malformed("cannot decode the response as base64")),
        ("PLAIN", b64(b"u@x\0pw"), [], Malformed("expected authzid NUL authcid NUL password")),
        (
            "PLAIN",
            b64(b"other@x\0u@x\0pw"),
            [],
            Forbidden("u@x", "authorization identity differs from authentication identity"),
        ),
        ("LOGIN", None, [b64(b"u@x"), b64(b"pw")], Credentials("u@x", b"pw")),
        ("LOGIN", b64(b"u@x"), [b64(b"pw")], Credentials("u@x", b"pw")),
        ("LOGIN", None, [b64(b"u@x"), "="], Credentials("u@x", b"")),
        ("LOGIN", None, [b64(b"u@x"), "*"], Aborted()),
        ("CRAM-MD5", None, [], Unsupported("CRAM-MD5")),
    ],
)
def test_sasl_exchange(mechanism, initial, responses, expected):
    exchange = Exchange()
    step = exchange.start(mechanism, initial)
    for response in responses:
        assert isinstance(step, Challenge) and exchange.waiting
        step = exchange.respond(response)
    assert step == expected
    assert not exchange.waiting


def test_sasl_offers_only_its_mechanisms_and_never_shows_a_password():
    assert Exchange(("PLAIN",)).start("LOGIN", None) == Unsupported("LOGIN")
    assert "pw" not in repr(Credentials("u@x", b"pw"))


# --- the wire form, chunk by chunk -------------------------------------------------


def reference(stored: bytes, top: int | None) -> bytes:
    """The whole-file way: CRLF ends, a last CRLF, TOP by splitting, then stuffing."""
    data = stored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if top is not None:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            lines = body.split(b"\r\n")[:-1]
            data = head + b"\r\n\r\n" + b"".join(line + b"\r\n" for line in lines[:top])
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


def encode(stored: bytes, top: int | None, size: int) -> bytes:
    encoder = WireEncoder(top=top)
    out = b"".join(encoder.feed(stored[i : i + size]) for i in range(0, len(stored), size))
    return out + encoder.finish()


CASES = [
    b"Subject: a\n\nbody\n",
    b"Subject: a\n\n.dot\n..two\n.\nend",
    b"Subject: a\r\n\r\nCRLF\r\nlines\r\n",
    b"Subject: a\n\nbare\rcr\n\r\r\nx\r",
    b".Header-ish: a\n\nno final newline",
    b"Subject: no body",
    b"Subject: a\n\n\n\n.\n.\n",
    b"",
]


@pytest.mark.parametrize("stored", CASES)
@pytest.mark.parametrize("top", [None, 0, 1, 2, 5])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 65536])
def test_wire_encoder_matches_the_whole_file_form(stored, top, size):
    assert encode(stored, top, size) == reference(stored, top)


def test_wire_encoder_on_random_messages():
    rng = random.Random(9)
    alphabet = [b"a", b"b", b".", b"\n", b"\r", b"\r\n", b" ", b".."]
    for _ in range(3000):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        stored = b"Subject: x\n" + body
        top = rng.choice([None, 0, 1, 3])
        size = rng.randint(1, 9)
        assert encode(stored, top, size) == reference(stored, top), (stored, top, size)
        if top is None:
            assert wire_form(stored) == reference(stored, None), stored
            assert wire_form(body) == reference(body, None), body  # a dot first, too


@pytest.mark.parametrize("stored", CASES)
def test_wire_form_of_a_whole_message_is_the_encoders(stored):
    assert wire_form(stored) == reference(stored, None)


# --- flow control ----------------------------------------------------------------


class SlowReader(StringTransport):
    """A transport whose peer is not reading: full past `limit` bytes, as TCP's would."""

    limit = 4096

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.io.getvalue()) > self.limit and self.producer is not None:
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        out = self.value()
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return out


def slow(session) -> SlowReader:
    t = SlowReader(peerAddress=session.transport.getPeer())
    session.proto.transport = t
    session.transport.unregisterProducer()
    t.registerProducer(session.proto, True)
    session.transport = t
    return t


@pytest.mark.parametrize("kind", ["smtp", "pop3"])
def test_pipelining_without_reading_stops_the_reading(unit, kind):
    session = SMTP(unit) if kind == "smtp" else POP(unit)
    t = slow(session)
    count = 20000
    command = b"NOOP\r\n" if kind == "smtp" else b"CAPA\r\n"  # not an error: no limit
    session.proto.dataReceived(command * count)
    held = len(t.value())
    assert held < t.limit + 100  # replies stop once the buffer is full ...
    assert t.producerState == "paused"  # ... and so does reading
    replies = 0
    while not session.proto.peer_reading:
        replies += len(t.drain())
    replies += len(t.value())
    reply = b"250 2.0.0 Ok\r\n" if kind == "smtp" else session.proto.pop_CAPA("")
    assert replies == count * len(reply)


def test_a_session_that_never_reads_is_cut_at_the_idle_timeout(unit):
    session = SMTP(unit)
    t = slow(session)
    session.proto.dataReceived(b"NOOP\r\n" * 20000)
    assert t.producerState == "paused"
    unit.clock.advance(unit.config.smtp.idle_timeout)
    assert t.disconnected  # aborted: a polite close would wait for ever


BIG = b"Subject: big\n\n" + b"".join(
    b".line %d of a big message, with a dot in front\n" % i for i in range(20000)
)


def login_with_big_message(unit) -> POP:
    deliver(unit, BIG.replace(b"\n", b"\r\n"))
    p = POP(unit)
    p.cmd("USER alice@example.test")
    assert p.cmd("PASS alice pw").startswith("+OK")
    return p


def stored_message(unit) -> bytes:
    [path] = list((unit.mail_dir / "example.test" / "alice" / "new").iterdir())
    return path.read_bytes()


@pytest.mark.parametrize("command,top", [("RETR 1", None), ("TOP 1 0", 0), ("TOP 1 7", 7)])
def test_retr_and_top_stream_as_the_client_reads(unit, command, top):
    p = login_with_big_message(unit)
    t = slow(p)
    p.proto.dataReceived(command.encode() + b"\r\nNOOP\r\n")
    out = b""
    while not p.proto.peer_reading:
        assert len(t.value()) < t.limit + 70000  # one chunk past the full buffer at most
        out += t.drain()
    out += t.value()
    stored = stored_message(unit)
    size = len(stored.replace(b"\n", b"\r\n"))
    expected = f"+OK {size} octets\r\n".encode() + reference(stored, top) + b".\r\n" + b"+OK\r\n"
    assert out == expected


def test_many_pipelined_retrs_are_sent_one_after_another(unit):
    p = login_with_big_message(unit)
    t = slow(p)
    p.proto.dataReceived(b"RETR 1\r\n" * 5)
    out = b""
    while not p.proto.peer_reading:
        assert len(t.value()) < t.limit + 70000
        out += t.drain()
    out += t.value()
    single = out[: len(out) // 5]
    assert out == single * 5 and single.endswith(b"\r\n.\r\n")


# --- closing, and faults around it --------------------------------------------------


def test_a_hung_up_session_that_never_goes_is_aborted(unit):
    from mailboxd.lines import CLOSING_TIMEOUT

    s = SMTP(unit)
    s.cmd("QUIT")
    assert s.transport.disconnecting and not s.transport.disconnected
    unit.clock.advance(CLOSING_TIMEOUT)
    assert s.transport.disconnected  # aborted: the peer never took the last words


def test_quit_then_a_dropped_connection_keeps_the_lock_until_the_commit_is_done(unit):
    deliver(unit, b"Subject: one\r\n\r\nbody\r\n")
    p = POP(unit)
    p.cmd("USER alice@example.test")
    p.cmd("PASS alice pw")
    p.cmd("DELE 1")
    unit.pool.paused = True
    p.proto.dataReceived(b"QUIT\r\n")
    p.proto.connectionLost(None)
    other = POP(unit)  # the greeting waits for the held block check
    unit.pool.release()
    other.cmd("USER alice@example.test")
    assert other.cmd("PASS alice pw") == "+OK 0 messages (0 octets)"


def test_a_failure_the_store_cannot_record_gives_no_verdict_until_it_is(unit, monkeypatch):
    from test_relay import WRONG_PLAIN

    real = unit.state.record_failure

    def locked(*args):
        from mailboxd.state import StateError

        raise StateError("state.sqlite3: database is locked")

    monkeypatch.setattr(unit.state, "record_failure", locked)
    s = SMTP(unit, ip="192.0.2.70")
    s.cmd("EHLO client.test")
    assert s.send(f"AUTH PLAIN {WRONG_PLAIN}\r\n")[-1].startswith("451 4.3.0")
    # Still locked: even the right password gets no verdict from this IP
    # (greeted, since mail for local mailboxes needs no verdict).
    s = SMTP(unit, ip="192.0.2.70")
    assert s.greeting[-1].startswith("220 ")
    s.cmd("EHLO client.test")
    from test_relay import ALICE_PLAIN

    assert s.send(f"AUTH PLAIN {ALICE_PLAIN}\r\n")[-1].startswith("451 4.3.0")
    monkeypatch.setattr(unit.state, "record_failure", real)
    assert auth(unit, ip="192.0.2.70") == ["235 2.7.0 Authentication successful"]
    assert unit.state.failures("192.0.2.70", -1) == 1  # recorded before that verdict


# --- client text in the log ----------------------------------------------------------


def test_client_text_in_a_log_event_is_one_escaped_line(unit):
    from twisted.logger import capturedLogs, formatEvent

    forged = "x\n2026-01-01T00:00:00+0000 [mailboxd.auth#info] smtp login INJECTED@example.test"
    plain = base64.b64encode(b"\0" + (forged + "\r\x1b[31m\\").encode() + b"\0nope").decode()
    with capturedLogs() as events:
        assert auth(unit, plain) == ["535 5.7.8 Authentication credentials invalid"]
    [line] = [formatEvent(e) for e in events if "login failed" in e["log_format"]]
    assert "\n" not in line and "\r" not in line and "\0" not in line and "\x1b" not in line
    assert "x\\x0a2026-01-01" in line and "\\x0d\\x1b[31m\\\\" in line
