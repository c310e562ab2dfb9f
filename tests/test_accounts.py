"""Accounts and aliases: parsing, lookup, reload, atomic rewrite and mailboxctl."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest
from twisted.internet.task import Clock

from mailboxd import accounts
from mailboxd.accounts import Account, AccountStore, parse_accounts, parse_aliases
from mailboxd.addresses import parse_mailbox

ROOT = Path(__file__).resolve().parent.parent
MAILBOXCTL = Path(sys.executable).parent / "mailboxctl"

DOMAINS = ("example.test", "other.test")
DOMAIN_ALIASES = {"example.org": "example.test"}


def make_hash(password: bytes = b"pw", prefix: bytes = b"2b") -> str:
    return bcrypt.hashpw(password, bcrypt.gensalt(4, prefix=prefix)).decode("ascii")


H1 = make_hash(b"one")
H2 = make_hash(b"two")


def is_local(domain: str) -> bool:
    return domain in DOMAINS or domain in DOMAIN_ALIASES


def addr(text: str):
    a = parse_mailbox(text)
    assert a is not None, text
    return a


def load(tmp_path: Path, accounts_text: str, aliases_text: str = ""):
    (tmp_path / "accounts").write_text(accounts_text)
    (tmp_path / "aliases").write_text(aliases_text)
    return accounts.load_directory(
        tmp_path / "accounts", tmp_path / "aliases", DOMAINS, dict(DOMAIN_ALIASES)
    )


def acct(address: str) -> Account:
    local, domain = address.split("@")
    return Account(address=address, domain=domain, local=local)


# --- parse_accounts -----------------------------------------------------------


def test_parse_accounts_skips_bad_lines_with_their_numbers():
    path = Path("/etc/mailbox/accounts")
    text = "\n".join(
        [
            "# accounts",  # 1
            "",  # 2
            f"alice@example.test:{H1}",  # 3 good
            "no colon here",  # 4
            f"not an address:{H1}",  # 5
            "bob@example.test:plaintext-password",  # 6
            f"carol@far.test:{H1}",  # 7 not a local domain
            f"ALICE@example.test:{H2}",  # 8 listed twice
            f"dave@example.test:{H1[:-1]}",  # 9 truncated hash
            "erin@example.test:$1$saltsalt$abcdefghijklmnopqrstuv",  # 10 md5-crypt
            f"  frank@other.test : {H2}  ",  # 11 good, with spaces
            f"gina@example.test:$2x${H1[4:]}",  # 12 not a prefix we accept
            "   # indented comment",  # 13
            f"henry@example.org:{H1}",  # 14 good, a domain alias
        ]
    )
    hashes, problems = parse_accounts(text, path, is_local)
    assert hashes == {
        "alice@example.test": H1.encode(),
        "frank@other.test": H2.encode(),
        "henry@example.org": H1.encode(),
    }
    assert [p.line for p in problems] == [4, 5, 6, 7, 8, 9, 10, 12]
    for p in problems:
        assert p.path == path
        assert str(p).startswith(f"{path}:{p.line}: ")
        assert "\n" not in str(p)
    by_line = {p.line: p.reason for p in problems}
    assert "not bcrypt" in by_line[6]
    assert "not a local domain" in by_line[7]
    assert "twice" in by_line[8]


def test_problems_never_show_the_hash():
    _hashes, problems = parse_accounts(
        f"carol@far.test:{H1}\nalice@example.test:{H1}\nalice@example.test:{H2}\n",
        Path("a"),
        is_local,
    )
    assert len(problems) == 2
    for p in problems:
        assert H1 not in str(p) and H2 not in str(p)
        assert H1[7:] not in repr(p) and H2[7:] not in repr(p)


@pytest.mark.parametrize("prefix", [b"2a", b"2b", b"2y"])
def test_all_bcrypt_prefixes_are_accepted(prefix):
    if prefix == b"2y":
        hashed = "$2y$" + make_hash(b"pw")[4:]
    else:
        hashed = make_hash(b"pw", prefix)
    assert hashed.startswith(f"${prefix.decode()}$")
    hashes, problems = parse_accounts(f"alice@example.test:{hashed}\n", Path("a"), is_local)
    assert problems == []
    assert hashes == {"alice@example.test": hashed.encode()}


def test_crlf_and_missing_final_newline():
    hashes, problems = parse_accounts(
        f"alice@example.test:{H1}\r\nbob@other.test:{H2}", Path("a"), is_local
    )
    assert problems == []
    assert set(hashes) == {"alice@example.test", "bob@other.test"}


def test_addresses_compare_case_insensitively(tmp_path):
    d, problems = load(tmp_path, f"Alice@EXAMPLE.Test:{H1}\n")
    assert problems == []
    for text in ("alice@example.test", "ALICE@EXAMPLE.TEST", "aLiCe@Example.Org"):
        assert d.account(addr(text)) == acct("alice@example.test"), text
        assert d.password_hash(addr(text)) == H1.encode(), text


def test_domain_alias_canonicalisation(tmp_path):
    d, problems = load(tmp_path, f"bob@EXAMPLE.ORG:{H1}\ncarol@other.test:{H2}\n")
    assert problems == []
    # An account written with the alias domain is stored under the canonical one.
    assert set(d.hashes) == {"bob@example.test", "carol@other.test"}
    assert d.account(addr("bob@example.test")) == acct("bob@example.test")
    assert d.account(addr("bob@example.org")) == acct("bob@example.test")
    # other.test has no alias; carol@example.org is a different, unknown person.
    assert d.account(addr("carol@example.org")) is None
    assert d.account(addr("bob@far.test")) is None
    assert d.canonical(addr("X@Example.Org")) == addr("x@example.test")
    assert d.canonical(addr("x@far.test")) is None


def test_same_account_twice_via_domain_alias_first_line_wins(tmp_path):
    # alice@example.org *is* alice@example.test: the second line is a duplicate.
    d, problems = load(tmp_path, f"alice@example.test:{H1}\nalice@example.org:{H2}\n")
    assert d.password_hash(addr("alice@example.test")) == H1.encode()
    assert [p.line for p in problems] == [2]


# --- parse_aliases ------------------------------------------------------------


def test_parse_aliases_skips_bad_lines_with_their_numbers():
    path = Path("/etc/mailbox/aliases")
    text = "\n".join(
        [
            "# aliases",  # 1
            "postmaster@example.test: alice@example.test",  # 2 good
            "no colon here",  # 3
            "info@example.test:",  # 4 no targets
            "not an address: alice@example.test",  # 5
            "x@far.test: alice@example.test",  # 6 alias in a remote domain
            "sales@example.test: alice@example.test, not-an-address, bob@far.test",  # 7 partly
            "team@example.org: alice@example.test bob@other.test",  # 8 good, space separated
            "",  # 9
            "only-remote@example.test: someone@far.test",  # 10 good: forwards
        ]
    )
    aliases, problems = parse_aliases(text, path, is_local)
    assert aliases == {
        "postmaster@example.test": ("alice@example.test",),
        "sales@example.test": ("alice@example.test", "bob@far.test"),
        "team@example.org": ("alice@example.test", "bob@other.test"),
        "only-remote@example.test": ("someone@far.test",),
    }
    assert [p.line for p in problems] == [3, 4, 5, 6, 7]
    for p in problems:
        assert str(p).startswith(f"{path}:{p.line}: ") and "\n" not in str(p)


# --- alias resolution ---------------------------------------------------------


def test_forwarding_alias_expands_to_remote_targets(tmp_path):
    d, _ = load(
        tmp_path,
        f"alice@example.test:{H1}\n",
        "fwd@example.test: alice@example.test, Far@Far.test\nchain@example.org: fwd@example.test\n",
    )
    assert d.expand(addr("chain@example.test")) == (
        (acct("alice@example.test"),),
        ("Far@far.test",),
    )
    assert d.resolve(addr("fwd@example.test")) == (acct("alice@example.test"),)


ACCOUNTS = f"alice@example.test:{H1}\nbob@other.test:{H2}\n"


def test_alias_to_account(tmp_path):
    d, _ = load(tmp_path, ACCOUNTS, "postmaster@example.test: alice@example.test\n")
    assert d.resolve(addr("postmaster@example.test")) == (acct("alice@example.test"),)
    assert d.resolve(addr("PostMaster@EXAMPLE.ORG")) == (acct("alice@example.test"),)
    assert d.resolve(addr("alice@example.test")) == (acct("alice@example.test"),)
    assert d.resolve(addr("alice@example.org")) == (acct("alice@example.test"),)


def test_alias_written_with_domain_alias_and_targets_in_alias_domain(tmp_path):
    d, _ = load(tmp_path, ACCOUNTS, "info@example.org: ALICE@example.org, bob@other.test\n")
    assert set(d.resolve(addr("info@example.test"))) == {
        acct("alice@example.test"),
        acct("bob@other.test"),
    }


def test_alias_chain(tmp_path):
    d, _ = load(
        tmp_path,
        ACCOUNTS,
        "a@example.test: b@example.test\n"
        "b@example.test: c@other.test\n"
        "c@other.test: bob@other.test\n",
    )
    assert d.resolve(addr("a@example.test")) == (acct("bob@other.test"),)


def test_alias_fan_out_is_deduplicated(tmp_path):
    d, _ = load(
        tmp_path,
        ACCOUNTS,
        "all@example.test: alice@example.test, ALICE@example.org, staff@example.test\n"
        "staff@example.test: alice@example.test, bob@other.test\n",
    )
    result = d.resolve(addr("all@example.test"))
    assert sorted(a.address for a in result) == ["alice@example.test", "bob@other.test"]


def test_alias_unknown_target_resolves_to_nothing(tmp_path):
    d, _ = load(tmp_path, ACCOUNTS, "ghost@example.test: nobody@example.test\n")
    assert d.resolve(addr("ghost@example.test")) == ()
    assert d.resolve(addr("nobody@example.test")) == ()
    assert d.resolve(addr("someone@far.test")) == ()


class Timeout(Exception):
    pass


@pytest.fixture
def deadline():
    """Fail (instead of hanging) if the test body runs longer than 2 seconds."""

    def expire(signum, frame):
        raise Timeout("took longer than 2 seconds")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 2)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def test_alias_self_loop_does_not_hang(tmp_path, deadline):
    d, _ = load(
        tmp_path,
        ACCOUNTS,
        "loop@example.test: loop@example.test, alice@example.test\n"
        "x@example.test: y@example.test\n"
        "y@example.test: x@example.test\n",
    )
    assert d.resolve(addr("loop@example.test")) == (acct("alice@example.test"),)
    assert d.resolve(addr("x@example.test")) == ()


def test_alias_loop_with_fan_out_does_not_hang(tmp_path, deadline):
    # Five aliases that each point at all five (and at alice): every path is
    # walked again unless visited aliases are remembered (5**11 steps).
    names = [f"l{i}@example.test" for i in range(5)]
    text = "".join(f"{n}: {', '.join(names)}, alice@example.test\n" for n in names)
    d, problems = load(tmp_path, ACCOUNTS, text)
    assert problems == []
    assert d.resolve(addr("l0@example.test")) == (acct("alice@example.test"),)


# --- AccountStore -------------------------------------------------------------


def test_store_reloads_on_change_driven_by_clock(tmp_path):
    (tmp_path / "accounts").write_text(f"alice@example.test:{H1}\n")
    clock = Clock()
    store = AccountStore(
        tmp_path / "accounts", tmp_path / "aliases", DOMAINS, dict(DOMAIN_ALIASES), clock
    )
    store.start()
    try:
        assert store.directory.account(addr("alice@example.test"))
        assert store.directory.account(addr("bob@other.test")) is None
        accounts.write_atomically(
            tmp_path / "accounts", f"alice@example.test:{H1}\nbob@other.test:{H2}\n"
        )
        assert store.directory.account(addr("bob@other.test")) is None  # not before a tick
        clock.advance(store.interval)
        assert store.directory.account(addr("bob@other.test")) == acct("bob@other.test")

        (tmp_path / "aliases").write_text("info@example.test: bob@other.test\n")
        clock.advance(store.interval)
        assert store.directory.resolve(addr("info@example.org")) == (acct("bob@other.test"),)

        before = store.directory
        clock.advance(store.interval * 5)
        assert store.directory is before  # nothing changed, nothing reloaded

        (tmp_path / "accounts").unlink()
        clock.advance(store.interval)
        assert store.directory.account(addr("alice@example.test")) is None
    finally:
        store.stop()
    assert clock.getDelayedCalls() == []


def test_store_with_missing_files_is_empty(tmp_path):
    store = AccountStore(
        tmp_path / "nope", tmp_path / "nope2", DOMAINS, dict(DOMAIN_ALIASES), Clock()
    )
    assert store.directory.hashes == {} and store.directory.aliases == {}


def test_directory_repr_shows_no_hash(tmp_path):
    (tmp_path / "accounts").write_text(f"alice@example.test:{H1}\nbob@other.test:{H2}\n")
    store = AccountStore(
        tmp_path / "accounts", tmp_path / "aliases", DOMAINS, dict(DOMAIN_ALIASES), Clock()
    )
    for text in (repr(store.directory), str(store.directory), repr(store)):
        assert "$2" not in text, text
        assert H1[7:] not in text and H2[7:] not in text, text
    assert "2 accounts" in repr(store.directory)


# --- rewriting the accounts file ----------------------------------------------


def test_write_atomically_keeps_the_mode_but_for_others_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "accounts"
    path.write_text("old\n")
    path.chmod(0o644)
    old_umask = os.umask(0)
    try:
        accounts.write_atomically(path, "new text\n")
    finally:
        os.umask(old_umask)
    assert path.read_text() == "new text\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the hashes: never for others
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accounts"]


def test_write_atomically_creates_a_new_file(tmp_path):
    path = tmp_path / "accounts"
    accounts.write_atomically(path, "x\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["accounts"]


def test_write_atomically_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "accounts"
    path.write_text("old\n")

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        accounts.write_atomically(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["accounts"]


FILE = (
    "# Accounts: one address:bcrypt-hash a line.\n"
    "\n"
    f"Alice@Example.test:{H1}\n"
    "# bob is on leave\n"
    f"bob@other.test:{H2}\n"
    "garbage line kept as is\n"
)


def test_set_hash_replaces_only_that_line(tmp_path):
    path = tmp_path / "accounts"
    path.write_text(FILE)
    new = make_hash(b"three")
    accounts.set_hash(path, addr("alice@example.test"), new.encode(), must_exist=True)
    assert path.read_text() == FILE.replace(f"Alice@Example.test:{H1}", f"alice@example.test:{new}")
    assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_set_hash_adds_at_the_end(tmp_path):
    path = tmp_path / "accounts"
    path.write_text(FILE)
    accounts.set_hash(path, addr("carol@other.test"), H1.encode(), must_exist=False)
    assert path.read_text() == FILE + f"carol@other.test:{H1}\n"


def test_set_hash_refuses_duplicate_and_unknown(tmp_path):
    path = tmp_path / "accounts"
    path.write_text(FILE)
    with pytest.raises(FileExistsError):
        accounts.set_hash(path, addr("ALICE@example.test"), H2.encode(), must_exist=False)
    with pytest.raises(KeyError):
        accounts.set_hash(path, addr("zed@example.test"), H2.encode(), must_exist=True)
    assert path.read_text() == FILE


def test_remove_keeps_comments_and_other_lines(tmp_path):
    path = tmp_path / "accounts"
    path.write_text(FILE)
    accounts.remove(path, addr("alice@example.test"))
    assert path.read_text() == FILE.replace(f"Alice@Example.test:{H1}\n", "")
    with pytest.raises(KeyError):
        accounts.remove(path, addr("alice@example.test"))
    assert accounts.listed(path) == ["bob@other.test"]


# --- mailboxctl ---------------------------------------------------------------


@pytest.fixture
def home(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "mailbox.ini").write_text(
        "[mailbox]\n"
        "domains = example.test other.test\n"
        "domain_aliases = example.org=example.test\n"
        f"accounts = {tmp_path}/etc/accounts\n"
        f"aliases = {tmp_path}/etc/aliases\n"
        f"mail_dir = {tmp_path}/mailbox\n"
        "bcrypt_rounds = 4\n"
    )
    (tmp_path / "etc" / "accounts").write_text("# accounts\n")
    return tmp_path


def ctl(home: Path, *args: str, stdin: str = "") -> tuple[int, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [str(MAILBOXCTL), "--config", str(home / "etc" / "mailbox.ini"), *args],
        cwd=home,
        env=env,
        input=stdin.encode(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=60,
    )
    return proc.returncode, proc.stdout.decode("utf-8", "replace")


def hash_of(home: Path, address: str) -> bytes:
    for line in (home / "etc" / "accounts").read_text().splitlines():
        if line.startswith(address + ":"):
            return line.partition(":")[2].encode()
    raise AssertionError(f"{address} not in the accounts file")


def test_ctl_add_passwd_del_list(home):
    accounts_file = home / "etc" / "accounts"
    code, out = ctl(home, "user", "add", "Alice@Example.TEST", stdin="s3cret pw\n")
    assert code == 0, out
    assert out.strip() == "added alice@example.test"
    hashed = hash_of(home, "alice@example.test")
    assert bcrypt.checkpw(b"s3cret pw", hashed)
    assert hashed.startswith(b"$2b$04$"), "the configured bcrypt_rounds = 4 was not used"
    assert stat.S_IMODE(accounts_file.stat().st_mode) & 0o007 == 0
    assert accounts_file.read_text().startswith("# accounts\n")

    code, out = ctl(home, "user", "add", "bob@example.org", stdin="bob pw\n")
    assert code == 0, out
    assert out.strip() == "added bob@example.test"

    code, out = ctl(home, "user", "list")
    assert code == 0, out
    assert out.splitlines() == ["alice@example.test\t0 bytes", "bob@example.test\t0 bytes"]

    code, out = ctl(home, "user", "passwd", "alice@example.test", stdin="new pw\n")
    assert code == 0, out
    hashed = hash_of(home, "alice@example.test")
    assert bcrypt.checkpw(b"new pw", hashed)
    assert not bcrypt.checkpw(b"s3cret pw", hashed)
    assert hashed.startswith(b"$2b$04$")
    assert bcrypt.checkpw(b"bob pw", hash_of(home, "bob@example.test"))

    code, out = ctl(home, "user", "del", "ALICE@example.org")
    assert code == 0, out
    assert "alice@example.test" in out
    code, out = ctl(home, "user", "list")
    assert out.splitlines() == ["bob@example.test\t0 bytes"]
    assert accounts_file.read_text().startswith("# accounts\n")
    assert sorted(p.name for p in (home / "etc").iterdir() if not p.name.endswith(".lock")) == [
        "accounts",
        "mailbox.ini",
    ]


def test_ctl_written_file_loads_back(home):
    assert ctl(home, "user", "add", "carol@other.test", stdin="pw\n")[0] == 0
    d, problems = accounts.load_directory(
        home / "etc" / "accounts", home / "etc" / "aliases", DOMAINS, dict(DOMAIN_ALIASES)
    )
    assert problems == []
    assert d.account(addr("carol@other.test")) == acct("carol@other.test")


@pytest.fixture
def with_alice(home):
    code, out = ctl(home, "user", "add", "alice@example.test", stdin="alice pw\n")
    assert code == 0, out
    return home


CTL_ERRORS = [
    ("unknown-domain", ["user", "add", "x@far.test"], "pw\n", "far.test"),
    ("not-an-address", ["user", "add", "not-an-address"], "pw\n", "not-an-address"),
    ("duplicate-add", ["user", "add", "alice@example.test"], "pw\n", "alice@example.test"),
    ("duplicate-add-alias-domain", ["user", "add", "ALICE@example.org"], "pw\n", "alice"),
    ("passwd-unknown", ["user", "passwd", "zed@example.test"], "pw\n", "zed@example.test"),
    ("del-unknown", ["user", "del", "zed@example.test"], "", "zed@example.test"),
    ("empty-password", ["user", "add", "zed@example.test"], "\n", "password"),
    ("no-password", ["user", "add", "zed@example.test"], "", "password"),
    ("empty-passwd", ["user", "passwd", "alice@example.test"], "\n", "password"),
    # bcrypt >= 5 raises ValueError for more than 72 bytes of password.
    ("long-password", ["user", "add", "zed@example.test"], "x" * 100 + "\n", "72"),
]


@pytest.mark.parametrize(
    "args,stdin,needle", [e[1:] for e in CTL_ERRORS], ids=[e[0] for e in CTL_ERRORS]
)
def test_ctl_errors_are_one_line(with_alice, args, stdin, needle):
    before = (with_alice / "etc" / "accounts").read_text()
    code, out = ctl(with_alice, *args, stdin=stdin)
    assert code != 0, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("mailboxctl: "), out
    assert needle in lines[0], out
    assert (with_alice / "etc" / "accounts").read_text() == before


def test_ctl_missing_config_is_one_line(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [str(MAILBOXCTL), "--config", "missing.ini", "user", "list"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=60,
    )
    out = proc.stdout.decode()
    assert proc.returncode != 0
    assert "Traceback" not in out
    assert len(out.strip().splitlines()) == 1 and "missing.ini" in out


def test_ctl_passwd_finds_a_line_written_with_a_domain_alias(home):
    # An operator pasted `htpasswd -nbB alice@example.org ...` output; the server
    # knows this account as alice@example.test, and so must mailboxctl.
    (home / "etc" / "accounts").write_text(f"alice@example.org:{H1}\n")
    code, out = ctl(home, "user", "passwd", "alice@example.org", stdin="new pw\n")
    assert code == 0, out
    d, _ = accounts.load_directory(
        home / "etc" / "accounts", home / "etc" / "aliases", DOMAINS, dict(DOMAIN_ALIASES)
    )
    assert bcrypt.checkpw(b"new pw", d.password_hash(addr("alice@example.test")))


# --- an account's own settings (Dovecot passwd-file's last field) -----------------

HASH4 = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()


@pytest.mark.parametrize(
    "rest, settings, problem",
    [
        ("", None, None),
        ("::::::relay_recipients_per_hour=2000", {"relay_recipients_per_hour": 2000}, None),
        (
            ":1000:1000:Alice:/home/alice:/bin/sh:relay_recipients_per_hour=0",
            {"relay_recipients_per_hour": 0},
            None,
        ),
        ("::::::", None, None),
        (":relay_recipients_per_hour=5", None, "expected address:hash or address:hash:uid:gid"),
        ("::::::quota_bytes=5", None, "unknown setting 'quota_bytes=5'"),
        ("::::::relay_recipients_per_hour=lots", None, "relay_recipients_per_hour = 'lots'"),
    ],
)
def test_an_accounts_line_may_carry_settings(rest, settings, problem):
    overrides: dict = {}
    hashes, problems = parse_accounts(
        f"alice@example.test:{HASH4}{rest}\n", Path("accounts"), lambda d: True, overrides=overrides
    )
    assert list(hashes) == ["alice@example.test"]  # a bad setting never locks the account out
    assert overrides.get("alice@example.test") == settings
    if problem is None:
        assert problems == []
    else:
        [p] = problems
        assert str(p).startswith("accounts:1: alice@example.test: ") and problem in str(p), str(p)
