"""STARTTLS/STLS over StringTransport, the reloading context, the self-signed
certificate and the TLS config checks."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import TWISTD, unit_config
from test_pop3 import Session as POP
from test_smtp import Session as SMTP
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailboxd.config import ConfigError, parse
from mailboxd.tls import ServerTLS, TLSConfigError, make_self_signed


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("certs")
    make_self_signed("mail.example.test", d / "cert.pem", d / "key.pem")
    return d / "cert.pem", d / "key.pem"


@pytest.fixture
def tls_unit(unit, certs):
    unit.tls = ServerTLS(*certs, unit.clock)
    return unit


class Recorder:
    def __init__(self) -> None:
        self.calls: list = []

    def __call__(self, ctx) -> None:
        self.calls.append(ctx)


def smtp(unit, **kw) -> SMTP:
    s = SMTP(unit, **kw)
    s.proto.factory.tls = getattr(unit, "tls", None)
    s.transport.startTLS = Recorder()
    return s


def pop(unit) -> POP:
    p = POP(unit)
    p.proto.factory.tls = getattr(unit, "tls", None)
    p.transport.startTLS = Recorder()
    return p


def test_starttls_is_offered_only_with_a_certificate(unit, tls_unit):
    assert "250-STARTTLS" in smtp(tls_unit).send("EHLO client.test\r\n")
    unit.tls = None
    assert not any("STARTTLS" in r for r in smtp(unit).send("EHLO client.test\r\n"))
    assert smtp(unit).cmd("STARTTLS") == "502 5.5.1 Error: TLS not available"


def test_starttls_discards_pipelined_plaintext_and_resets_the_session(tls_unit):
    s = smtp(tls_unit)
    s.cmd("EHLO client.test")
    out = s.send(
        "STARTTLS\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
    )
    assert out == ["220 2.0.0 Ready to start TLS"]  # nothing behind it was answered
    assert s.transport.startTLS.calls == [tls_unit.tls]
    # The session starts over: EHLO first, no transaction survived.
    assert s.cmd("MAIL FROM:<alice@example.test>") == "503 5.5.1 Error: send HELO/EHLO first"


def test_starttls_forgets_a_plaintext_authentication(tls_unit):
    from test_relay import ALICE_PLAIN

    s = smtp(tls_unit)
    s.cmd("EHLO client.test")
    assert s.cmd(f"AUTH PLAIN {ALICE_PLAIN}").startswith("235")
    s.cmd("STARTTLS")
    s.cmd("EHLO client.test")
    assert s.cmd("MAIL FROM:<bob@far.test>") == "250 2.1.0 Ok"  # no login, so no sender check
    assert s.cmd("RCPT TO:<x@far.test>").startswith("554 5.7.1")


def test_starttls_syntax(tls_unit):
    s = smtp(tls_unit)
    s.cmd("EHLO client.test")
    assert s.cmd("STARTTLS now") == "501 5.5.4 Syntax: STARTTLS"


def test_stls_discards_pipelined_plaintext(tls_unit):
    p = pop(tls_unit)
    assert "STLS" in p.multi("CAPA")
    out = p.raw("USER alice@example.test\r\nSTLS\r\nPASS alice pw\r\nSTAT\r\n")
    assert out == b"+OK send your password\r\n+OK Begin TLS negotiation\r\n"
    assert p.transport.startTLS.calls == [tls_unit.tls]
    assert p.cmd("PASS alice pw") == "-ERR send USER first"  # USER was forgotten


def test_stls_only_before_login(tls_unit):
    p = pop(tls_unit)
    p.login()
    assert p.cmd("STLS") == "-ERR STLS is only allowed before login"
    assert "STLS" not in p.multi("CAPA")


def test_require_tls_for_auth_hides_plaintext_logins(tls_unit, tmp_path):
    tls_unit.config = unit_config(tmp_path, "require_tls_for_auth = yes\n")
    s = smtp(tls_unit)
    replies = s.send("EHLO client.test\r\n")
    assert "250-STARTTLS" in replies[:-1] or replies[-1] == "250 STARTTLS"
    assert not any("AUTH" in r for r in replies)
    assert s.cmd("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZSBwdw==").startswith("538 5.7.11")
    p = pop(tls_unit)
    caps = p.multi("CAPA")
    assert "STLS" in caps and "USER" not in caps and "SASL PLAIN" not in caps
    assert (
        p.cmd("USER alice@example.test")
        == "-ERR [AUTH] Authentication needs TLS here: send STLS first"
    )
    assert p.cmd("AUTH PLAIN").startswith("-ERR [AUTH]")


# --- the context ---------------------------------------------------------------


def test_a_renewed_certificate_is_used_without_a_restart(unit, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_self_signed("one.example.test", cert, key)
    tls = ServerTLS(cert, key, unit.clock)
    first = tls.getContext()
    cert.unlink()
    key.unlink()
    make_self_signed("two.example.test", cert, key)
    assert tls.getContext() is first  # checked at most once a second
    unit.clock.advance(1)
    assert tls.getContext() is not first


def test_a_broken_renewal_keeps_the_last_good_certificate(unit, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_self_signed("one.example.test", cert, key)
    tls = ServerTLS(cert, key, unit.clock)
    first = tls.getContext()
    cert.write_text("not a certificate")
    unit.clock.advance(1)
    assert tls.getContext() is first


@pytest.mark.parametrize("broken", ["missing", "garbage", "mismatch"])
def test_an_unusable_certificate_is_one_clear_error(tmp_path, broken, certs):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    if broken == "garbage":
        cert.write_text("garbage")
        key.write_bytes(certs[1].read_bytes())
    elif broken == "mismatch":
        make_self_signed("x.example.test", tmp_path / "other.pem", tmp_path / "otherkey.pem")
        cert.write_bytes(certs[0].read_bytes())
        key.write_bytes((tmp_path / "otherkey.pem").read_bytes())
    from twisted.internet.task import Clock

    with pytest.raises(TLSConfigError) as e:
        ServerTLS(cert, key, Clock())
    assert "\n" not in str(e.value)
    assert str(cert) in str(e.value) or str(key) in str(e.value)


def test_self_signed_certificate(tmp_path):
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    assert make_self_signed("mail.example.test", cert, key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    from cryptography import x509

    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.test"]
    before = cert.read_bytes()
    assert not make_self_signed("mail.example.test", cert, key)  # never replaced
    assert cert.read_bytes() == before


def test_implicit_tls_endpoint_needs_a_certificate(tmp_path):
    with pytest.raises(ConfigError, match=r"\[smtp\] 'tls:2465' needs \[tls\] certificate"):
        parse("[smtp]\nlisten = tls:2465\n", tmp_path / "x.ini")
    with pytest.raises(ConfigError, match="tls:nope"):
        parse(
            "[pop3]\nlisten = tls:nope\n[tls]\ncertificate = a\nprivate_key = b\n",
            tmp_path / "x.ini",
        )


# --- the implicit-TLS endpoint: a parser plugin Twisted finds ----------------------


def test_twisted_finds_the_implicit_tls_parser_by_its_prefix(certs):
    from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
    from twisted.internet.testing import MemoryReactorClock

    from mailboxd.tls import ImplicitTLSEndpoint, endpoint_string, with_certificate

    reactor = MemoryReactorClock()
    description = endpoint_string(r"tls:2465:interface=\:\::backlog=64")
    assert description == r"mailbox-tls:2465:interface=\:\::backlog=64"
    endpoint = serverFromString(reactor, with_certificate(description, *certs))
    assert isinstance(endpoint, ImplicitTLSEndpoint)
    assert isinstance(endpoint.endpoint, TCP4ServerEndpoint)
    assert (endpoint.certificate, endpoint.private_key) == certs
    served = ServerFactory.forProtocol(Protocol)
    endpoint.listen(served)
    port, factory, backlog, interface = reactor.tcpServers[0]
    assert (port, backlog, interface) == (2465, 64, "::")
    assert isinstance(factory, TLSMemoryBIOFactory) and factory.wrappedFactory is served


def test_the_certificate_is_escaped_and_the_key_defaults_to_it(tmp_path):
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    from mailboxd.tls import with_certificate

    odd = tmp_path / "a:b\\c.pem"
    endpoint = serverFromString(MemoryReactor(), with_certificate("mailbox-tls:0", odd, odd))
    assert endpoint.certificate == endpoint.private_key == odd
    endpoint = serverFromString(MemoryReactor(), "mailbox-tls:0:certKey=/etc/both.pem")
    assert endpoint.certificate == endpoint.private_key == Path("/etc/both.pem")


@pytest.mark.parametrize(
    ("description", "error"),
    [
        ("mailbox-tls:nope", ValueError),
        ("mailbox-tls:65536", ValueError),
        ("mailbox-tls:-1", ValueError),
        ("mailbox-tls:465:backlog=many", ValueError),
        ("mailbox-tls:465:backlog=0", ValueError),
        ("mailbox-tls:465:privateKey=/k.pem", ValueError),
        ("mailbox-tls:465:colour=blue", TypeError),
        ("mailbox-tls:465:127.0.0.1:50:/c.pem", TypeError),  # certKey= is a keyword
        ("mailbox-tls", TypeError),
    ],
)
def test_twisted_refuses_a_wrong_implicit_tls_string(description, error):
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    with pytest.raises(error):
        serverFromString(MemoryReactor(), description)


def test_an_implicit_tls_endpoint_loads_its_certificate_when_it_listens(tmp_path, certs):
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactorClock

    from mailboxd.tls import with_certificate

    reactor = MemoryReactorClock()
    missing = tmp_path / "missing.pem"
    endpoint = serverFromString(reactor, with_certificate("mailbox-tls:0", missing, certs[1]))
    failed = []
    endpoint.listen(ServerFactory()).addErrback(failed.append)
    assert failed[0].check(TLSConfigError) and str(missing) in str(failed[0].value)
    unready = serverFromString(reactor, "mailbox-tls:0")  # as the config check parses it
    failed.clear()
    unready.listen(ServerFactory()).addErrback(failed.append)
    assert "needs certKey=" in str(failed[0].value)
    assert reactor.tcpServers == []


def test_the_config_takes_tls_as_documented_and_nothing_of_the_plugin(tmp_path):
    tls = "[tls]\ncertificate = a\nprivate_key = b\n"
    config = parse(f"[pop3]\nlisten = tls:1995:interface=127.0.0.1\n{tls}", tmp_path / "x.ini")
    assert config.pop3.listen == ("tls:1995:interface=127.0.0.1",)
    for word in ("tls:1995:certKey=/etc/c.pem", "mailbox-tls:1995", "tls:70000"):
        with pytest.raises(ConfigError, match=r"x\.ini: .*\[pop3\] listen = '" + word):
            parse(f"[pop3]\nlisten = {word}\n{tls}", tmp_path / "x.ini")


def test_twistd_with_an_unreadable_certificate_says_one_line(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "mailbox.ini").write_text(
        "[smtp]\nlisten = tcp:0:interface=127.0.0.1\nsubmission =\n[pop3]\nlisten =\n"
        "[tls]\ncertificate = etc/missing.pem\nprivate_key = etc/missing-key.pem\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out = subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "mailbox"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    text = (out.stdout + out.stderr).strip()
    assert "Traceback" not in text
    assert text.splitlines()[-1].startswith(
        "mailbox: etc/missing.pem: cannot load the TLS certificate"
    )
