"""Black-box tests of haproxy: listeners: the real server behind a "balancer"
that is this test, on loopback. The PROXY header may claim any address; the
traffic itself only ever goes to 127.0.0.1.

The balancer connects from 127.0.0.1 (the only address in proxy_networks)
and claims 127.0.0.9; the server's checks, Received header, log and
POP-before-SMTP must see 127.0.0.9.
"""

from __future__ import annotations

import configparser
import ipaddress
import re
import struct

import pytest
from conftest import ALICE, ALICE_PW, MailServer, client_tls_context, free_port
from test_blackbox import Raw, wait_for
from test_relay_blackbox import FAR, rcpt_from, relay_denied
from test_workers_blackbox import child_pid, only

pytestmark = pytest.mark.blackbox

CLIENT = "127.0.0.9"  # what the balancer says the client is
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: str = CLIENT, port: int = 51000) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {port} 25\r\n".encode()


def v2(source: str = CLIENT, port: int = 51000) -> bytes:
    addresses = (
        ipaddress.IPv4Address(source).packed
        + ipaddress.IPv4Address("127.0.0.1").packed
        + struct.pack("!HH", port, 25)
    )
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses


def with_proxied_listeners(server: MailServer, kind: str = "tcp") -> tuple[int, int]:
    """Add a haproxy:`kind`: SMTP and POP3 listener to `server` (not started
    yet); their ports."""
    smtp, pop3 = free_port(), free_port()
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(server.config)
    parser["smtp"]["listen"] += f" haproxy:{kind}:{smtp}:interface=127.0.0.1"
    parser["pop3"]["listen"] += f" haproxy:{kind}:{pop3}:interface=127.0.0.1"
    with server.config.open("w") as f:
        parser.write(f)
    return smtp, pop3


@pytest.fixture
def proxied(make_server):
    """start(extra): a server trusting no network, whose balancer is
    127.0.0.1, with haproxy: listeners; (server, smtp port, pop3 port)."""
    made: list[MailServer] = []

    def start(extra: str = "", kind: str = "tcp") -> tuple[MailServer, int, int]:
        server = make_server(
            "[mailbox]\ntrusted_networks =\nproxy_networks = 127.0.0.1/32\n" + extra,
            tls=kind == "tls",
        )
        server.add_test_accounts()
        ports = with_proxied_listeners(server, kind)
        made.append(server)
        server.start()
        return server, *ports

    yield start
    for server in made:
        server.stop()
        server.check_log()


def through_balancer(port: int, header: bytes, source: str = "127.0.0.1") -> Raw:
    r = Raw(port, source=source)
    r.send(header)
    return r


