"""Accounts and address aliases: parsing, lookup, reload and atomic rewrite."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .addresses import Address, parse_mailbox

log = Logger()

BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
MAX_ALIAS_DEPTH = 10
# What an account's line may set for it alone, after the hash, in the last of
# Dovecot passwd-file's fields: address:hash:uid:gid:gecos:home:shell:key=value ...
# (the fields between are not used here, and may be empty).
OVERRIDES = ("relay_recipients_per_hour", "quota")
PASSWD_FILE_FIELDS = 8


@attrs.frozen
class Problem:
    """A line of an accounts or aliases file that was skipped, and why."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@attrs.frozen
class Account:
    """A local mailbox owner. Its domain is always canonical."""

    address: str
    domain: str
    local: str


@attrs.frozen(repr=False)
class Directory:
    """One consistent snapshot of the accounts and aliases files."""

    domains: tuple[str, ...]
    domain_aliases: dict[str, str]
    hashes: dict[str, bytes] = attrs.field(factory=dict)
    aliases: dict[str, tuple[str, ...]] = attrs.field(factory=dict)
    overrides: dict[str, dict[str, int]] = attrs.field(factory=dict)  # account -> key -> value
    # The bcrypt cost most accounts use: unknown users are checked at that cost.
    typical_cost: int | None = None

    def __repr__(self) -> str:  # never show hashes
        return f"<Directory {len(self.hashes)} accounts, {len(self.aliases)} aliases>"

    def canonical(self, address: Address) -> Address | None:
        """`address` with its domain made canonical, or None if not local."""
        if address.domain in self.domains:
            return Address(address.local.lower(), address.domain)
        canonical = self.domain_aliases.get(address.domain)
        if canonical is None:
            return None
        return Address(address.local.lower(), canonical)

    def canonical_key(self, address: Address) -> str:
        """The comparison key of a local address (its domain made canonical)."""
        c = self.canonical(address)
        return address.key if c is None else c.key

    def is_local_domain(self, domain: str) -> bool:
        return domain in self.domains or domain in self.domain_aliases

    def account(self, address: Address) -> Account | None:
        c = self.canonical(address)
        if c is None or c.key not in self.hashes:
            return None
        return Account(address=c.key, domain=c.domain, local=c.local)

    def setting(self, account: str, key: str, default: int) -> int:
        """`key` for `account` (its address, as Account.address): its own
        value from the accounts file, or `default`."""
        return self.overrides.get(account, {}).get(key, default)

    def password_hash(self, address: Address) -> bytes | None:
        c = self.canonical(address)
        return None if c is None else self.hashes.get(c.key)

    def resolve(self, address: Address) -> tuple[Account, ...]:
        """The local accounts mail for `address` goes to; empty if none."""
        return self.expand(address)[0]

    def expand(self, address: Address) -> tuple[tuple[Account, ...], tuple[str, ...]]:
        """The local accounts and the remote addresses (forwarding aliases)
        that mail for `address` goes to."""
        found: dict[str, Account] = {}
        remote: dict[str, str] = {}
        self._resolve(address, found, remote, set(), 0)
        return tuple(found.values()), tuple(remote.values())

    def _resolve(
        self,
        address: Address,
        found: dict[str, Account],
        remote: dict[str, str],
        seen: set[str],
        depth: int,
    ) -> None:
        c = self.canonical(address)
        if c is None:
            remote.setdefault(address.key, str(address))
            return
        # `seen` keeps loops and fan-out linear; the depth cap bounds long chains.
        if c.key in seen or depth > MAX_ALIAS_DEPTH:
            return
        seen.add(c.key)
        if c.key in self.aliases:
            for target in self.aliases[c.key]:
                parsed = parse_mailbox(target)
                if parsed is not None:
                    self._resolve(parsed, found, remote, seen, depth + 1)
            return
        account = self.account(c)
        if account is not None:
            found.setdefault(account.address, account)


def _entries(text: str) -> Iterator[tuple[int, str, str, str]]:
    """(line number, name, ':' or '', rest) for each line that is not blank or a comment."""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            name, sep, rest = line.partition(":")
            yield number, name.strip(), sep, rest


def _plain_key(address: Address) -> str:
    return address.key


