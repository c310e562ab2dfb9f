"""mailboxctl: administer accounts (and later blocks, POP authorisations, the queue)."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable

import bcrypt

from . import accounts
from .addresses import parse_mailbox
from .config import Config, ConfigError, load


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
        for address in accounts.listed(path):
            print(address)
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailboxctl", description=__doc__)
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
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as e:
        raise SystemExit(f"mailboxctl: {e}") from None
    try:
        {"user": user}[args.command](config, args)
    except OSError as e:
        raise SystemExit(f"mailboxctl: {e.filename or ''}: {e.strerror}") from None


if __name__ == "__main__":
    main()
