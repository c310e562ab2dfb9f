"""Config: the embedded default, every mistake as one clear line, and twistd start-up."""

from __future__ import annotations

import configparser
import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from mailboxd import config
from mailboxd.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "etc" / "mailbox.ini"
TWISTD = Path(sys.executable).parent / "twistd"

# The keys DESIGN.md fixes; the code may add keys, never drop these.
CONTRACT_KEYS = {
    "mailbox": [
        "hostname",
        "domains",
        "domain_aliases",
        "accounts",
        "aliases",
        "mail_dir",
        "trusted_networks",
    ],
    "smtp": ["listen", "submission", "max_message_size", "max_recipients", "require_tls_for_auth"],
    "pop3": ["listen"],
    "relay": ["pop_before_smtp_ttl", "sender_must_match_login", "smarthost", "queue_lifetime"],
    "limits": ["auth_failures", "auth_failure_window", "block_duration"],
    "tls": ["certificate", "private_key"],
}


def _raw_embedded() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    parser.read_string(EMBEDDED.read_text(encoding="utf-8"), source=str(EMBEDDED))
    return parser


# --- the embedded default -----------------------------------------------------


# The embedded config turns TLS on for `make run`; the comments give the defaults.
TLS_ON = {("smtp", "listen"), ("pop3", "listen"), ("tls", "certificate"), ("tls", "private_key")}


def test_embedded_config_parses_and_equals_builtin_defaults():
    embedded = config.load(EMBEDDED)
    defaults = config.parse("", Path("defaults.ini"))
    assert (
        attrs.evolve(
            embedded,
            path=defaults.path,
            smtp=attrs.evolve(embedded.smtp, listen=defaults.smtp.listen),
            pop3=attrs.evolve(embedded.pop3, listen=defaults.pop3.listen),
            tls=defaults.tls,
        )
        == defaults
    )
    assert embedded.smtp.listen[0] == defaults.smtp.listen[0]
    assert embedded.pop3.listen[0] == defaults.pop3.listen[0]


def test_contract_keys_are_all_known():
    for section, keys in CONTRACT_KEYS.items():
        assert section in config.SPEC
        for key in keys:
            assert key in config.SPEC[section], f"[{section}] {key} dropped from SPEC"


@pytest.mark.parametrize(
    "section,key", [(s, k) for s, keys in config.SPEC.items() for k in keys], ids=str
)
def test_embedded_config_lists_every_key_with_its_default(section, key):
    parser = _raw_embedded()
    assert parser.has_option(section, key), f"etc/mailbox.ini lacks [{section}] {key}"
    if (section, key) in TLS_ON:
        default = config.SPEC[section][key][0].strip()
        assert f"Default: {default or 'empty'}" in EMBEDDED.read_text()
        return
    assert parser.get(section, key).strip() == config.SPEC[section][key][0].strip()


def test_embedded_config_has_no_extra_sections_or_keys():
    parser = _raw_embedded()
    assert set(parser.sections()) == set(config.SPEC)
    for section in parser.sections():
        assert set(parser[section]) <= set(config.SPEC[section])


def test_defaults_match_the_contract():
    c = config.parse("", Path("x.ini"))
    assert c.mailbox.hostname == "mail.example.test"
    assert c.mailbox.domains == ("example.test",)
    assert c.mailbox.accounts == Path("etc/accounts")
    assert c.mailbox.aliases == Path("etc/aliases")
    assert c.mailbox.mail_dir == Path("mailbox")
    assert c.mailbox.trusted_networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert c.smtp.listen == ("tcp:2525:interface=127.0.0.1",)
    assert c.smtp.submission == ("tcp:2587:interface=127.0.0.1",)
    assert c.smtp.max_message_size == 26214400
    assert c.smtp.max_recipients == 100
    assert c.smtp.require_tls_for_auth is False
    assert c.pop3.listen == ("tcp:1110:interface=127.0.0.1",)
    assert c.pop3.idle_timeout >= 600
    assert c.relay.pop_before_smtp_ttl == 3600
    assert c.relay.sender_must_match_login is True
    assert c.relay.smarthost == ""
    assert c.relay.queue_lifetime == 432000
    assert (c.limits.auth_failures, c.limits.auth_failure_window) == (10, 3600)
    assert c.limits.block_duration == 3600
    assert c.tls.certificate is None and c.tls.private_key is None


