"""INI text to a frozen `Config`, with errors that name file, key and value."""

from __future__ import annotations

import configparser
import ipaddress
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """Configuration mistakes: `lines`, one for each, meant for the operator
    (str() is those lines)."""

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines

    def said_by(self, who: str) -> str:
        """The lines, each begun with `who: `."""
        return "\n".join(f"{who}: {line}" for line in self.lines)


@attrs.frozen
class MailboxSection:
    hostname: str
    domains: tuple[str, ...]
    domain_aliases: tuple[tuple[str, str], ...]
    accounts: Path
    aliases: Path
    mail_dir: Path
    trusted_networks: tuple[IPNetwork, ...]
    bcrypt_rounds: int
    home: Path | None = None  # what relative paths are resolved against; None: the cwd
    workers: int = 1  # serving processes; 0: one per core
    resolver: tuple[str, int] | None = None  # the DNS server for every lookup; None: resolv.conf
    quota: int = 0  # bytes a mailbox may hold; 0: no limit
    plugins: Path | None = None  # a folder of site filters (*.py); None: none
    # Who may open a haproxy: listener's connections with a PROXY header; empty: anyone.
    proxy_networks: tuple[IPNetwork, ...] = ()


@attrs.frozen
class SMTPSection:
    listen: tuple[str, ...]
    submission: tuple[str, ...]
    max_message_size: int
    max_recipients: int
    require_tls_for_auth: bool
    max_errors: int
    idle_timeout: int
    max_hops: int = 50  # Received: fields a message may arrive with (RFC 5321 §6.3)


@attrs.frozen
class POP3Section:
    listen: tuple[str, ...]
    idle_timeout: int
    max_errors: int


@attrs.frozen
class RelaySection:
    pop_before_smtp_ttl: int
    sender_must_match_login: bool
    smarthost: str
    queue_lifetime: int
    smarthost_username: str
    smarthost_password: str = attrs.field(repr=False)
    timeout: int
    max_connections: int
    max_connections_per_destination: int


@attrs.frozen
class LimitsSection:
    auth_failures: int
    auth_failure_window: int
    block_duration: int
    auth_cache_ttl: int
    connections_per_ip: int
    relay_recipients_per_hour: int = 500  # per account or POP-authorised IP; 0: none
    ipv6_prefix: int = 64  # IPv6 clients are counted by network, not by address


@attrs.frozen
class TLSSection:
    certificate: Path | None
    private_key: Path | None


@attrs.frozen
class LogSection:
    format: str = "text"  # "text": twistd's lines; "json": one JSON object a line


@attrs.frozen
class DKIMSection:
    keys: Path = Path("etc/dkim")  # <keys>/<domain>/<selector>.pem
    selector: str = "mailbox"


@attrs.frozen
class InboundSection:
    checks: bool = True  # SPF, DKIM and DMARC of mail from the world
    dmarc_reject: bool = True  # refuse what fails a p=reject DMARC policy
    spf_reject: bool = False  # refuse an SPF fail
    dnsbl: tuple[str, ...] = ()  # DNS blocklist zones asked about clients on `listen`


@attrs.frozen
class FiltersSection:
    timeout: int = 30  # seconds one filter may take with one message
    clamav: str = ""  # host:port of clamd; empty: no virus scan
    rspamd: str = ""  # the URL of rspamd's normal worker; empty: no spam check


@attrs.frozen
class MetricsSection:
    listen: tuple[str, ...] = ()  # where GET /metrics is served; empty: nowhere


@attrs.frozen
class StateSection:
    backend: str = "sqlite"  # where the shared runtime state lives: sqlite or redis
    redis_url: str = "redis://127.0.0.1:6379/0"
    node: str = attrs.field(factory=lambda: default_node())  # this front end's name
    lease: int = 30  # seconds a front end's leases last unrenewed (see node.py)


def default_node() -> str:
    """The host name's first label, as a node name (see _node)."""
    name = socket.gethostname().split(".")[0]
    return name if _NODE.fullmatch(name) else "mailbox"


_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


