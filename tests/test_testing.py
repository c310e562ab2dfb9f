"""mailboxd.testing: MailServer as other projects' tests use it.

Every server here is in-process (one reactor thread for the whole pytest run),
on ephemeral 127.0.0.1 ports; relayed mail is captured, nothing leaves the box.
The few tests of the subprocess mode are at the end.
"""

from __future__ import annotations

import json
import poplib
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailboxd.config import ConfigError
from mailboxd.testing import OVERRIDES, MailServer, Message

ROOT = Path(__file__).resolve().parent.parent
ALICE, ALICE_PW = "alice@example.test", "alice pw"
BOB, BOB_PW = "bob@example.test", "bob pw"
FAR = "someone@far.test"
TIMEOUT = 10  # socket timeouts: a hang fails the test instead of stalling the run


def raw(subject: str = "hello", body: str = "hi there", sender: str = FAR) -> bytes:
    return f"From: {sender}\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode()


def smtp(server, port: int | None = None) -> smtplib.SMTP:
    return smtplib.SMTP(server.host, port or server.smtp_port, timeout=TIMEOUT)


def send(server, to, subject: str = "hello", sender: str = FAR, port: int | None = None) -> None:
    """Plain SMTP, no AUTH, no TLS."""
    recipients = [to] if isinstance(to, str) else list(to)
    with smtp(server, port) as s:
        s.sendmail(sender, recipients, raw(subject, sender=sender))


def pop(server, address: str, password: str, port: int | None = None) -> poplib.POP3:
    p = poplib.POP3(server.host, port or server.pop3_port, timeout=TIMEOUT)
    p.user(address)
    p.pass_(password)
    return p


def greeting(host: str, port: int, context: ssl.SSLContext | None = None) -> bytes:
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        if context is None:
            return sock.recv(100)
        with context.wrap_socket(sock, server_hostname="mail.example.test") as tls:
            return tls.recv(100)


def listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at `port` (Linux /proc)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # LISTEN
                found.add(address)
    return found


@pytest.fixture
def box():
    with MailServer() as server:
        yield server