# --- values that are fine -----------------------------------------------------


def test_good_values_are_normalised():
    c = config.parse(
        "[mailbox]\n"
        "hostname = Mail.Example.TEST.\n"
        "domains = Example.TEST, other.test\n"
        "domain_aliases = EXAMPLE.ORG=example.test, alias.test=other.test\n"
        "trusted_networks = 10.0.0.1/8, 2001:db8::/32 ; comment\n"
        "[smtp]\n"
        "listen = tcp:2525:interface=127.0.0.1 tcp6:2526:interface=\\:\\:1\n"
        "submission =\n"
        "require_tls_for_auth = Yes\n"
        "[relay]\n"
        "sender_must_match_login = off\n"
        "smarthost = smtp.far.test:587\n"
        "[pop3]\n"
        "listen =\n"
        "idle_timeout = 600\n"
        "[tls]\n"
        "certificate = /etc/ssl/cert.pem\n"
        "private_key = /etc/ssl/key.pem\n",
        Path("good.ini"),
    )
    assert c.mailbox.hostname == "mail.example.test"
    assert c.mailbox.domains == ("example.test", "other.test")
    assert c.mailbox.domain_aliases == (
        ("example.org", "example.test"),
        ("alias.test", "other.test"),
    )
    assert c.mailbox.trusted_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert len(c.smtp.listen) == 2
    assert c.smtp.submission == ()
    assert c.pop3.listen == ()
    assert c.smtp.require_tls_for_auth is True
    assert c.relay.sender_must_match_login is False
    assert c.tls.certificate == Path("/etc/ssl/cert.pem")
    assert c.canonical_domain("EXAMPLE.ORG.") == "example.test"
    assert c.canonical_domain("Other.Test") == "other.test"
    assert c.canonical_domain("far.test") is None


def test_empty_trusted_networks_means_none():
    c = config.parse("[mailbox]\ntrusted_networks =\n", Path("x.ini"))
    assert c.mailbox.trusted_networks == ()


# --- mistakes -----------------------------------------------------------------

P = "/srv/mail/etc/mailbox.ini"