@attrs.frozen
class Config:
    path: Path
    mailbox: MailboxSection
    smtp: SMTPSection
    pop3: POP3Section
    relay: RelaySection
    limits: LimitsSection
    tls: TLSSection
    log: LogSection = LogSection()
    metrics: MetricsSection = MetricsSection()
    dkim: DKIMSection = DKIMSection()
    inbound: InboundSection = InboundSection()
    filters: FiltersSection = FiltersSection()
    state: StateSection = attrs.field(factory=StateSection)

    def local_domains(self) -> list[str]:
        """The local domains, then their aliases."""
        m = self.mailbox
        return [*m.domains, *(alias for alias, _ in m.domain_aliases)]

    def canonical_domain(self, domain: str) -> str | None:
        """The local domain `domain` names (itself or via an alias), else None."""
        domain = domain.lower().rstrip(".")
        if domain in self.mailbox.domains:
            return domain
        return dict(self.mailbox.domain_aliases).get(domain)


class _Invalid(ValueError):
    """Raised by a value parser; the message says what was expected."""


def _words(text: str) -> tuple[str, ...]:
    return tuple(w for w in re.split(r"[\s,]+", text.strip()) if w)


def _domain(text: str) -> str:
    d = text.strip().lower().rstrip(".")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", d):
        raise _Invalid(f"a domain name, not {text!r}")
    return d


def _domains(text: str) -> tuple[str, ...]:
    return tuple(_domain(w) for w in _words(text))