@pytest.fixture
def make():
    """MailServer(**kwargs), started, and stopped after the test."""
    started = []

    def make(*args, **kwargs) -> MailServer:
        server = MailServer(*args, **kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


# --- life -------------------------------------------------------------------------------


def test_context_manager_listens_on_loopback_and_cleans_up():
    with MailServer(domains=["example.test"]) as server:
        assert server.host == "127.0.0.1"
        ports = [server.smtp_port, server.submission_port, server.pop3_port]
        assert all(p > 0 for p in ports) and len(set(ports)) == 3
        assert server.smtps_port is None and server.pop3s_port is None  # no tls=True
        # Every listener accepts at once: start() returned only once they were up.
        assert greeting(server.host, server.smtp_port).startswith(b"220 ")
        assert greeting(server.host, server.submission_port).startswith(b"220 ")
        assert greeting(server.host, server.pop3_port).startswith(b"+OK")
        if Path("/proc/net/tcp").exists():
            for port in ports:
                assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only
        home = server.home
        assert home is not None and home.is_dir()
    assert not home.exists()  # the mail store is removed
    with pytest.raises(OSError):
        socket.create_connection((server.host, server.smtp_port), timeout=TIMEOUT).close()


def test_start_and_stop_methods():
    server = MailServer()
    assert server.start() is server
    port = server.smtp_port
    assert server.start() is server and server.smtp_port == port  # already running: no-op
    server.add_account(ALICE, ALICE_PW)
    send(server, ALICE)
    assert server.wait_for_message(to=ALICE).subject == "hello"
    server.stop()
    server.stop()  # a second stop is harmless


def test_a_stopped_server_raises_a_clear_error():
    never_started = MailServer()
    with pytest.raises(RuntimeError, match="not running"):
        never_started.add_account(ALICE, ALICE_PW)
    with MailServer() as server:
        pass
    calls = [
        lambda: server.add_account(ALICE, ALICE_PW),
        lambda: server.remove_account(ALICE),
        lambda: server.accounts(),
        lambda: server.messages(ALICE),
        lambda: server.deliver(ALICE, raw()),
        lambda: server.wait_for_message(to=ALICE, timeout=0.1),
        lambda: server.assert_no_message(within=0.1),
        lambda: server.advance(10),
        lambda: server.reset(),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="not running: call start"):
            call()


def test_several_servers_at_once_are_separate():
    with MailServer() as one, MailServer() as two, MailServer(domains=["other.test"]) as three:
        ports = {
            p for s in (one, two, three) for p in (s.smtp_port, s.submission_port, s.pop3_port)
        }
        assert len(ports) == 9
        assert len({one.home, two.home, three.home}) == 3
        one.add_account(ALICE, ALICE_PW)
        two.add_account(ALICE, ALICE_PW)
        three.add_account("carol@other.test", "pw")
        send(one, ALICE, subject="to one")
        send(three, "carol@other.test", subject="to three")
        assert one.wait_for_message(to=ALICE).subject == "to one"
        assert three.wait_for_message(to="carol@other.test").subject == "to three"
        assert two.messages(ALICE) == []
        assert two.accounts() == [ALICE]
        assert three.accounts() == ["carol@other.test"]


def test_one_after_another_in_one_process():
    seen = set()
    for i in range(3):
        with MailServer() as server:
            seen.add(server.smtp_port)
            server.add_account(ALICE, ALICE_PW)
            send(server, ALICE, subject=f"round {i}")
            assert server.wait_for_message(to=ALICE).subject == f"round {i}"
            assert len(server.messages(ALICE)) == 1  # nothing left from the last round


def test_the_same_instance_restarted_starts_empty():
    server = MailServer()
    with server:
        server.add_account(ALICE, ALICE_PW)
        server.deliver(ALICE, raw("before"))
        old_home = server.home
    with server:
        assert server.home != old_home
        assert server.accounts() == []
        assert server.messages() == []
        server.add_account(ALICE, ALICE_PW)
        assert pop(server, ALICE, ALICE_PW).stat()[0] == 0


# --- TLS ----------------------------------------------------------------------------------


def test_tls_ports_and_a_strict_client(make):
    server = make(tls=True)
    assert server.smtps_port and server.pop3s_port
    ports = {server.smtp_port, server.submission_port, server.pop3_port}
    assert len(ports | {server.smtps_port, server.pop3s_port}) == 5
    ctx = server.client_ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    # Implicit TLS answers at once on both ports.
    assert greeting(server.host, server.smtps_port, ctx).startswith(b"220 ")
    assert greeting(server.host, server.pop3s_port, ctx).startswith(b"+OK")
    # A strict client: the chain verified, the host name checked, X.509 strict mode.
    strict = server.client_ssl_context()
    strict.check_hostname = True
    strict.verify_flags |= ssl.VERIFY_X509_STRICT
    assert greeting(server.host, server.smtps_port, strict).startswith(b"220 ")
    # ...and the verification is real: a client that does not trust the throwaway
    # certificate refuses it.
    stranger = ssl.create_default_context()
    stranger.check_hostname = False
    with pytest.raises(ssl.SSLCertVerificationError):
        greeting(server.host, server.smtps_port, stranger)


def test_tls_mail_over_smtps_starttls_pop3s_and_stls(make):
    server = make(tls=True)
    server.add_account(ALICE, ALICE_PW)
    ctx = server.client_ssl_context()
    with smtplib.SMTP_SSL(server.host, server.smtps_port, context=ctx, timeout=TIMEOUT) as s:
        s.sendmail(FAR, [ALICE], raw("implicit"))
    with smtp(server) as s:
        s.starttls(context=ctx)
        s.sendmail(FAR, [ALICE], raw("starttls"))
    implicit = server.wait_for_message(to=ALICE, subject="implicit")
    starttls = server.wait_for_message(to=ALICE, subject="starttls")
    for m in (implicit, starttls):
        assert m.tls is not None and m.tls.startswith("TLSv1.")
        assert m.authenticated is None
    p = poplib.POP3_SSL(server.host, server.pop3s_port, context=ctx, timeout=TIMEOUT)
    p.user(ALICE)
    p.pass_(ALICE_PW)
    assert p.stat()[0] == 2
    p.quit()
    p = poplib.POP3(server.host, server.pop3_port, timeout=TIMEOUT)
    p.stls(context=ctx)
    p.user(ALICE)
    p.pass_(ALICE_PW)
    assert p.stat()[0] == 2
    p.quit()


def test_client_ssl_context_needs_tls(box):
    with pytest.raises(RuntimeError, match="tls=True"):
        box.client_ssl_context()


# --- configuration overrides ------------------------------------------------------------


def test_a_misspelled_override_raises_at_construction_with_the_valid_names():
    with pytest.raises(TypeError) as e:
        MailServer(trusted_network="127.0.0.0/8")
    text = str(e.value)
    assert "trusted_network" in text
    assert "valid names:" in text
    for name in ("trusted_networks", "pop_before_smtp_ttl", "max_message_size", "block_duration"):
        assert name in text
    # Keys the fixture manages itself are not overrides.
    for managed in ("listen", "mail_dir", "accounts", "certificate"):
        assert managed not in OVERRIDES
        with pytest.raises(TypeError):
            MailServer(**{managed: "x"})


def test_a_bad_override_value_fails_start_and_leaves_nothing_behind():
    server = MailServer(max_message_size=0)
    with pytest.raises(ConfigError, match="max_message_size"):
        server.start()
    assert server.home is not None and not server.home.exists()
    with pytest.raises(RuntimeError, match="not running"):
        server.accounts()


def test_overrides_use_the_contract_names_and_apply(make):
    server = make(
        max_message_size=2000,
        max_recipients=2,
        pop_before_smtp_ttl=60,
        require_tls_for_auth=False,
        sender_must_match_login=False,
        block_duration=120,
        pop3_idle_timeout=900,
    )
    c = server.config
    assert c.smtp.max_message_size == 2000
    assert c.smtp.max_recipients == 2
    assert c.relay.pop_before_smtp_ttl == 60
    assert c.relay.sender_must_match_login is False
    assert c.limits.block_duration == 120
    assert c.pop3.idle_timeout == 900
    server.add_account(ALICE, ALICE_PW)
    server.add_account(BOB, BOB_PW)
    with smtp(server) as s:
        s.ehlo()
        assert s.esmtp_features["size"] == "2000"
        code, _ = s.mail(FAR)
        assert code == 250
        assert s.rcpt(ALICE)[0] == 250
        assert s.rcpt(BOB)[0] == 250
        assert s.rcpt("carol@example.test")[0] == 452  # max_recipients
        s.rset()
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            s.sendmail(FAR, [ALICE], raw(body="x" * 3000))  # SIZE says too big
        assert e.value.smtp_code == 552
    assert server.messages(ALICE) == []


def test_require_tls_for_auth_override_hides_auth(make):
    server = make(tls=True, require_tls_for_auth=True)
    with smtp(server) as s:
        s.ehlo()
        assert not s.has_extn("auth")
        s.starttls(context=server.client_ssl_context())
        s.ehlo()
        assert s.has_extn("auth")


def test_trusted_networks_default_empty_relay_from_loopback_refused(box):
    assert box.config.mailbox.trusted_networks == ()
    with smtp(box) as s:
        s.ehlo()
        s.mail(FAR)
        code, text = s.rcpt("bob@far.test")
    assert code == 554 and b"Relay access denied" in text
    box.assert_no_message(outbound=True, within=0.2)


@pytest.mark.parametrize("networks", ["127.0.0.0/8", ["127.0.0.0/8", "::1/128"]])
def test_trusted_networks_opt_out(make, networks):
    server = make(trusted_networks=networks)
    send(server, "bob@far.test", subject="relayed", sender="app@example.test")
    captured = server.wait_for_message(to="bob@far.test", outbound=True)
    assert captured.subject == "relayed"
    assert captured.authenticated is None


def test_an_idle_timeout_override_runs_on_the_servers_clock(make):
    server = make(idle_timeout=30)
    with socket.create_connection((server.host, server.smtp_port), timeout=TIMEOUT) as sock:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220 ")
        server.advance(31)  # not a real 30 s wait
        assert f.readline().startswith(b"421 4.4.2")
        assert f.readline() == b""  # and closed


# --- accounts --------------------------------------------------------------------------------


def test_add_account_works_at_once_on_both_protocols(box):
    assert box.accounts() == []
    box.add_account(ALICE, ALICE_PW)
    box.add_account(BOB, BOB_PW)
    assert sorted(box.accounts()) == [ALICE, BOB]
    with smtp(box, box.submission_port) as s:
        s.login(ALICE, ALICE_PW)
        s.sendmail(ALICE, [BOB], raw("internal", sender=ALICE))
    assert box.wait_for_message(to=BOB).authenticated == ALICE
    p = pop(box, BOB, BOB_PW)
    assert p.stat()[0] == 1
    p.quit()


def test_add_account_again_changes_the_password(box):
    box.add_account(ALICE, "old")
    box.add_account(ALICE, "new")
    assert box.accounts() == [ALICE]
    with pytest.raises(poplib.error_proto):
        pop(box, ALICE, "old")
    pop(box, ALICE, "new").quit()


def test_remove_account_really_removes_the_mailbox(box):
    box.add_account(ALICE, ALICE_PW)
    box.add_account(BOB, BOB_PW)
    send(box, ALICE, subject="first")
    box.wait_for_message(to=ALICE)
    box.deliver(BOB, raw("bob's"))
    box.remove_account(ALICE)
    assert box.accounts() == [BOB]
    assert box.messages(ALICE) == []
    assert len(box.messages(BOB)) == 1  # the others keep theirs
    with pytest.raises(poplib.error_proto):
        pop(box, ALICE, ALICE_PW)
    with smtp(box) as s:  # an unknown user again
        s.ehlo()
        s.mail(FAR)
        assert s.rcpt(ALICE)[0] == 550
    box.add_account(ALICE, ALICE_PW)
    p = pop(box, ALICE, ALICE_PW)
    assert p.stat() == (0, 0)  # a new, empty mailbox
    p.quit()
    assert box.messages(ALICE) == []


def test_account_addresses_must_be_local(box):
    with pytest.raises(ValueError, match="far.test"):
        box.add_account("x@far.test", "pw")
    with pytest.raises(ValueError):
        box.add_account("not an address", "pw")


# --- reading mail ----------------------------------------------------------------------------


def test_messages_in_arrival_order_with_their_fields(box):
    box.add_account(ALICE, ALICE_PW)
    box.add_account(BOB, BOB_PW)
    for i in range(3):
        send(box, ALICE, subject=f"number {i}")
        box.wait_for_message(to=ALICE, subject=f"number {i}")
    send(box, [ALICE, BOB], subject="both", sender="")
    box.wait_for_message(to=BOB, subject="both")
    arrived = box.messages(ALICE)
    assert [m.subject for m in arrived] == ["number 0", "number 1", "number 2", "both"]
    first = arrived[0]
    assert isinstance(first, Message)
    assert first.envelope_from == FAR
    assert first.recipients == (ALICE,)
    assert first.account == ALICE
    assert isinstance(first.raw, bytes) and b"\r\n" not in first.raw  # as stored: LF
    assert first.raw.startswith(b"Return-Path: <someone@far.test>\n")
    assert b"Received: " in first.raw
    assert isinstance(first.message, EmailMessage)
    assert first.message["From"] == FAR
    assert first.message.get_content().strip() == "hi there"
    assert first.authenticated is None and first.tls is None
    both = arrived[3]
    assert both.envelope_from == ""  # the null sender
    assert both.recipients == (ALICE, BOB)
    [bobs] = box.messages(BOB)
    assert bobs.account == BOB and bobs.recipients == (ALICE, BOB)
    assert "both" in repr(bobs)
    # messages() without an address: everything, in arrival order.
    assert [m.subject for m in box.messages()][-2:] == ["both", "both"]
    # Addresses compare case-insensitively.
    assert box.messages("ALICE@Example.Test") == arrived


def test_auth_over_starttls_sets_authenticated_and_tls(make):
    server = make(tls=True)
    server.add_account(ALICE, ALICE_PW)
    with smtp(server, server.submission_port) as s:
        s.starttls(context=server.client_ssl_context())
        s.login(ALICE, ALICE_PW)
        s.sendmail(ALICE, [ALICE], raw("secure", sender=ALICE))
    with smtp(server, server.submission_port) as s:
        s.login(ALICE, ALICE_PW)  # AUTH without TLS
        s.sendmail(ALICE, [ALICE], raw("plain", sender=ALICE))
    secure = server.wait_for_message(to=ALICE, subject="secure")
    assert secure.authenticated == ALICE
    assert secure.tls and secure.tls.startswith("TLSv1.")
    plain = server.wait_for_message(to=ALICE, subject="plain")
    assert plain.authenticated == ALICE and plain.tls is None


def test_wait_for_message_matches_by_to_subject_glob_and_predicate(box):
    box.add_account(ALICE, ALICE_PW)
    box.add_account(BOB, BOB_PW)
    send(box, ALICE, subject="Invoice 1")
    send(box, BOB, subject="Invoice 2")
    send(box, ALICE, subject="Welcome", sender="hello@far.test")
    assert box.wait_for_message(to=BOB).subject == "Invoice 2"
    assert box.wait_for_message(to=ALICE, subject="Invoice *").subject == "Invoice 1"
    assert box.wait_for_message(subject="*2").account == BOB
    found = box.wait_for_message(predicate=lambda m: m.envelope_from == "hello@far.test")
    assert found.subject == "Welcome"
    both = box.wait_for_message(to=ALICE, subject="W*", predicate=lambda m: "hi" in m.raw.decode())
    assert both.subject == "Welcome"


def test_wait_for_message_wakes_on_delivery():
    with MailServer() as server:
        server.add_account(ALICE, ALICE_PW)

        def later() -> None:
            time.sleep(0.3)
            send(server, ALICE, subject="from a thread")

        sender = threading.Thread(target=later)
        started = time.monotonic()
        sender.start()
        message = server.wait_for_message(to=ALICE, subject="from a thread", timeout=10)
        waited = time.monotonic() - started
        sender.join()
        assert message.subject == "from a thread"
        assert waited < 5  # woken by the delivery, well before the timeout


def test_wait_for_message_timeout_lists_what_arrived(box):
    box.add_account(ALICE, ALICE_PW)
    send(box, ALICE, subject="the wrong one")
    box.wait_for_message(to=ALICE)
    started = time.monotonic()
    with pytest.raises(AssertionError) as e:
        box.wait_for_message(to=ALICE, subject="the right one", timeout=0.3)
    assert time.monotonic() - started >= 0.3  # it waited the whole timeout
    text = str(e.value)
    assert "the right one" in text and "0.3" in text
    assert "the wrong one" in text  # what did arrive


def test_wait_for_message_to_a_non_local_address_raises_at_once(box):
    started = time.monotonic()
    with pytest.raises(ValueError, match="far.test"):
        box.wait_for_message(to="bob@far.test", timeout=30)
    with pytest.raises(ValueError):
        box.assert_no_message(to="bob@far.test", within=30)
    assert time.monotonic() - started < 10  # not after the timeout


def test_assert_no_message(box):
    box.add_account(ALICE, ALICE_PW)
    box.assert_no_message(to=ALICE, within=0.1)
    send(box, ALICE, subject="spam")
    box.wait_for_message(to=ALICE)
    box.assert_no_message(to=ALICE, subject="ham", within=0.1)
    with pytest.raises(AssertionError, match="unexpected message.*spam"):
        box.assert_no_message(to=ALICE, subject="sp*", within=0.1)
    with pytest.raises(AssertionError):
        box.assert_no_message(within=0.1)  # any message at all


def test_deliver_puts_a_message_straight_into_a_mailbox(box):
    box.add_account(ALICE, ALICE_PW)
    delivered = box.deliver(
        ALICE, b"Subject: straight in\r\nFrom: x@far.test\r\n\r\nline 1\r\n.dot\r\n", "x@far.test"
    )
    assert delivered.subject == "straight in"
    assert delivered.envelope_from == "x@far.test"
    assert delivered.account == ALICE
    assert box.messages(ALICE) == [delivered]
    assert box.wait_for_message(to=ALICE, subject="straight in") == delivered
    p = pop(box, ALICE, ALICE_PW)
    assert p.stat()[0] == 1
    _, lines, _ = p.retr(1)
    assert b"Subject: straight in" in lines
    assert lines[-2:] == [b"line 1", b".dot"]  # dot-stuffing undone by poplib
    assert b"Return-Path: <x@far.test>" in lines
    p.quit()
    with pytest.raises(ValueError):
        box.deliver("x@far.test", raw())


# --- outbound capture ---------------------------------------------------------------------


def test_relayed_mail_is_captured(box):
    box.add_account(ALICE, ALICE_PW)
    with smtp(box, box.submission_port) as s:
        s.login(ALICE, ALICE_PW)
        s.sendmail(ALICE, ["Bob@Far.Test", "carol@elsewhere.test", ALICE], raw("out", sender=ALICE))
    captured = box.wait_for_message(to="bob@far.test", outbound=True)  # case-insensitive
    assert captured.subject == "out"
    assert captured.envelope_from == ALICE
    assert captured.account is None
    assert b"\r\n" in captured.raw and b"with ESMTPA" in captured.raw  # as sent on
    box.wait_for_message(to="carol@elsewhere.test", outbound=True)
    assert {r.lower() for m in box.outbound for r in m.recipients} == {
        "bob@far.test",
        "carol@elsewhere.test",
    }
    assert box.outbound[0] is box.wait_for_message(outbound=True, subject="out")
    # The local copy is not in outbound, and the relayed ones are not in messages().
    assert [m.subject for m in box.messages(ALICE)] == ["out"]
    assert all(m.account == ALICE for m in box.messages())


def test_wait_for_outbound_message_wakes_on_capture(make):
    server = make(trusted_networks="127.0.0.0/8")
    threading.Timer(0.3, send, (server, "x@far.test"), {"subject": "later"}).start()
    captured = server.wait_for_message(outbound=True, subject="later", timeout=10)
    assert captured.recipients == ("x@far.test",)
    with pytest.raises(AssertionError, match="later"):
        server.wait_for_message(outbound=True, subject="never", timeout=0.2)


# --- time -------------------------------------------------------------------------------------


def relay_reply(server) -> int:
    with smtp(server) as s:
        s.ehlo()
        s.mail(ALICE)
        return s.rcpt("bob@far.test")[0]


def test_pop_before_smtp_expires_after_advance(box):
    box.add_account(ALICE, ALICE_PW)
    assert relay_reply(box) == 554
    pop(box, ALICE, ALICE_PW).quit()
    assert relay_reply(box) == 250
    box.advance(1800)
    assert relay_reply(box) == 250  # half way
    box.advance(1801)
    assert relay_reply(box) == 554  # the hour is up


def test_pop_before_smtp_ttl_override_with_advance(make):
    server = make(pop_before_smtp_ttl=60)
    server.add_account(ALICE, ALICE_PW)
    pop(server, ALICE, ALICE_PW).quit()
    assert relay_reply(server) == 250
    server.advance(61)
    assert relay_reply(server) == 554


def fail_logins(server, times: int) -> None:
    for _ in range(times):
        p = poplib.POP3(server.host, server.pop3_port, timeout=TIMEOUT)
        p.user(ALICE)
        with pytest.raises(poplib.error_proto):
            p.pass_("wrong")
        p.close()


def test_a_block_expires_after_advance(make):
    server = make(auth_failures=3)
    server.add_account(ALICE, ALICE_PW)
    fail_logins(server, 3)
    assert b"Too many authorization failures" in greeting(server.host, server.pop3_port)
    assert b"554" in greeting(server.host, server.smtp_port)
    server.advance(3601)
    assert greeting(server.host, server.pop3_port).startswith(b"+OK")
    pop(server, ALICE, ALICE_PW).quit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_deferred_outbound_retry_comes_due_after_advance(make, tmp_path):
    port = free_port()  # nothing listens there yet: the first attempt is refused
    server = make(smarthost=f"127.0.0.1:{port}")
    server.add_account(ALICE, ALICE_PW)
    with smtp(server, server.submission_port) as s:
        s.login(ALICE, ALICE_PW)
        s.sendmail(ALICE, ["bob@far.test"], raw("retry me", sender=ALICE))
    queue = server.appliance.outbound
    deadline = time.monotonic() + TIMEOUT
    while not any(r.attempts for e in queue.entries.values() for r in e.recipients):
        assert time.monotonic() < deadline, "the first attempt never happened"
        time.sleep(0.05)
    [entry] = queue.entries.values()
    assert entry.recipients[0].status == "deferred"
    out = tmp_path / "captured"
    sink = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "capture_smtp.py"), "--port", str(port)]
        + ["--out", str(out)],
        stdout=subprocess.DEVNULL,
    )
    try:
        while not (out / ".ready").exists():
            assert sink.poll() is None and time.monotonic() < deadline + TIMEOUT
            time.sleep(0.05)
        server.advance(3600)  # the retry (and the unreachable host's pause) come due
        deadline = time.monotonic() + TIMEOUT
        while not list(out.glob("*.json")):
            assert time.monotonic() < deadline, "the retry did not happen after advance()"
            time.sleep(0.05)
        [envelope] = [json.loads(p.read_text()) for p in out.glob("*.json")]
        assert envelope["rcpt_to"] == ["bob@far.test"]
    finally:
        sink.terminate()
        sink.wait(TIMEOUT)


