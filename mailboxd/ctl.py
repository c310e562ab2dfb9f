"""mailboxctl: administer accounts (and later blocks, POP authorisations, the queue)."""

from __future__ import annotations

import argparse
import datetime
import getpass
import ipaddress
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import bcrypt

from . import __version__, accounts, check, queue, signing
from .addresses import parse_mailbox
from .config import SPEC, Config, ConfigError, load, relative_paths
from .limits import SETTING as LIMIT_SETTING
from .maildir import QUOTA_SETTING, maildir_path, usage
from .private import private_dir
from .state import StateError, StateStore, client_key, normalise_ip, open_store
from .tls import make_self_signed


def _address(config: Config, text: str) -> accounts.Address:
    address = parse_mailbox(text)
    if address is None:
        raise SystemExit(f"mailboxctl: {text!r} is not a mail address")
    domain = config.canonical_domain(address.domain)
    if domain is None:
        raise SystemExit(
            f"mailboxctl: {address.domain} is not a local domain of {config.path} "
            f"({', '.join(config.mailbox.domains)})"
        )
    return accounts.Address(address.local.lower(), domain)


def _key(config: Config) -> Callable[[accounts.Address], str]:
    def key(address: accounts.Address) -> str:
        domain = config.canonical_domain(address.domain) or address.domain
        return f"{address.local.lower()}@{domain}"

    return key


def _password() -> bytes:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            raise SystemExit("mailboxctl: the passwords differ; nothing changed")
    else:
        first = sys.stdin.readline().rstrip("\r\n")
    if not first:
        raise SystemExit("mailboxctl: empty password; nothing changed")
    encoded = first.encode("utf-8")
    if len(encoded) > 72:  # bcrypt uses only the first 72 bytes; bcrypt 5 refuses more
        raise SystemExit("mailboxctl: the password is longer than 72 bytes; nothing changed")
    return encoded


def user(config: Config, args: argparse.Namespace) -> None:
    path = config.mailbox.accounts
    if args.action == "list":
        m = config.mailbox
        directory, _ = check.directory(config)
        for listed in accounts.listed(path):
            local, _, domain = listed.rpartition("@")
            used = usage(maildir_path(m.mail_dir, accounts.Account(listed, domain, local)))
            quota = directory.setting(listed, QUOTA_SETTING, m.quota)
            of = f" of {quota} ({used * 100 // quota}%)" if quota else ""
            print(f"{listed}\t{used} bytes{of}")
        return
    address = _address(config, args.address)
    if args.action == "del":
        try:
            accounts.remove(path, address, _key(config))
        except KeyError:
            raise SystemExit(f"mailboxctl: no account {address.key} in {path}") from None
        print(f"deleted {address.key} (its mail stays in {config.mailbox.mail_dir})")
        return
    hashed = bcrypt.hashpw(_password(), bcrypt.gensalt(config.mailbox.bcrypt_rounds))
    try:
        accounts.set_hash(
            path, address, hashed, must_exist=args.action == "passwd", key=_key(config)
        )
    except KeyError:
        raise SystemExit(f"mailboxctl: no account {address.key} in {path}") from None
    except FileExistsError:
        raise SystemExit(
            f"mailboxctl: {address.key} exists; use 'user passwd' to change its password"
        ) from None
    print(f"{'added' if args.action == 'add' else 'changed password of'} {address.key}")


def _state(config: Config) -> StateStore:
    try:
        return open_store(config, timeout=5.0)
    except StateError as e:
        raise SystemExit(f"mailboxctl: {e}") from None


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(seconds))


def _ip(text: str) -> str:
    try:
        return normalise_ip(str(ipaddress.ip_address(text)))
    except ValueError:
        raise SystemExit(f"mailboxctl: {text!r} is not an IP address") from None


def _client(config: Config, text: str) -> str:
    """How blocks and relay counts know a client: an IPv6 one by its network
    ([limits] ipv6_prefix), given as any address in it, or as the network."""
    if "/" in text:
        try:
            text = str(ipaddress.ip_network(text, strict=False).network_address)
        except ValueError:
            raise SystemExit(f"mailboxctl: {text!r} is not an IP address or network") from None
    return client_key(_ip(text), config.limits.ipv6_prefix)


def blocked(config: Config, args: argparse.Namespace) -> None:
    store, now = _state(config), time.time()
    if args.action == "list":
        for b in store.blocks(now):
            print(f"{b.ip}\tblocked since {_when(b.since)}\tuntil {_when(b.until)}")
        return
    ip = _client(config, args.ip)
    failures = store.failures(ip, 0.0)
    if store.unblock(ip):
        store.note(now, f"unblocked {ip}")
        print(f"unblocked {ip}")
    elif failures:
        store.note(now, f"cleared the {failures} failed logins of {ip} (it was not blocked)")
        print(f"{ip} is not blocked; cleared its {failures} failed logins")
    else:
        raise SystemExit(f"mailboxctl: {ip} is not blocked")