def _alias_pairs(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for word in _words(text):
        alias, sep, canonical = word.partition("=")
        if not sep:
            raise _Invalid(f"alias=canonical pairs, not {word!r}")
        pairs.append((_domain(alias), _domain(canonical)))
    return tuple(pairs)


def _networks(text: str) -> tuple[IPNetwork, ...]:
    nets = []
    for word in _words(text):
        try:
            nets.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise _Invalid(f"CIDR networks such as 127.0.0.0/8, not {word!r}") from None
    return tuple(nets)


def _count(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise _Invalid(f"a whole number, not {text.strip()!r}") from None
        if value < minimum:
            raise _Invalid(f"a whole number of at least {minimum}")
        if maximum is not None and value > maximum:
            raise _Invalid(f"a whole number from {minimum} to {maximum}")
        return value

    return parse


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        word = text.strip().lower()
        if word not in allowed:
            raise _Invalid(" or ".join(allowed))
        return word

    return parse


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("yes", "true", "on", "1"):
        return True
    if t in ("no", "false", "off", "0"):
        return False
    raise _Invalid("yes or no")


class _ParseOnlyReactor:
    """Stand-in reactor: endpoint parsers only store it; nothing listens here."""


def _endpoints(text: str) -> tuple[str, ...]:
    from twisted.internet.endpoints import serverFromString

    from .tls import PLUGIN_PREFIX, ImplicitTLSEndpoint, endpoint_string

    found = []
    for given in text.split():
        # haproxy:ENDPOINT (mailboxd.proxy): the PROXY protocol, then ENDPOINT's.
        word = _without_proxy(given)
        kind = word.partition(":")[0].lower()
        if word != given and kind in ("haproxy", "ssl"):
            raise _Invalid(
                f"haproxy: before tcp:, tcp6:, tls: or another endpoint, not {given!r}"
                + (
                    " (the PROXY header comes before TLS: haproxy:tls:PORT is implicit TLS)"
                    if kind == "ssl"
                    else ""
                )
            )
        if kind == PLUGIN_PREFIX:
            raise _Invalid(f"tls:PORT[:interface=ADDRESS] for implicit TLS, not {given!r}")
        # tls:PORT:... is ours (a parser plugin: see mailboxd.tls), parsed here
        # without its certificate, which the service adds from [tls].
        try:
            endpoint = serverFromString(_ParseOnlyReactor(), endpoint_string(word))
        except Exception as e:  # parsers raise ValueError, KeyError, TypeError...
            raise _Invalid(
                f"Twisted server endpoint strings such as tcp:2525:interface=127.0.0.1; "
                f"{given!r} is not one ({e.__class__.__name__}: {e})"
            ) from None
        if isinstance(endpoint, ImplicitTLSEndpoint) and endpoint.certificate is not None:
            raise _Invalid(
                f"tls:PORT[:interface=ADDRESS] without certKey= or privateKey=, not {given!r}: "
                f"a tls: listener uses the [tls] certificate"
            )
        port = _endpoint_port(word)
        if port is not None and not 0 <= port <= 65535:
            raise _Invalid(f"a port from 0 to 65535 in {given!r}, not {port}")
        found.append(given)
    return tuple(found)


def _without_proxy(description: str) -> str:
    """The endpoint string under a ``haproxy:`` prefix (see mailboxd.proxy)."""
    from .proxy import inner

    return inner(description)


def _endpoint_port(description: str) -> int | None:
    """The port of a tcp:, tcp6: or ssl: endpoint string, with or without
    haproxy: (checked by the parser only when it binds, as an
    OverflowError); None for other kinds."""
    kind, _, rest = _without_proxy(description).partition(":")
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    words = rest.split(":")
    named = [w[5:] for w in words if w.startswith("port=")]
    value = named[0] if named else words[0]
    return int(value) if value.isdigit() else None


def _hostname(text: str) -> str:
    return _domain(text)


def _smarthost(text: str) -> str:
    text = text.strip()
    if text and not re.fullmatch(r"[^\s:]+:\d{1,5}|\[[0-9a-fA-F:.]+\]:\d{1,5}", text):
        raise _Invalid("host:port or nothing")
    if text and not 1 <= int(text.rpartition(":")[2]) <= 65535:
        raise _Invalid("host:port with a port from 1 to 65535")
    return text


def _path(text: str) -> Path:
    if not text.strip():
        raise _Invalid("a path")
    return Path(text.strip())


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        return 0
    try:
        return _count(1, 256)(text)
    except _Invalid:
        raise _Invalid("auto or a number of processes from 1 to 256") from None


def _nameserver(text: str) -> tuple[str, int] | None:
    text = text.strip()
    if not text:
        return None
    host, port = text, "53"
    if text.startswith("["):  # [2001:db8::53]:5353
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("53" if not rest else "x")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise _Invalid(
            f"the IP address of a DNS server, with :port if not 53, not {text!r}"
        ) from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _Invalid(f"a port from 1 to 65535 in {text!r}")
    return host, int(port)


def _bytes(text: str) -> int:
    word = text.strip().upper()
    factor = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(word[-1:], 1)
    digits = word[:-1] if factor > 1 else word
    if not digits.isdigit():
        raise _Invalid(f"a number of bytes, with K, M or G if you like (1G), not {text.strip()!r}")
    return int(digits) * factor


def _http_url(text: str) -> str:
    url = text.strip()
    if url and not re.fullmatch(r"https?://[^\s/]+(:\d{1,5})?/?", url):
        raise _Invalid(f"an http:// URL such as http://127.0.0.1:11333, or nothing; not {url!r}")
    return url


def _selector(text: str) -> str:
    word = text.strip().lower()
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", word):
        raise _Invalid(f"a DKIM selector (letters, digits, hyphens), not {text.strip()!r}")
    return word


def _node(text: str) -> str:
    text = text.strip()
    if not text:
        return default_node()
    if not _NODE.fullmatch(text):
        raise _Invalid("a name of letters, digits, '-' and '_' (at most 63), such as mx1")
    return text


def _redis_url(text: str) -> str:
    text = text.strip()
    if urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise _Invalid("a URL such as redis://127.0.0.1:6379/0 (rediss:// for TLS, unix:///path)")
    return text


def _optional_path(text: str) -> Path | None:
    return Path(text.strip()) if text.strip() else None


_Spec = dict[str, dict[str, tuple[str, Callable[[str], Any]]]]

SPEC: _Spec = {
    "mailbox": {
        "hostname": ("mail.example.test", _hostname),
        "domains": ("example.test", _domains),
        "domain_aliases": ("", _alias_pairs),
        "accounts": ("etc/accounts", _path),
        "aliases": ("etc/aliases", _path),
        "mail_dir": ("mailbox", _path),
        "home": ("", _optional_path),
        "trusted_networks": ("127.0.0.0/8 ::1/128", _networks),
        "bcrypt_rounds": ("12", _count(4, 31)),
        "workers": ("1", _workers),
        "resolver": ("", _nameserver),
        "quota": ("0", _bytes),
        "plugins": ("", _optional_path),
        "proxy_networks": ("", _networks),
    },
    "smtp": {
        "listen": ("tcp:2525:interface=127.0.0.1", _endpoints),
        "submission": ("tcp:2587:interface=127.0.0.1", _endpoints),
        "max_message_size": ("26214400", _count(1)),
        "max_recipients": ("100", _count(1)),
        "require_tls_for_auth": ("no", _bool),
        "max_errors": ("10", _count(1)),
        "idle_timeout": ("300", _count(1)),
        "max_hops": ("50", _count(1)),
    },
    "pop3": {
        "listen": ("tcp:1110:interface=127.0.0.1", _endpoints),
        # RFC 1939 section 3: the autologout timer must be at least 10 minutes.
        "idle_timeout": ("600", _count(600)),
        "max_errors": ("10", _count(1)),
    },
    "relay": {
        "pop_before_smtp_ttl": ("3600", _count(0)),
        "sender_must_match_login": ("yes", _bool),
        "smarthost": ("", _smarthost),
        "queue_lifetime": ("432000", _count(0)),
        "smarthost_username": ("", str.strip),
        "smarthost_password": ("", str.strip),
        "timeout": ("300", _count(1)),
        "max_connections": ("100", _count(1)),
        "max_connections_per_destination": ("20", _count(1)),
    },
    "limits": {
        "auth_failures": ("10", _count(1)),
        "auth_failure_window": ("3600", _count(1)),
        "block_duration": ("3600", _count(0)),
        "auth_cache_ttl": ("3600", _count(0)),
        "connections_per_ip": ("50", _count(0)),
        "relay_recipients_per_hour": ("500", _count(0)),
        "ipv6_prefix": ("64", _count(1, 128)),
    },
    "tls": {
        "certificate": ("", _optional_path),
        "private_key": ("", _optional_path),
    },
    "log": {
        "format": ("text", _choice("text", "json")),
    },
    "metrics": {
        "listen": ("", _endpoints),
    },
    "dkim": {
        "keys": ("etc/dkim", _path),
        "selector": ("mailbox", _selector),
    },
    "inbound": {
        "checks": ("yes", _bool),
        "dmarc_reject": ("yes", _bool),
        "spf_reject": ("no", _bool),
        "dnsbl": ("", _domains),
    },
    "state": {
        "backend": ("sqlite", _choice("sqlite", "redis")),
        "redis_url": ("redis://127.0.0.1:6379/0", _redis_url),
        "node": ("", _node),
        "lease": ("30", _count(3, 3600)),
    },
    "filters": {
        "timeout": ("30", _count(1)),
        "clamav": ("", _smarthost),
        "rspamd": ("", _http_url),
    },
}

_SECTIONS = {
    "mailbox": MailboxSection,
    "smtp": SMTPSection,
    "pop3": POP3Section,
    "relay": RelaySection,
    "limits": LimitsSection,
    "tls": TLSSection,
    "log": LogSection,
    "metrics": MetricsSection,
    "dkim": DKIMSection,
    "inbound": InboundSection,
    "filters": FiltersSection,
    "state": StateSection,
}


def parse(text: str, path: Path) -> Config:
    """Parse INI `text` read from `path`; raise ConfigError on any mistake."""
    parser = configparser.ConfigParser(
        inline_comment_prefixes=(";", "#"), interpolation=None, default_section="\0none"
    )
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as e:
        first = str(e).splitlines()[0]
        errors = getattr(e, "errors", None)
        line = getattr(e, "lineno", None) or (errors[0][0] if errors else None)
        where = f"line {line}: " if line else ""
        raise ConfigError(f"{path}: {where}not a valid INI file: {first}") from None

    def at(section: str, key: str | None = None) -> str:
        line = _line_of(text, section, key)
        return f"line {line}: " if line else ""

    # Every mistake is said, each on its line, not only the first.
    mistakes: list[str] = []
    for section in parser.sections():
        if section not in SPEC:
            mistakes.append(
                f"{path}: {at(section)}unknown section [{section}]; expected one of "
                + ", ".join(f"[{s}]" for s in SPEC)
            )
            continue
        for key in parser[section]:
            if key not in SPEC[section]:
                mistakes.append(
                    f"{path}: {at(section, key)}[{section}] unknown key {key!r}; expected one of "
                    + ", ".join(SPEC[section])
                )

    sections = {}
    for section, keys in SPEC.items():
        values = {}
        for key, (default, convert) in keys.items():
            raw = parser.get(section, key, fallback=default)
            try:
                values[key] = convert(raw)
            except _Invalid as e:
                mistakes.append(
                    f"{path}: {at(section, key)}[{section}] {key} = {raw.strip()!r}: expected {e}"
                )
        if not mistakes:
            sections[section] = _SECTIONS[section](**values)
    if mistakes:
        raise ConfigError(*mistakes)

    config = _resolved(Config(path=path, **sections))
    try:
        _check(config)
    except _Mistake as e:
        raise ConfigError(f"{path}: {at(e.section, e.key)}{e}") from None
    return config


def _resolved(config: Config) -> Config:
    """With [mailbox] home set, every relative path is taken from it, whatever
    the current directory of the process (the server, or mailboxctl)."""
    home = config.mailbox.home
    if home is None:
        return config

    def under(path: Path | None) -> Path | None:
        return None if path is None else home / path

    m, t = config.mailbox, config.tls
    return attrs.evolve(
        config,
        mailbox=attrs.evolve(
            m,
            accounts=home / m.accounts,
            aliases=home / m.aliases,
            mail_dir=home / m.mail_dir,
            plugins=under(m.plugins),
        ),
        tls=attrs.evolve(t, certificate=under(t.certificate), private_key=under(t.private_key)),
        dkim=attrs.evolve(config.dkim, keys=home / config.dkim.keys),
    )


def relative_paths(config: Config) -> list[tuple[str, Path]]:
    """The paths that follow the current directory: ('[section] key', path)."""
    m, t = config.mailbox, config.tls
    found = [
        ("[mailbox] accounts", m.accounts),
        ("[mailbox] aliases", m.aliases),
        ("[mailbox] mail_dir", m.mail_dir),
        ("[tls] certificate", t.certificate),
        ("[tls] private_key", t.private_key),
        ("[dkim] keys", config.dkim.keys),
        ("[mailbox] plugins", m.plugins),
    ]
    return [(key, path) for key, path in found if path is not None and not path.is_absolute()]


class _Mistake(ValueError):
    """A value that is well-formed but wrong with the others; str() says why."""

    def __init__(self, section: str, key: str, text: str) -> None:
        super().__init__(text)
        self.section, self.key = section, key


def _line_of(text: str, section: str, key: str | None) -> int | None:
    """The line (1-based) where `key` of [`section`] is set, or the section starts."""
    current, found = None, None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            current = stripped[1:-1].strip()
            if current == section and key is None:
                return number
            continue
        if current == section and key is not None and not line[:1].isspace():
            name = re.split(r"[=:]", stripped, maxsplit=1)[0].strip().lower()
            if name == key:
                found = number
    return found


def _check(config: Config) -> None:
    m = config.mailbox
    for alias, canonical in m.domain_aliases:
        if canonical not in m.domains:
            raise _Mistake(
                "mailbox",
                "domain_aliases",
                f"[mailbox] domain_aliases = '{alias}={canonical}': "
                f"expected an alias of one of the domains ({', '.join(m.domains) or 'none'}); "
                f"{canonical!r} is not one",
            )
        if alias in m.domains:
            raise _Mistake(
                "mailbox",
                "domain_aliases",
                f"[mailbox] domain_aliases = '{alias}={canonical}': "
                f"{alias!r} is already a local domain",
            )
    if not m.domains:
        raise _Mistake(
            "mailbox", "domains", "[mailbox] domains is empty: expected at least one domain"
        )
    for key, value in (("accounts", m.accounts), ("aliases", m.aliases), ("mail_dir", m.mail_dir)):
        kind = "a folder" if key == "mail_dir" else "a file"
        wrong = value.exists() and value.is_dir() != (key == "mail_dir")
        if wrong:
            raise _Mistake("mailbox", key, f"[mailbox] {key} = '{value}': expected {kind}")
    t = config.tls
    implicit = [
        (section, e)
        for section, endpoints in (
            ("smtp", config.smtp.listen + config.smtp.submission),
            ("pop3", config.pop3.listen),
            ("metrics", config.metrics.listen),
        )
        for e in endpoints
        if _without_proxy(e).startswith("tls:")
    ]
    if implicit and t.certificate is None:
        section, e = implicit[0]
        raise _Mistake(
            section, "listen", f"[{section}] {e!r} needs [tls] certificate and private_key"
        )
    if (t.certificate is None) != (t.private_key is None):
        raise _Mistake(
            "tls",
            "certificate",
            "[tls] certificate and private_key: expected both set or both empty",
        )


def load(path: Path | str) -> Config:
    """Read and parse the config file at `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    return parse(text, path)