# (id, INI text, substrings the one-line error must contain besides the path)
MISTAKES = [
    ("endpoint-port", "[smtp]\nlisten = tcp:notaport\n", ["[smtp]", "listen", "tcp:notaport"]),
    ("endpoint-type", "[pop3]\nlisten = nosuch:1110\n", ["[pop3]", "listen", "nosuch:1110"]),
    (
        "endpoint-second-word",
        "[smtp]\nsubmission = tcp:2587 tcp:oops\n",
        ["[smtp]", "submission", "tcp:oops"],
    ),
    ("size-negative", "[smtp]\nmax_message_size = -5\n", ["[smtp]", "max_message_size", "-5"]),
    ("size-zero", "[smtp]\nmax_message_size = 0\n", ["[smtp]", "max_message_size", "'0'"]),
    ("recipients-zero", "[smtp]\nmax_recipients = 0\n", ["[smtp]", "max_recipients", "'0'"]),
    ("not-a-number", "[smtp]\nmax_recipients = lots\n", ["[smtp]", "max_recipients", "lots"]),
    ("fraction", "[limits]\nauth_failures = 1.5\n", ["[limits]", "auth_failures", "1.5"]),
    ("ttl-negative", "[relay]\npop_before_smtp_ttl = -1\n", ["[relay]", "pop_before_smtp_ttl"]),
    ("bad-bool", "[smtp]\nrequire_tls_for_auth = maybe\n", ["[smtp]", "require_tls", "maybe"]),
    (
        "bad-bool-relay",
        "[relay]\nsender_must_match_login = 2\n",
        ["[relay]", "sender_must_match_login", "'2'"],
    ),
    (
        "alias-unknown-domain",
        "[mailbox]\ndomain_aliases = example.org=nowhere.test\n",
        ["[mailbox]", "domain_aliases", "example.org=nowhere.test"],
    ),
    (
        "alias-not-a-pair",
        "[mailbox]\ndomain_aliases = example.org\n",
        ["[mailbox]", "domain_aliases", "example.org"],
    ),
    (
        "alias-is-local",
        "[mailbox]\ndomains = example.test other.test\ndomain_aliases = other.test=example.test\n",
        ["[mailbox]", "domain_aliases", "other.test=example.test"],
    ),
    ("unknown-key", "[smtp]\nlisten_on = tcp:25\n", ["[smtp]", "listen_on"]),
    ("unknown-section", "[smtpd]\nlisten = tcp:25\n", ["[smtpd]"]),
    ("default-section", "[DEFAULT]\nhostname = x.test\n", ["[DEFAULT]"]),
    (
        "bad-cidr-prefix",
        "[mailbox]\ntrusted_networks = 10.0.0.0/33\n",
        ["[mailbox]", "trusted_networks", "10.0.0.0/33"],
    ),
    (
        "bad-cidr-name",
        "[mailbox]\ntrusted_networks = 127.0.0.0/8 localhost\n",
        ["[mailbox]", "trusted_networks", "localhost"],
    ),
    ("pop3-idle-599", "[pop3]\nidle_timeout = 599\n", ["[pop3]", "idle_timeout", "599"]),
    ("pop3-idle-zero", "[pop3]\nidle_timeout = 0\n", ["[pop3]", "idle_timeout", "'0'"]),
    ("cert-without-key", "[tls]\ncertificate = cert.pem\n", ["[tls]", "private_key"]),
    ("key-without-cert", "[tls]\nprivate_key = key.pem\n", ["[tls]", "certificate"]),
    ("not-ini", "hello world\nthis is not an INI file\n", ["INI"]),
    ("key-before-section", "listen = tcp:25\n[smtp]\n", ["INI"]),
    ("duplicate-key", "[smtp]\nlisten =\nlisten =\n", ["listen"]),
    ("bad-hostname", "[mailbox]\nhostname = bad host\n", ["[mailbox]", "hostname", "bad host"]),
    ("bad-domain", "[mailbox]\ndomains = exa_mple.test\n", ["[mailbox]", "domains", "exa_mple"]),
    ("no-domains", "[mailbox]\ndomains =\n", ["[mailbox]", "domains"]),
    ("bad-smarthost", "[relay]\nsmarthost = mx.far.test\n", ["[relay]", "smarthost", "mx.far"]),
    ("rounds-too-low", "[mailbox]\nbcrypt_rounds = 3\n", ["[mailbox]", "bcrypt_rounds", "'3'"]),
    # bcrypt refuses a cost above 31 (bcrypt.gensalt raises ValueError), and the
    # embedded config documents the range 4..31.
    ("rounds-too-high", "[mailbox]\nbcrypt_rounds = 32\n", ["[mailbox]", "bcrypt_rounds", "32"]),
]


MISTAKES += [
    # issue 11: what passed unchecked or escaped as a traceback
    (
        "endpoint-port-range",
        "[smtp]\nlisten = tcp:99999\n",
        ["[smtp]", "listen", "99999", "line 2"],
    ),
    ("endpoint-port-kw", "[pop3]\nlisten = tcp:port=70000\n", ["[pop3]", "listen", "70000"]),
    ("smarthost-port", "[relay]\nsmarthost = mx.far.test:99999\n", ["[relay]", "smarthost"]),
    ("accounts-folder", "[mailbox]\naccounts = /\n", ["[mailbox]", "accounts", "'/'", "a file"]),
    ("value-line", "[smtp]\n\n# x\nmax_recipients = 0\n", ["line 4:", "max_recipients"]),
    ("syntax-line", "[smtp]\nlisten = tcp:25\nlisten = tcp:26\n", ["line 3:", "INI"]),
]