def popauth(config: Config, args: argparse.Namespace) -> None:
    store, now = _state(config), time.time()
    if args.action == "list":
        for a in store.popauths(now):
            print(f"{a.ip}\tuntil {_when(a.expires)}\tdomains {' '.join(a.domains)}")
        return
    ip = _ip(args.ip)
    if not store.revoke_popauth(ip):
        raise SystemExit(f"mailboxctl: {ip} has no POP-before-SMTP authorisation")
    store.note(now, f"revoked the POP-before-SMTP authorisation of {ip}")
    print(f"revoked {ip}")


def limits_command(config: Config, args: argparse.Namespace) -> None:
    store, now = _state(config), time.time()
    if args.action == "list":
        directory, _ = check.directory(config)
        default = config.limits.relay_recipients_per_hour
        for sender, count in store.relay_counts(now):
            limit = directory.setting(sender, LIMIT_SETTING, default) if "@" in sender else default
            state = (
                "over"
                if limit and count >= limit
                else "near"
                if limit and count * 5 >= limit * 4
                else "ok"
            )
            shown = f"of {limit}" if limit else "(no limit)"
            print(f"{sender}	{count} recipients relayed in the last hour {shown}	{state}")
        return
    sender = (
        _address(config, args.sender).key if "@" in args.sender else _client(config, args.sender)
    )
    if not store.reset_relay(sender):
        raise SystemExit(f"mailboxctl: {sender} relayed nothing in the last hour")
    store.note(now, f"reset the relay count of {sender}")
    print(f"reset {sender}")


def queue_command(config: Config, args: argparse.Namespace) -> None:
    directory = queue.queue_dir(config.mailbox.mail_dir)
    now = time.time()
    if args.action == "list":
        for path in queue.entry_paths(directory):
            try:
                entry = queue.load(path)
            except (queue.CorruptEntry, OSError) as e:
                print(f"{path.stem}\tunreadable: {e}")
                continue
            age = int(now - entry.received)
            print(f"{entry.id}\tage {age // 3600}h{age % 3600 // 60:02d}m\tfrom <{entry.sender}>")
            for r in entry.recipients:
                line = f"\t{r.address}\t{r.status}\tattempts {r.attempts}"
                if not r.done:
                    line += f"\tnext {_when(max(r.next_attempt, now))}"
                if r.last_error:
                    line += f"\tlast error: {r.last_error}"
                print(line)
        return
    if args.action == "flush":
        private_dir(directory)
        (directory / queue.FLUSH).touch()
        print("the running server tries every queued recipient within a second or two")
        return
    if not queue.remove(directory, args.id, config.state.node):
        raise SystemExit(f"mailboxctl: no queued message {args.id}")
    _state(config).note(now, f"deleted queued message {args.id}")
    print(f"deleted {args.id}")


def tls_command(config: Config, args: argparse.Namespace) -> None:
    cert, key = config.tls.certificate, config.tls.private_key
    if cert is None or key is None:
        raise SystemExit(
            f"mailboxctl: {config.path}: [tls] certificate and private_key are not set"
        )
    if make_self_signed(config.mailbox.hostname, cert, key):
        print(f"created a self-signed certificate for {config.mailbox.hostname} in {cert}")
    else:
        print(f"{cert} exists; left as it is")


def dkim_command(config: Config, args: argparse.Namespace) -> None:
    domain = args.domain.lower().rstrip(".")
    if config.canonical_domain(domain) is None:
        local = " ".join(config.local_domains())
        raise SystemExit(f"mailboxctl: {domain} is not a local domain ({local})")
    selector = config.dkim.selector
    if args.selector is not None:
        try:
            selector = SPEC["dkim"]["selector"][1](args.selector)
        except ValueError as e:
            raise SystemExit(f"mailboxctl: --selector {args.selector!r}: expected {e}") from None
    path = signing.key_path(config.dkim.keys, domain, selector)
    if args.action == "keygen":
        if path.exists():
            raise SystemExit(
                f"mailboxctl: {path} exists; 'mailboxctl dkim show {domain}' prints its record"
            )
        if not 1024 <= args.bits <= 8192:
            raise SystemExit(
                f"mailboxctl: --bits {args.bits}: expected 1024 to 8192 (2048 is usual)"
            )
        signing.write_key(path, signing.new_key(args.bits), config.path.stat().st_gid)
        print(f"# the key is in {path}; publish this record in {domain}'s zone:")
    try:
        print(signing.dns_record(domain, selector, path.read_bytes()))
    except FileNotFoundError:
        raise SystemExit(
            f"mailboxctl: no key for {domain} ({path}); 'mailboxctl dkim keygen {domain}' makes one"
        ) from None
    except signing.KeyProblem as e:
        raise SystemExit(f"mailboxctl: {path}: {e}") from None