def parse_accounts(
    text: str,
    path: Path,
    is_local: Callable[[str], bool],
    key: Callable[[Address], str] = _plain_key,
    overrides: dict[str, dict[str, int]] | None = None,
) -> tuple[dict[str, bytes], list[Problem]]:
    """Parse ``address:hash`` lines; bad lines become Problems, not failures.

    `key` gives the form accounts are compared and stored in (the loader's
    makes the domain canonical, so a domain alias cannot list one twice).
    An account's own settings (OVERRIDES) go into `overrides`, if given; a
    malformed one is a Problem, and the account keeps the defaults.
    """
    hashes: dict[str, bytes] = {}
    problems = []
    for number, address_text, sep, fields in _entries(text):
        hashed, _, rest = fields.partition(":")
        address = parse_mailbox(address_text)
        if not sep or address is None:
            problems.append(Problem(path, number, "expected address:bcrypt-hash"))
        elif not hashed.strip().startswith(BCRYPT_PREFIXES) or len(hashed.strip()) != 60:
            problems.append(
                Problem(
                    path,
                    number,
                    f"{address_text}: the hash is not bcrypt ($2a$, $2b$ or $2y$)",
                )
            )
        elif not is_local(address.domain):
            problems.append(
                Problem(path, number, f"{address}: {address.domain} is not a local domain")
            )
        elif key(address) in hashes:
            problems.append(Problem(path, number, f"{address}: listed twice; the first line wins"))
        else:
            hashes[key(address)] = hashed.strip().encode("ascii")
            found, problem = _overrides(rest)
            if problem:
                problems.append(Problem(path, number, f"{address}: {problem}"))
            elif found and overrides is not None:
                overrides[key(address)] = found
    return hashes, problems


def _overrides(rest: str) -> tuple[dict[str, int], str | None]:
    """The settings in what follows the hash, or the problem with them."""
    if not rest.strip():
        return {}, None
    fields = rest.split(":")
    if len(fields) != PASSWD_FILE_FIELDS - 2:
        return {}, (
            "expected address:hash or address:hash:uid:gid:gecos:home:shell:settings "
            "(as Dovecot's passwd-file), the settings as key=value"
        )
    found: dict[str, int] = {}
    for word in fields[-1].split():
        name, eq, value = word.partition("=")
        if name not in OVERRIDES or not eq:
            return {}, f"unknown setting {word!r}; expected one of {', '.join(OVERRIDES)}"
        if not value.isdigit():
            return {}, f"{name} = {value!r}: expected a whole number"
        found[name] = int(value)
    return found, None


def parse_aliases(
    text: str,
    path: Path,
    is_local: Callable[[str], bool],
    key: Callable[[Address], str] = _plain_key,
) -> tuple[dict[str, tuple[str, ...]], list[Problem]]:
    """Parse ``alias@domain: target[, target ...]`` lines."""
    aliases: dict[str, tuple[str, ...]] = {}
    problems = []
    for number, name, sep, rest in _entries(text):
        alias = parse_mailbox(name)
        targets = [t.strip() for t in rest.replace(",", " ").split()]
        if not sep or alias is None or not targets:
            problems.append(Problem(path, number, "expected alias@domain: target[, target ...]"))
            continue
        if not is_local(alias.domain):
            problems.append(Problem(path, number, f"{alias}: {alias.domain} is not a local domain"))
            continue
        good = []
        for target in targets:
            parsed = parse_mailbox(target)
            if parsed is None:
                problems.append(Problem(path, number, f"{target!r} is not a mail address"))
            else:
                good.append(target)  # a remote target forwards through the queue
        if good:
            aliases[key(alias)] = tuple(good)
    return aliases, problems


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def load_directory(
    accounts: Path, aliases: Path, domains: tuple[str, ...], domain_aliases: dict[str, str]
) -> tuple[Directory, list[Problem]]:
    empty = Directory(domains=domains, domain_aliases=domain_aliases)
    key = empty.canonical_key
    overrides: dict[str, dict[str, int]] = {}
    hashes, p1 = parse_accounts(_read(accounts), accounts, empty.is_local_domain, key, overrides)
    alias_map, p2 = parse_aliases(_read(aliases), aliases, empty.is_local_domain, key)
    costs = Counter(int(h[4:6]) for h in hashes.values() if h[4:6].isdigit())
    typical = costs.most_common(1)[0][0] if costs else None
    directory = attrs.evolve(
        empty, hashes=hashes, aliases=alias_map, overrides=overrides, typical_cost=typical
    )
    return directory, p1 + p2