@pytest.mark.parametrize("text,needles", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistake_is_one_line_naming_file_section_key_value(text, needles):
    with pytest.raises(ConfigError) as info:
        config.parse(text, Path(P))
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    assert message.startswith(P + ": "), message
    for needle in needles:
        assert needle in message, (needle, message)


def test_load_missing_file(tmp_path):
    path = tmp_path / "missing.ini"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: config file not found"


def test_load_binary_file(tmp_path):
    path = tmp_path / "binary.ini"
    path.write_bytes(b"\xff\xfe\x00garbage\x00")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_load_directory(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: ") and "\n" not in message


# --- twistd start-up ----------------------------------------------------------


def run_twistd(cwd: Path, *args: str) -> tuple[int, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [str(TWISTD), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=60,
    )
    return proc.returncode, proc.stdout.decode("utf-8", "replace")


def lines_of(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


@pytest.mark.blackbox
def test_twistd_missing_config_is_one_line(tmp_path):
    code, out = run_twistd(tmp_path, "-n", "mailbox", "--config", "missing.ini")
    assert code != 0
    assert "Traceback" not in out
    assert len(lines_of(out)) == 1, out
    assert "missing.ini" in out


@pytest.mark.blackbox
def test_twistd_bad_key_is_one_line(tmp_path):
    (tmp_path / "bad.ini").write_text("[smtp]\nlisten = tcp:2525\nmax_size = 10\n")
    code, out = run_twistd(tmp_path, "-n", "mailbox", "--config", "bad.ini")
    assert code != 0
    assert "Traceback" not in out
    assert len(lines_of(out)) == 1, out
    assert "bad.ini" in out and "[smtp]" in out and "max_size" in out


@pytest.mark.blackbox
@pytest.mark.parametrize(
    "text,needles",
    [
        ("[smtp]\nlisten = tcp:99999\n", ["[smtp]", "listen", "tcp:99999", "line 2"]),
        ("[mailbox]\naccounts = etc\n", ["[mailbox]", "accounts", "'etc'", "line 2"]),
        ("[relay]\nsmarthost = mx.far.test:99999\n", ["[relay]", "smarthost", "99999"]),
        ("[smtp]\nlisten = tcp:25\nlisten = tcp:26\n", ["line 3", "listen"]),
    ],
    ids=["port-99999", "accounts-folder", "smarthost-port", "duplicate-key"],
)
def test_twistd_config_mistakes_of_issue_11_are_one_line(tmp_path, text, needles):
    (tmp_path / "etc").mkdir()
    (tmp_path / "bad.ini").write_text(text)
    code, out = run_twistd(tmp_path, "-n", "mailbox", "--config", "bad.ini")
    assert code != 0
    assert "Traceback" not in out
    assert len(lines_of(out)) == 1, out
    assert "bad.ini" in out and all(n in out for n in needles), out


def _free_port() -> int:
    from conftest import free_port  # never a port handed out lately

    return free_port()


@pytest.mark.blackbox
@pytest.mark.parametrize("busy", ["smtp", "pop3", "metrics"])
def test_twistd_port_in_use_is_one_clear_line(tmp_path, busy):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        port = blocker.getsockname()[1]
        ports = {name: _free_port() for name in ("smtp", "submission", "pop3", "metrics")}
        ports[busy] = port
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc" / "accounts").write_text("")
        (tmp_path / "etc" / "aliases").write_text("")
        (tmp_path / "etc" / "mailbox.ini").write_text(
            "[mailbox]\nbcrypt_rounds = 4\n"
            f"[smtp]\nlisten = tcp:{ports['smtp']}:interface=127.0.0.1\n"
            f"submission = tcp:{ports['submission']}:interface=127.0.0.1\n"
            f"[pop3]\nlisten = tcp:{ports['pop3']}:interface=127.0.0.1\n"
            f"[metrics]\nlisten = tcp:{ports['metrics']}:interface=127.0.0.1\n"
        )
        code, out = run_twistd(
            tmp_path, "-n", "--pidfile=", "mailbox", "--config", "etc/mailbox.ini"
        )
    finally:
        blocker.close()
    assert code != 0, out
    assert "Traceback" not in out, out
    complaints = [line for line in lines_of(out) if f"tcp:{port}:" in line]
    assert len(complaints) == 1, out
    assert "cannot listen" in complaints[0] and "in use" in complaints[0], complaints
    errors = [line for line in lines_of(out) if "#error]" in line or "#critical]" in line]
    assert errors == complaints, out


@pytest.mark.parametrize(
    "text, server",
    [
        ("", None),
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
    ],
)
def test_the_resolver_is_an_address_and_a_port(text, server):
    c = config.parse(f"[mailbox]\nresolver = {text}\n", Path("x.ini"))
    assert c.mailbox.resolver == server


@pytest.mark.parametrize(
    "text", ["dns.example.test", "127.0.0.1:0", "127.0.0.1:x", "[::1]x", "1.2.3"]
)
def test_a_resolver_that_is_not_an_address_is_one_line(text):
    with pytest.raises(config.ConfigError) as e:
        config.parse(f"[mailbox]\nresolver = {text}\n", Path("x.ini"))
    assert str(e.value).startswith("x.ini: line 2: [mailbox] resolver = "), str(e.value)


# --- haproxy: listeners and proxy_networks -------------------------------------


def test_haproxy_listeners_and_proxy_networks():
    c = config.parse(
        "[mailbox]\nproxy_networks = 10.0.0.0/24 2001:db8::/64\n"
        "[smtp]\nlisten = haproxy:tcp:25:interface=127.0.0.1 haproxy:tls:465\n"
        "submission = HAPROXY:tcp6:587\n"
        "[tls]\ncertificate = /etc/ssl/cert.pem\nprivate_key = /etc/ssl/key.pem\n",
        Path("x.ini"),
    )
    assert c.smtp.listen == ("haproxy:tcp:25:interface=127.0.0.1", "haproxy:tls:465")
    assert c.mailbox.proxy_networks == (
        ipaddress.ip_network("10.0.0.0/24"),
        ipaddress.ip_network("2001:db8::/64"),
    )
    assert config.parse("", Path("x.ini")).mailbox.proxy_networks == ()


@pytest.mark.parametrize(
    "listen,expected",
    [
        ("haproxy:tcp:99999", "a port from 0 to 65535 in 'haproxy:tcp:99999'"),
        ("haproxy:tcp:x:nonsense=1", "'haproxy:tcp:x:nonsense=1' is not one"),
        ("haproxy:", "'haproxy:' is not one"),
        ("haproxy:haproxy:tcp:25", "haproxy: before tcp:, tcp6:, tls: or another endpoint"),
        ("haproxy:ssl:465", "the PROXY header comes before TLS: haproxy:tls:PORT"),
        ("haproxy:tls:465:certKey=/x.pem", "without certKey= or privateKey="),
    ],
)
def test_bad_haproxy_listeners_are_one_line(listen, expected):
    with pytest.raises(ConfigError) as e:
        config.parse(f"[smtp]\nlisten = {listen}\n", Path("x.ini"))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_haproxy_tls_listener_needs_the_certificate():
    with pytest.raises(ConfigError) as e:
        config.parse("[pop3]\nlisten = haproxy:tls:995\n", Path("x.ini"))
    assert "'haproxy:tls:995' needs [tls] certificate and private_key" in str(e.value)


def test_bad_proxy_networks():
    with pytest.raises(ConfigError) as e:
        config.parse("[mailbox]\nproxy_networks = balancer\n", Path("x.ini"))
    assert "[mailbox] proxy_networks = 'balancer': expected CIDR networks" in str(e.value)