# --- faults -----------------------------------------------------------------------------------


def test_fault_on_rcpt_matching_an_address_applies_once(box):
    box.add_account(ALICE, ALICE_PW)
    box.add_account("bad@example.test", "pw")
    rule = box.faults.on("smtp.RCPT", match="bad@*", reply=(550, "5.1.1 no"), times=1)
    with smtp(box) as s:
        s.ehlo()
        s.mail(FAR)
        assert s.rcpt(ALICE) == (250, b"2.1.5 Ok")  # does not match: not used up
        assert s.rcpt("bad@example.test") == (550, b"5.1.1 no")
        assert s.rcpt("bad@example.test")[0] == 250  # times=1: the real answer again
    assert rule.hits == 1
    assert box.faults.rules == []


def test_fault_on_data_answers_every_time_until_cleared(box):
    box.add_account(ALICE, ALICE_PW)
    box.faults.on("smtp.DATA", reply=(451, "4.3.0 later"))
    for _ in range(2):
        with pytest.raises(smtplib.SMTPDataError) as e:
            send(box, ALICE)
        assert (e.value.smtp_code, e.value.smtp_error) == (451, b"4.3.0 later")
    box.assert_no_message(to=ALICE, within=0.1)
    box.faults.clear()
    send(box, ALICE, subject="now")
    assert box.wait_for_message(to=ALICE).subject == "now"