def _stamp(path: Path) -> tuple[int, ...] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    # ctime too: a chmod or chown that makes the file readable again changes only it.
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


@attrs.define
class AccountStore:
    """The live Directory, reloaded when either file changes on disk."""

    accounts_path: Path
    aliases_path: Path
    domains: tuple[str, ...]
    domain_aliases: dict[str, str]
    clock: IReactorTime
    interval: float = 1.0
    directory: Directory = attrs.field(init=False)
    _stamps: tuple = attrs.field(init=False, default=())
    _loop: LoopingCall | None = attrs.field(init=False, default=None)
    _failing: str | None = attrs.field(init=False, default=None)  # what the last reload said

    def __attrs_post_init__(self) -> None:
        """Load both files; OSError (with the file's name) if one cannot be read."""
        self._stamps = (_stamp(self.accounts_path), _stamp(self.aliases_path))
        self._load()

    def reload(self) -> None:
        """Load both files again; if one cannot be read, keep what was loaded,
        say so once, and say so again once it can."""
        self._stamps = (_stamp(self.accounts_path), _stamp(self.aliases_path))
        try:
            self._load()
        except OSError as e:
            problem = f"{e.filename}: {e.strerror}"
            if problem != self._failing:
                log.error(
                    "cannot read {problem}; still serving the {count} accounts loaded before",
                    problem=problem,
                    count=len(self.directory.hashes),
                )
            self._failing = problem
            return
        if self._failing is not None:
            log.info("accounts and aliases readable again")
            self._failing = None

    def _load(self) -> None:
        self.directory, problems = load_directory(
            self.accounts_path, self.aliases_path, self.domains, self.domain_aliases
        )
        for problem in problems:
            log.warn("skipped {problem}", problem=str(problem))
        log.info(
            "loaded {accounts} accounts and {aliases} aliases",
            accounts=len(self.directory.hashes),
            aliases=len(self.directory.aliases),
        )

    def check(self) -> None:
        stamps = (_stamp(self.accounts_path), _stamp(self.aliases_path))
        if stamps != self._stamps or self._failing is not None:
            self.reload()

    def start(self) -> None:
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()


# --- rewriting the accounts file (mailboxctl) ---------------------------------


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise writers of `path` with a lock file beside it."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace `path` with `text`: temp file, fsync, rename, fsync the directory."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            # The new file keeps the old one's owner, group and mode: root running
            # mailboxctl must not leave a file the server's user cannot read.
            st = os.stat(path)
        except FileNotFoundError:
            os.fchmod(fd, mode)
        else:
            # ... but never readable by others: it holds the password hashes.
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o770)
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(fd, st.st_uid, st.st_gid)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _line_address(line: str, key: Callable[[Address], str] = _plain_key) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or ":" not in stripped:
        return None
    address = parse_mailbox(stripped.partition(":")[0].strip())
    return None if address is None else key(address)


def set_hash(
    path: Path,
    address: Address,
    hashed: bytes,
    *,
    must_exist: bool,
    key: Callable[[Address], str] = _plain_key,
) -> None:
    """Add or replace the line for `address`, keeping every other line as is.

    `key` compares addresses; give it the domain-alias-aware one so a line
    written as user@alias-domain is found for user@canonical-domain.
    """
    with locked(path):
        lines = _read(path).splitlines()
        new_line = f"{address.key}:{hashed.decode('ascii')}"
        found = False
        for i, line in enumerate(lines):
            if _line_address(line, key) == key(address):
                # A new password keeps the account's own settings.
                parts = line.strip().split(":", 2)
                lines[i] = new_line + (f":{parts[2]}" if len(parts) == 3 else "")
                found = True
                break
        if must_exist and not found:
            raise KeyError(address.key)
        if not must_exist and found:
            raise FileExistsError(address.key)
        if not found:
            lines.append(new_line)
        write_atomically(path, "\n".join(lines) + "\n")


def remove(path: Path, address: Address, key: Callable[[Address], str] = _plain_key) -> None:
    with locked(path):
        lines = _read(path).splitlines()
        kept = [line for line in lines if _line_address(line, key) != key(address)]
        if len(kept) == len(lines):
            raise KeyError(address.key)
        write_atomically(path, "\n".join(kept) + "\n" if kept else "")


def listed(path: Path) -> list[str]:
    return [a for a in map(_line_address, _read(path).splitlines()) if a]
