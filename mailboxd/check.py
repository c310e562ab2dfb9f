"""`mailboxctl check`: the config and everything it names, as the server will
meet them, before it starts (as `postfix check` and `doveconf -n` do).

Each problem is one line naming the file (and key) at fault; nothing here
changes a file or needs the server to run.
"""

from __future__ import annotations

import datetime
import grp
import os
import pwd
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs

from . import signing
from .accounts import Directory, Problem, load_directory
from .config import SPEC, Config, relative_paths
from .tls import TLSConfigError, context_for

EXPIRY_WARNING_DAYS = 14  # a certificate that ends sooner than this is a problem now


@attrs.frozen
class RunAs:
    """The user the server will run as: its name, ids and groups."""

    name: str
    uid: int
    gids: frozenset[int]

    @classmethod
    def named(cls, name: str) -> RunAs:
        entry = pwd.getpwnam(name)  # KeyError: no such user
        groups = {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
        return cls(name, entry.pw_uid, frozenset({entry.pw_gid, *groups}))

    @classmethod
    def current(cls) -> RunAs:
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return cls(name, uid, frozenset({os.getegid(), *os.getgroups()}))

    def may(self, path: Path, mode: int) -> bool:
        """Whether this user may use `path` for `mode` (R, W, X bits of the
        owner's column), by its permission bits, as the kernel decides it."""
        st = path.stat()
        if self.uid == 0:  # root reads and writes anything; executes if anyone may
            return not (mode & 1) or bool(st.st_mode & 0o111)
        if st.st_uid == self.uid:
            granted = (st.st_mode >> 6) & 7
        elif st.st_gid in self.gids:
            granted = (st.st_mode >> 3) & 7
        else:
            granted = st.st_mode & 7
        return granted & mode == mode


R, W, X = 4, 2, 1


def directory(config: Config) -> tuple[Directory, list[Problem]]:
    """The accounts and aliases, as the server will read them, and the lines it will skip."""
    m = config.mailbox
    return load_directory(m.accounts, m.aliases, m.domains, dict(m.domain_aliases))


def problems(
    config: Config, user: RunAs, now: datetime.datetime, skipped: list[Problem]
) -> Iterator[str]:
    """Every problem with `config` and what it names, one line each;
    `skipped`: the accounts and aliases lines `directory` found wrong."""
    yield from _home(config)
    m = config.mailbox
    yield from _readable(user, m.accounts, "[mailbox] accounts", required=False)
    yield from _readable(user, m.aliases, "[mailbox] aliases", required=False)
    yield from (str(p) for p in skipped)
    yield from _writable_dir(user, m.mail_dir, "[mailbox] mail_dir")
    yield from _dkim_keys(config, user)
    t = config.tls
    if t.certificate is not None and t.private_key is not None:
        unreadable = [
            *_readable(user, t.certificate, "[tls] certificate", required=True),
            *_readable(user, t.private_key, "[tls] private_key", required=True),
        ]
        yield from unreadable or _certificate(t.certificate, t.private_key, now)


def _home(config: Config) -> Iterator[str]:
    relative = relative_paths(config)
    m = config.mailbox
    if relative and not (m.mail_dir.is_dir() or m.accounts.is_file()):
        named = ", ".join(f"{key} = '{path}'" for key, path in relative[:3])
        yield (
            f"{config.path}: {named} are taken from the current folder {Path.cwd()}, "
            f"which holds no appliance; set [mailbox] home or absolute paths"
        )


def _dkim_keys(config: Config, user: RunAs) -> Iterator[str]:
    """Each local domain's DKIM key, where there is one: readable, and a key."""
    for domain in config.local_domains():
        path = signing.key_path(config.dkim.keys, domain, config.dkim.selector)
        if not path.exists():
            continue
        unreadable = list(_readable(user, path, "[dkim] keys", required=True))
        yield from unreadable
        if not unreadable:
            try:
                signing.public_key(path.read_bytes())
            except (OSError, signing.KeyProblem) as e:
                yield f"{path}: [dkim] keys: {getattr(e, 'strerror', None) or e}"


def _readable(user: RunAs, path: Path, key: str, required: bool) -> Iterator[str]:
    try:
        if not path.is_file():
            if path.exists():
                yield f"{path}: {key}: not a file"
            elif required:
                yield f"{path}: {key}: no such file"
            return
        if not _reachable(user, path) or not user.may(path, R):
            yield f"{path}: {key}: {user.name} cannot read it"
    except OSError as e:
        yield f"{path}: {key}: {e.strerror}"


def _writable_dir(user: RunAs, path: Path, key: str) -> Iterator[str]:
    """`path` must be a folder the user can write, or be one it can make."""
    try:
        target = path
        while not target.exists():  # the server makes what is missing
            target = target.parent
        if not target.is_dir():
            yield f"{target}: {key}: not a folder"
        elif not _reachable(user, target) or not user.may(target, W | X):
            made = "" if target == path else f" (to make {path})"
            yield f"{target}: {key}: {user.name} cannot write to it{made}"
    except OSError as e:
        yield f"{path}: {key}: {e.strerror}"


def _reachable(user: RunAs, path: Path) -> bool:
    """Whether the user may pass through every folder above `path`."""
    return all(user.may(parent, X) for parent in path.absolute().parents)


def _certificate(certificate: Path, private_key: Path, now: datetime.datetime) -> Iterator[str]:
    try:
        context_for(certificate, private_key)
    except TLSConfigError as e:
        yield str(e)
        return
    cert = _load(certificate)
    if cert is None:
        return
    if cert.not_valid_before_utc > now:
        yield f"{certificate}: [tls] certificate: not valid before {_day(cert.not_valid_before_utc)}"
    ends = cert.not_valid_after_utc
    if ends <= now:
        yield f"{certificate}: [tls] certificate: expired on {_day(ends)}"
    elif ends - now < datetime.timedelta(days=EXPIRY_WARNING_DAYS):
        yield f"{certificate}: [tls] certificate: expires on {_day(ends)}, in {(ends - now).days} days"


def _load(path: Path) -> Any:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (ValueError, OSError):
        return None


def _day(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


def summary(config: Config, user: RunAs, now: datetime.datetime, accounts: Directory) -> list[str]:
    """What a good config amounts to, in a few lines."""
    m = config.mailbox
    lines = [
        f"{config.path}: no problems found (checked as {user.name})",
        f"domains: {' '.join(m.domains)}"
        + (f" (aliases: {' '.join(a for a, _ in m.domain_aliases)})" if m.domain_aliases else ""),
        f"accounts: {len(accounts.hashes)} in {m.accounts}; aliases: "
        f"{len(accounts.aliases)} in {m.aliases}",
        f"mail_dir: {m.mail_dir}",
        "smtp: "
        + (" ".join(config.smtp.listen) or "off")
        + "; submission: "
        + (" ".join(config.smtp.submission) or "off"),
        "pop3: " + (" ".join(config.pop3.listen) or "off"),
        "metrics: " + (" ".join(config.metrics.listen) or "off"),
    ]
    t = config.tls
    cert = _load(t.certificate) if t.certificate is not None else None
    if cert is None:
        lines.append("tls: off (no STARTTLS, STLS or implicit TLS)")
    else:
        days = (cert.not_valid_after_utc - now).days
        lines.append(
            f"tls: {t.certificate}, {cert.subject.rfc4514_string()}, "
            f"valid until {_day(cert.not_valid_after_utc)} ({days} days)"
        )
    relay = config.relay
    lines.append(f"relay: {'smarthost ' + relay.smarthost if relay.smarthost else 'direct to MX'}")
    signed = [
        d
        for d in config.local_domains()
        if signing.key_path(config.dkim.keys, d, config.dkim.selector).exists()
    ]
    unsigned = [d for d in config.local_domains() if d not in signed]
    lines.append(
        f"dkim: keys for {' '.join(signed) or 'no domain'}"
        + (f"; {' '.join(unsigned)} send unsigned" if unsigned else "")
    )
    return lines


def show(config: Config) -> str:
    """The effective config: every key of every section, defaults filled in,
    as the server reads it (relative paths resolved against [mailbox] home).
    The smarthost password, and Redis's, are not shown."""
    out = [f"# {config.path}, with every default filled in"]
    for name, keys in SPEC.items():
        out.append(f"\n[{name}]")
        section = getattr(config, name)
        for key in keys:
            value = getattr(section, key)
            if key == "smarthost_password" and value:
                out.append(f"{key} = # hidden")
                continue
            out.append(f"{key} = {_shown(key, value)}".rstrip())
    return "\n".join(out) + "\n"


def without_password(url: str) -> str:
    """A URL as it may be shown or logged: its password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def _shown(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "workers" and value == 0:
        return "auto"
    if key == "redis_url":
        return without_password(value)
    if key == "resolver":
        host, port = value
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if key == "domain_aliases":
        return " ".join(f"{alias}={canonical}" for alias, canonical in value)
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)