def test_fault_on_pop3_retr(box):
    box.add_account(ALICE, ALICE_PW)
    box.deliver(ALICE, raw("in the box"))
    box.faults.on("pop3.RETR", reply="-ERR broken")
    p = pop(box, ALICE, ALICE_PW)
    assert p.stat()[0] == 1  # other commands are untouched
    with pytest.raises(poplib.error_proto, match="-ERR broken"):
        p.retr(1)
    box.faults.clear()
    assert b"Subject: in the box" in p.retr(1)[1]
    p.quit()


def test_fault_drop_closes_the_connection(box):
    box.add_account(ALICE, ALICE_PW)
    box.faults.on("smtp.MAIL", drop=True, times=1)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        send(box, ALICE, subject="dropped")
    send(box, ALICE, subject="second try")  # times=1: the next connection works
    assert [m.subject for m in box.messages(ALICE)] == ["second try"]
    box.faults.on("pop3.PASS", drop=True)
    with pytest.raises((poplib.error_proto, OSError)):
        pop(box, ALICE, ALICE_PW)


def test_fault_delay_keeps_the_order_of_pipelined_commands(box):
    box.add_account(ALICE, ALICE_PW)
    box.faults.on("smtp.NOOP", delay=0.2, reply=(250, "2.0.0 delayed"))
    box.faults.on("smtp.RCPT", delay=0.05)  # no reply: the real answer, later
    with socket.create_connection((box.host, box.smtp_port), timeout=TIMEOUT) as sock:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(
            b"HELO client\r\nNOOP\r\nHELP\r\nMAIL FROM:<x@far.test>\r\n"
            b"RCPT TO:<alice@example.test>\r\nRSET\r\nQUIT\r\n"
        )
        replies = [f.readline() for _ in range(7)]
    assert replies[0].startswith(b"250 ")  # HELO
    assert replies[1] == b"250 2.0.0 delayed\r\n"  # NOOP, delayed, still before HELP's
    assert replies[2].startswith(b"214 ")  # HELP
    assert replies[3].startswith(b"250 2.1.0")  # MAIL
    assert replies[4].startswith(b"250 2.1.5")  # RCPT, delayed, the real answer
    assert replies[5].startswith(b"250 ")  # RSET
    assert replies[6].startswith(b"221 ")  # QUIT