def pop_login(port: int, header: bytes) -> None:
    r = through_balancer(port, header)
    assert r.line().startswith("+OK"), "no greeting"
    r.send(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\n")
    assert r.line().startswith("+OK")
    reply = r.line()
    assert reply.startswith("+OK"), reply
    r.send("QUIT\r\n")
    assert r.line().startswith("+OK")
    assert r.closed()
    r.close()


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
def test_pop_login_through_the_balancer_authorises_the_client_not_the_balancer(proxied, header):
    server, _smtp, pop3 = proxied()
    assert rcpt_from(server, CLIENT) == relay_denied()

    pop_login(pop3, header())

    # The client itself, on a plain listener, may now relay; the balancer may not.
    assert rcpt_from(server, CLIENT) == "250 2.1.5 Ok"
    assert rcpt_from(server, "127.0.0.1") == relay_denied()
    assert f"pop3 login {ALICE} from {CLIENT}" in server.log()
    assert wait_for(lambda: f"pop3 session from {CLIENT}:" in server.log()), server.log()


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
def test_smtp_through_the_balancer_sees_the_client(proxied, header):
    server, smtp, _pop3 = proxied()
    r = through_balancer(smtp, header())
    greeting = r.reply()
    assert greeting == "220 mail.example.test ESMTP Mailbox", greeting
    for line, code in (
        ("EHLO client.far.test", "250 "),
        (f"MAIL FROM:<{FAR}>", "250 "),
        (f"RCPT TO:<{ALICE}>", "250 "),
        ("DATA", "354 "),
        ("Subject: proxied\r\n\r\nhello\r\n.", "250 "),
    ):
        r.send(line + "\r\n")
        reply = r.reply()
        assert reply.startswith(code), (line, reply)
    r.send("QUIT\r\n")
    assert r.reply().startswith("221")
    r.close()
    [message] = server.messages(ALICE)
    received = message.read_bytes()
    assert f"Received: from client.far.test ([{CLIENT}])".encode() in received, received
    assert b"[127.0.0.1]" not in received
    assert wait_for(lambda: f"smtp session from {CLIENT} on" in server.log()), server.log()


def test_the_connection_cap_counts_the_client_not_the_balancer(proxied):
    server, smtp, _pop3 = proxied("[limits]\nconnections_per_ip = 1\n")
    first = through_balancer(smtp, v1("127.0.0.10"))
    assert first.reply().startswith("220 ")
    # Another client through the same balancer is served...
    second = through_balancer(smtp, v1("127.0.0.11"))
    assert second.reply().startswith("220 ")
    # ...the same client again is not.
    third = through_balancer(smtp, v2("127.0.0.10"))
    assert third.reply() == "421 4.7.0 Too many connections from 127.0.0.10"
    for r in (first, second, third):
        r.close()


def test_a_connection_from_outside_proxy_networks_is_closed_without_a_greeting(proxied):
    server, smtp, pop3 = proxied()
    for port in (smtp, pop3):
        r = through_balancer(port, v1(), source="127.0.0.5")
        assert r.closed()  # nothing at all, then the end
        assert r.buf == b""
        r.close()
    line = "PROXY connection from 127.0.0.5 closed: not in [mailbox] proxy_networks"
    assert wait_for(lambda: server.log().count(line) == 2), server.log()
    assert "127.0.0.9" not in server.log()


def test_a_client_that_sends_no_header_is_closed_without_a_greeting(proxied):
    server, smtp, _pop3 = proxied()
    r = through_balancer(smtp, b"EHLO direct.client\r\n")
    assert r.closed() and r.buf == b""
    r.close()
    assert wait_for(lambda: "closed: not a PROXY header (it began EHLO" in server.log())


def test_a_health_check_is_the_balancers_own_session(proxied):
    server, smtp, _pop3 = proxied()
    local = V2_SIGNATURE + b"\x20\x00\x00\x00"  # v2 LOCAL
    r = through_balancer(smtp, local + b"QUIT\r\n")
    assert r.reply().startswith("220 ")
    assert r.reply().startswith("221 ")
    r.close()
    assert wait_for(lambda: "smtp session from 127.0.0.1 on" in server.log()), server.log()


def test_a_worker_process_reads_the_header_too(proxied):
    server, smtp, pop3 = proxied("workers = 2\n")  # in [mailbox]
    child_pid(server)
    with only(server, "child"):
        pop_login(pop3, v1())
        r = through_balancer(smtp, v2("127.0.0.12"))
        assert r.reply().startswith("220 ")
        r.send("QUIT\r\n")
        assert r.reply().startswith("221 ")
        r.close()
        r = through_balancer(smtp, v1(), source="127.0.0.5")
        assert r.closed() and r.buf == b""
        r.close()

    def by_child(pattern: str) -> bool:
        return any(
            re.search(pattern, line) and "worker 1" in line for line in server.log().splitlines()
        )

    assert wait_for(lambda: by_child(r"smtp session from 127\.0\.0\.12 on")), server.log()
    assert wait_for(lambda: by_child(r"PROXY connection from 127\.0\.0\.5 closed")), server.log()
    assert rcpt_from(server, CLIENT) == "250 2.1.5 Ok"


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
def test_implicit_tls_behind_the_balancer_comes_after_the_header(proxied, header):
    server, smtp, pop3 = proxied(kind="tls")
    for port, greeting in ((smtp, b"220 mail.example.test ESMTP"), (pop3, b"+OK")):
        r = through_balancer(port, header())
        # The header in the clear, then TLS from the client's first byte after it.
        tls = client_tls_context().wrap_socket(r.sock, server_hostname="mail.example.test")
        assert tls.recv(1024).startswith(greeting)
        tls.sendall(b"QUIT\r\n")
        tls.recv(1024)
        tls.close()
    assert wait_for(lambda: f"smtp session from {CLIENT} on listen" in server.log()), server.log()
    assert wait_for(lambda: f"pop3 session from {CLIENT}:" in server.log()), server.log()