def check_command(config: Config, args: argparse.Namespace) -> int:
    """Print each problem (or, with none, a summary); the exit status."""
    if args.show:
        print(check.show(config), end="")
        return 0
    try:
        user = check.RunAs.named(args.user) if args.user else check.RunAs.current()
    except KeyError:
        print(f"mailboxctl check: no user {args.user!r} on this system")
        return 1
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        accounts, skipped = check.directory(config)
        unread = []
    except OSError as e:  # this user cannot read them, whoever the server runs as
        accounts, skipped = None, []
        m, me = config.mailbox, check.RunAs.current().name
        key = "[mailbox] aliases" if str(e.filename) == str(m.aliases) else "[mailbox] accounts"
        unread = [f"{e.filename}: {key}: mailboxctl (as {me}) cannot read it: {e.strerror}"]
    found = unread + list(check.problems(config, user, now, skipped))
    if found or accounts is None:
        print(*found, sep="\n")
        return 1
    for line in check.summary(config, user, now, accounts):
        print(line)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailboxctl", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--config", default="etc/mailbox.ini", help="config file (default: %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("user", help="add, change, delete and list accounts")
    uact = u.add_subparsers(dest="action", required=True)
    for action, text in (
        ("add", "add an account"),
        ("passwd", "change a password"),
        ("del", "delete an account"),
    ):
        a = uact.add_parser(action, help=text)
        a.add_argument("address", help="the full mail address, which is also the user name")
    uact.add_parser("list", help="list the accounts")
    for command, verb, text in (
        ("blocked", "unblock", "IPs blocked after too many failed logins"),
        ("popauth", "revoke", "IPs authorised to relay by a POP3 login"),
    ):
        c = sub.add_parser(command, help=text)
        cact = c.add_subparsers(dest="action", required=True)
        cact.add_parser("list", help=f"list the {text}")
        cact.add_parser(verb, help=f"{verb} one IP").add_argument("ip")
    lim = sub.add_parser("limits", help="recipients each sender relayed in the last hour")
    lact = lim.add_subparsers(dest="action", required=True)
    lact.add_parser("list", help="who relayed, how much, and who is near or over the limit")
    lact.add_parser("reset", help="clear one sender's count").add_argument(
        "sender", help="an account (its address) or an IP address"
    )
    q = sub.add_parser("queue", help="the outbound queue")
    qact = q.add_subparsers(dest="action", required=True)
    qact.add_parser("list", help="list queued messages and their recipients")
    qact.add_parser("flush", help="try every deferred recipient now")
    qact.add_parser("delete", help="drop a queued message").add_argument("id")
    c = sub.add_parser(
        "check",
        help="check the config and everything it names; one line a problem, exit 1 if any",
    )
    c.add_argument("--show", action="store_true", help="print the config with every default")
    c.add_argument("--user", help="check access as this user (default: the one running this)")
    t = sub.add_parser("tls", help="TLS certificates")
    tact = t.add_subparsers(dest="action", required=True)
    tact.add_parser("self-signed", help="create a self-signed certificate where [tls] points")
    d = sub.add_parser("dkim", help="DKIM keys, and the DNS records to publish for them")
    dact = d.add_subparsers(dest="action", required=True)
    keygen = dact.add_parser("keygen", help="make a domain's key and print its DNS record")
    show = dact.add_parser("show", help="print the DNS record of a domain's key")
    for a in (keygen, show):
        a.add_argument("domain")
        a.add_argument("--selector", help="default: [dkim] selector")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    return p


def _check_home(config: Config) -> None:
    """Never act on other files than the server's: with relative paths and no
    [mailbox] home, the current folder must hold the appliance."""
    relative = relative_paths(config)
    m = config.mailbox
    if not relative or m.mail_dir.is_dir() or m.accounts.is_file():
        return
    named = ", ".join(f"{key} = '{path}'" for key, path in relative[:3])
    raise SystemExit(
        f"mailboxctl: {config.path}: {named} are taken from the current folder {Path.cwd()}, "
        f"which holds no appliance (neither {m.mail_dir}/ nor {m.accounts}); run mailboxctl "
        "in the appliance's home, or set [mailbox] home"
    )


def main(argv: list[str] | None = None) -> None:
    os.umask(0o077)  # what it writes is the server's user's alone
    args = parser().parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as e:
        if args.command == "check":
            print(e)
            raise SystemExit(1) from None
        raise SystemExit(e.said_by("mailboxctl")) from None
    if args.command == "check":
        raise SystemExit(check_command(config, args))
    _check_home(config)
    try:
        commands = {
            "user": user,
            "blocked": blocked,
            "popauth": popauth,
            "queue": queue_command,
            "limits": limits_command,
            "tls": tls_command,
            "dkim": dkim_command,
        }
        commands[args.command](config, args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except BrokenPipeError:
        # `mailboxctl user list | head`: the reader went; say so once, quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(
            "mailboxctl: the output was closed before everything was written"
        ) from None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise SystemExit(f"mailboxctl: {where}{e.strerror}") from None
    except StateError as e:
        raise SystemExit(f"mailboxctl: {e}") from None


if __name__ == "__main__":
    main()