def test_fault_delay_is_on_the_servers_clock(box):
    box.add_account(ALICE, ALICE_PW)
    box.deliver(ALICE, raw())
    rule = box.faults.on("pop3.STAT", delay=300)  # within the POP3 autologout
    p = pop(box, ALICE, ALICE_PW)
    answers = []
    asking = threading.Thread(target=lambda: answers.append(p.stat()))
    asking.start()
    deadline = time.monotonic() + TIMEOUT
    while rule.hits == 0:  # the STAT has reached the server
        assert time.monotonic() < deadline
        time.sleep(0.01)
    box.advance(300)  # five minutes' delay, over at once
    asking.join(TIMEOUT)
    assert answers and answers[0][0] == 1
    p.quit()


def test_faults_reject_bad_rules(box):
    with pytest.raises(ValueError, match="smtp.COMMAND"):
        box.faults.on("imap.FETCH", reply="x")
    with pytest.raises(ValueError, match="reply=, drop=True or delay="):
        box.faults.on("smtp.RCPT")
    with pytest.raises(TypeError):
        box.faults.on("smtp.RCPT", reply="550 no")
    with pytest.raises(TypeError):
        box.faults.on("pop3.RETR", reply=(550, "no"))
    with pytest.raises(ValueError):
        box.faults.on("smtp.RCPT", reply=(550, "5.1.1 no"), times=0)


