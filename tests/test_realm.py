"""The shared realm and bcrypt checker, through a Portal, with a real thread pool.

No global reactor: a stand-in whose callFromThread queues the callables, which
the test thread then runs, as the reactor thread would.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import bcrypt
import pytest
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface

from mailboxd import realm as realm_module
from mailboxd.accounts import Account, Directory, load_directory
from mailboxd.credcache import CredentialCache
from mailboxd.realm import (
    BcryptChecker,
    HashingQueue,
    IAccount,
    MailboxRealm,
    login,
    make_portal,
)

DOMAINS = ("example.test", "other.test")
DOMAIN_ALIASES = {"example.org": "example.test"}
ROUNDS = 4

ALICE_HASH = bcrypt.hashpw(b"alice pw", bcrypt.gensalt(ROUNDS, prefix=b"2b"))
BOB_HASH_2Y = b"$2y$" + bcrypt.hashpw(b"bob pw", bcrypt.gensalt(ROUNDS, prefix=b"2b"))[4:]
CAROL_HASH_2A = bcrypt.hashpw(b"carol pw", bcrypt.gensalt(ROUNDS, prefix=b"2a"))

MAIN = threading.get_ident()


class QueueReactor:
    """Just enough reactor for deferToThreadPool: callFromThread queues work."""

    def __init__(self) -> None:
        self.calls: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.calls.put((f, args, kwargs))

    def wait(self, d: Deferred, timeout: float = 30):
        """Run queued calls on this thread until `d` fires; its result or Failure."""
        results: list = []
        d.addBoth(results.append)
        deadline = time.monotonic() + timeout
        while not results:
            f, args, kwargs = self.calls.get(timeout=max(0.0, deadline - time.monotonic()))
            assert threading.get_ident() == MAIN
            f(*args, **kwargs)
        return results[0]


@pytest.fixture
def pool():
    p = ThreadPool(minthreads=1, maxthreads=2, name="test-bcrypt")
    p.start()
    yield p
    p.stop()


@pytest.fixture
def reactor():
    return QueueReactor()


@pytest.fixture
def directory(tmp_path):
    (tmp_path / "accounts").write_text(
        f"alice@example.test:{ALICE_HASH.decode()}\n"
        f"bob@other.test:{BOB_HASH_2Y.decode()}\n"
        f"carol@example.test:{CAROL_HASH_2A.decode()}\n"
    )
    d, problems = load_directory(
        tmp_path / "accounts", tmp_path / "aliases", DOMAINS, dict(DOMAIN_ALIASES)
    )
    assert problems == []
    holder = {"d": d}
    return holder


@pytest.fixture
def portal(directory, reactor, pool):
    def current():
        return directory["d"]

    checker = checker_for(current, reactor, pool)
    return make_portal(MailboxRealm(current), checker)


def checker_for(directory, reactor, pool, ttl: float = 0, now=time.monotonic) -> BcryptChecker:
    """A checker hashing in `pool`; with `ttl`, it remembers verified passwords."""

    def run(f, *args):
        return deferToThreadPool(reactor, pool, f, *args)

    return BcryptChecker(
        directory, HashingQueue(run, per_client=2), CredentialCache(ttl, now), rounds=ROUNDS
    )


def attempt(portal, reactor, username: bytes, password: bytes):
    return reactor.wait(portal.login(UsernamePassword(username, password), None, IAccount))


def account(address: str) -> Account:
    local, domain = address.split("@")
    return Account(address=address, domain=domain, local=local)


# --- right and wrong ----------------------------------------------------------


@pytest.mark.parametrize(
    "username,password,expected",
    [
        (b"alice@example.test", b"alice pw", "alice@example.test"),
        (b"ALICE@Example.TEST", b"alice pw", "alice@example.test"),
        (b"alice@example.org", b"alice pw", "alice@example.test"),
        (b"bob@other.test", b"bob pw", "bob@other.test"),  # a $2y$ hash
        (b"carol@example.test", b"carol pw", "carol@example.test"),  # a $2a$ hash
    ],
)
def test_right_password_gives_the_account(portal, reactor, username, password, expected):
    result = attempt(portal, reactor, username, password)
    assert not isinstance(result, Failure), result
    interface, avatar, logout = result
    assert interface is IAccount
    assert avatar == account(expected)
    logout()


@pytest.mark.parametrize(
    "username,password",
    [
        (b"alice@example.test", b"wrong"),
        (b"alice@example.test", b""),
        (b"alice@example.test", b"alice pw "),
        (b"alice@example.test", b"ALICE PW"),
        (b"bob@other.test", b"alice pw"),
        (b"nobody@example.test", b"alice pw"),
        (b"alice@far.test", b"alice pw"),  # not a local domain
        (b"alice@other.test", b"alice pw"),  # other.test is not an alias of example.test
        (b"alice", b"alice pw"),
        (b"", b""),
        (b"@example.test", b"alice pw"),
        (b"alice@example.test@far.test", b"alice pw"),
        (b"alice@example.test\x00", b"alice pw"),
        (b"\xff\xfe@example.test", b"alice pw"),
        (b"alice@example.test", b"x" * 100),  # bcrypt 5 refuses > 72 bytes
        (b"alice@example.test", b"alice\x00pw"),
    ],
)
def test_refused_logins_are_unauthorized(portal, reactor, username, password):
    result = attempt(portal, reactor, username, password)
    assert isinstance(result, Failure), result
    assert result.check(UnauthorizedLogin), result


def test_login_helper(portal, reactor):
    result = reactor.wait(Deferred.fromCoroutine(login(portal, "alice@example.test", b"alice pw")))
    assert result == account("alice@example.test")
    result = reactor.wait(Deferred.fromCoroutine(login(portal, "alice@example.test", b"no")))
    assert isinstance(result, Failure) and result.check(UnauthorizedLogin)


def _directory_with(hashes: dict[str, bytes]):
    return Directory(DOMAINS, dict(DOMAIN_ALIASES), hashes=dict(hashes)), []


def test_y_hash_made_from_a_b_hash(reactor, pool):
    b_hash = bcrypt.hashpw(b"secret", bcrypt.gensalt(ROUNDS, prefix=b"2b"))
    y_hash = b"$2y$" + b_hash[4:]
    directory, _ = _directory_with({"dave@example.test": y_hash})
    checker = checker_for(lambda: directory, reactor, pool)
    portal = make_portal(MailboxRealm(lambda: directory), checker)
    assert attempt(portal, reactor, b"dave@example.test", b"secret")[1] == account(
        "dave@example.test"
    )
    assert attempt(portal, reactor, b"dave@example.test", b"Secret").check(UnauthorizedLogin)


def test_account_deleted_between_check_and_avatar(directory, reactor, pool):
    def current():
        return directory["d"]

    checker = checker_for(current, reactor, pool)
    portal = make_portal(MailboxRealm(current), checker)
    d = portal.login(UsernamePassword(b"alice@example.test", b"alice pw"), None, IAccount)
    directory["d"], _ = _directory_with({})  # mailboxctl user del, reloaded meanwhile
    result = reactor.wait(d)
    assert isinstance(result, Failure) and result.check(UnauthorizedLogin)


def test_realm_serves_only_iaccount(directory):
    class IOther(Interface):
        pass

    realm = MailboxRealm(lambda: directory["d"])
    with pytest.raises(NotImplementedError):
        realm.requestAvatar(b"alice@example.test", None, IOther)
    iface, avatar, _ = realm.requestAvatar(b"alice@example.test", None, IOther, IAccount)
    assert iface is IAccount and avatar == account("alice@example.test")


def test_checker_repr_shows_no_hash(portal, reactor):
    attempt(portal, reactor, b"nobody@example.test", b"x")  # makes the dummy hash
    checker = portal.checkers[IUsernamePassword]
    text = repr(checker)
    assert "$2" not in text and ALICE_HASH.decode()[7:] not in text


# --- off the reactor thread, and the same cost for unknown users ---------------


@pytest.fixture
def spy(monkeypatch):
    """Record the thread and hash of every bcrypt.checkpw/hashpw call."""
    calls: list[tuple[str, int, bytes]] = []
    real_checkpw, real_hashpw = bcrypt.checkpw, bcrypt.hashpw

    def checkpw(password, hashed):
        calls.append(("checkpw", threading.get_ident(), hashed))
        return real_checkpw(password, hashed)

    def hashpw(password, salt):
        calls.append(("hashpw", threading.get_ident(), salt))
        return real_hashpw(password, salt)

    monkeypatch.setattr(bcrypt, "checkpw", checkpw)
    monkeypatch.setattr(bcrypt, "hashpw", hashpw)
    assert realm_module.bcrypt is bcrypt
    return calls


@pytest.mark.parametrize(
    "username,password",
    [
        (b"alice@example.test", b"alice pw"),
        (b"alice@example.test", b"wrong"),
        (b"nobody@example.test", b"wrong"),
        (b"not an address", b"wrong"),
    ],
)
def test_checkpw_runs_on_a_pool_thread(portal, reactor, spy, username, password):
    attempt(portal, reactor, username, password)
    checks = [c for c in spy if c[0] == "checkpw"]
    assert len(checks) == 1
    assert checks[0][1] != MAIN, "bcrypt.checkpw ran on the calling (reactor) thread"


def test_no_bcrypt_work_on_the_calling_thread(portal, reactor, spy):
    # The first unknown user makes the checker build its dummy hash: that is a
    # full bcrypt hash and must not run on the reactor thread either.
    attempt(portal, reactor, b"nobody@example.test", b"wrong")
    attempt(portal, reactor, b"alice@example.test", b"alice pw")
    on_main = [(name, salt[:7]) for name, ident, salt in spy if ident == MAIN]
    assert on_main == [], f"bcrypt ran on the calling thread: {on_main}"


@pytest.mark.parametrize(
    "username", [b"nobody@example.test", b"nobody@example.org", b"alice@far.test", b"junk"]
)
def test_unknown_user_costs_one_bcrypt_check_like_a_wrong_password(portal, reactor, spy, username):
    attempt(portal, reactor, b"alice@example.test", b"wrong")
    wrong = [c for c in spy if c[0] == "checkpw"]
    spy.clear()
    attempt(portal, reactor, username, b"wrong")
    unknown = [c for c in spy if c[0] == "checkpw"]
    assert len(wrong) == 1 and len(unknown) == 1
    # The dummy hash has the same cost as the real one: "$2b$04$".
    assert unknown[0][2][:7] == wrong[0][2][:7] == b"$2b$%02d$" % ROUNDS


def test_logins_run_concurrently_in_the_pool(directory, reactor, pool):
    # Several attempts at once all complete; none is lost between threads.
    checker = checker_for(lambda: directory["d"], reactor, pool)
    portal = make_portal(MailboxRealm(lambda: directory["d"]), checker)
    ds = [
        portal.login(
            UsernamePassword(b"alice@example.test", b"alice pw" if i % 2 else b"no"),
            None,
            IAccount,
        )
        for i in range(8)
    ]
    results = [reactor.wait(d) for d in ds]
    ok = [r for r in results if not isinstance(r, Failure)]
    assert len(ok) == 4
    assert all(r[1] == account("alice@example.test") for r in ok)


def test_module_imports_no_global_reactor():
    source = Path(realm_module.__file__).read_text()
    assert "from twisted.internet import reactor" not in source


def test_unknown_user_is_checked_at_the_cost_the_accounts_use(directory, reactor, pool, spy):
    # htpasswd -B writes cost 5; a dummy at the configured cost would be told apart.
    import attrs

    d = attrs.evolve(directory["d"], typical_cost=5)
    checker = checker_for(lambda: d, reactor, pool)
    portal = make_portal(MailboxRealm(lambda: d), checker)
    attempt(portal, reactor, b"nobody@example.test", b"wrong")
    [check] = [c for c in spy if c[0] == "checkpw"]
    assert check[2][:7] == b"$2b$05$"


def test_typical_cost_is_the_most_common_one(tmp_path):
    from mailboxd.accounts import load_directory

    h5 = bcrypt.hashpw(b"x", bcrypt.gensalt(5)).decode()
    h4 = bcrypt.hashpw(b"x", bcrypt.gensalt(4)).decode()
    (tmp_path / "a").write_text(f"a@example.test:{h5}\nb@example.test:{h5}\nc@example.test:{h4}\n")
    d, _ = load_directory(tmp_path / "a", tmp_path / "none", ("example.test",), {})
    assert d.typical_cost == 5