# --- reset --------------------------------------------------------------------------------------


def test_reset_clears_everything(make):
    server = make(auth_failures=3)
    server.advance(7200)
    server.add_account(ALICE, ALICE_PW)
    server.add_account(BOB, BOB_PW)
    send(server, BOB, subject="old")
    server.wait_for_message(to=BOB)
    pop(server, ALICE, ALICE_PW).quit()  # a POP-before-SMTP authorisation
    with smtp(server) as s:
        s.sendmail(ALICE, ["x@far.test"], raw("relayed", sender=ALICE))
    server.wait_for_message(outbound=True)
    server.faults.on("smtp.NOOP", reply=(500, "5.0.0 faulty"))
    fail_logins(server, 3)  # 127.0.0.1 blocked
    assert b"Too many" in greeting(server.host, server.pop3_port)

    server.reset()

    assert server.accounts() == []
    assert server.messages() == [] and server.messages(BOB) == []
    assert server.outbound == []
    assert server.faults.rules == []
    assert abs(server.clock.seconds() - time.time()) < 60  # back to real time
    assert greeting(server.host, server.pop3_port).startswith(b"+OK")  # no block
    server.add_account(ALICE, ALICE_PW)
    assert relay_reply(server) == 554  # no POP authorisation left
    with smtp(server) as s:
        assert s.noop()[0] == 250  # no fault
    send(server, ALICE, subject="new")  # it works as before
    assert [m.subject for m in server.messages(ALICE)] == ["new"]
    with smtp(server, server.submission_port) as s:
        s.login(ALICE, ALICE_PW)
        s.sendmail(ALICE, ["x@far.test"], raw("relayed again", sender=ALICE))
    assert server.wait_for_message(outbound=True).subject == "relayed again"
    # The accounts and mailboxes are gone: added again, they start empty.
    server.add_account(BOB, BOB_PW)
    assert pop(server, BOB, BOB_PW).stat() == (0, 0)


# --- the subprocess mode ------------------------------------------------------------------------


def test_process_mode_gives_the_same_api():
    with MailServer(process=True, auth_failures=3) as server:
        assert server.host == "127.0.0.1"
        assert greeting(server.host, server.smtp_port).startswith(b"220 ")
        assert greeting(server.host, server.pop3_port).startswith(b"+OK")
        server.add_account(ALICE, ALICE_PW)
        assert server.accounts() == [ALICE]
        send(server, ALICE, subject="to the child")
        message = server.wait_for_message(to=ALICE, subject="to the*", timeout=10)
        assert isinstance(message, Message)
        assert message.envelope_from == FAR and message.recipients == (ALICE,)
        with pytest.raises(AssertionError, match="to the child"):
            server.wait_for_message(to=ALICE, subject="other", timeout=0.2)
        with pytest.raises(ValueError):
            server.wait_for_message(to="x@far.test")
        server.deliver(ALICE, raw("delivered"))
        p = pop(server, ALICE, ALICE_PW)
        assert p.stat()[0] == 2
        p.quit()
        assert relay_reply(server) == 250  # POP before SMTP
        server.advance(3601)
        assert relay_reply(server) == 554
        server.faults.on("smtp.RCPT", match="bad@*", reply=(550, "5.1.1 no"), times=1)
        with smtp(server) as s:
            s.ehlo()
            s.mail(FAR)
            assert s.rcpt("bad@example.test")[0] == 550
        server.reset()
        assert server.accounts() == [] and server.messages() == []
    with pytest.raises(RuntimeError, match="not running"):
        server.accounts()


def test_process_mode_rejects_a_misspelled_override():
    with pytest.raises(TypeError, match="valid names"):
        MailServer(process=True, max_mesage_size=10)


def test_python_m_mailboxd_testing_writes_a_ready_file(tmp_path):
    ready = tmp_path / "ports.json"
    child = subprocess.Popen(
        [sys.executable, "-m", "mailboxd.testing", "--ready-file", str(ready)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        assert greeting("127.0.0.1", info["smtp_port"]).startswith(b"220 ")
        assert greeting("127.0.0.1", info["pop3_port"]).startswith(b"+OK")
        with socket.create_connection(("127.0.0.1", info["control_port"]), timeout=10) as sock:
            f = sock.makefile("rwb")
            f.write(b'{"op": "accounts"}\n{"op": "stop"}\n')
            f.flush()
            assert json.loads(f.readline()) == {"ok": []}
            assert json.loads(f.readline()) == {"ok": None}
        assert child.wait(15) == 0
    finally:
        if child.poll() is None:
            child.kill()
