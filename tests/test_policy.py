"""The pure SMTP policy as tables: `decide` (RCPT TO) and `decide_sender` (MAIL FROM).

Every address reaches the policy the way the SMTP server passes it on: the path
goes through `smtp.parse_path` (which drops a leading source route), then
`parse_mailbox`; a path that does not parse never reaches the policy, because
the server answers 501 first. The expected replies are the ones DESIGN.md fixes.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
from pathlib import Path

import bcrypt
import pytest

from mailboxd.accounts import Account, Directory, load_directory
from mailboxd.addresses import Address, parse_mailbox
from mailboxd.policy import Client, Listener, Verdict, decide, decide_sender, is_trusted
from mailboxd.smtp import parse_path

MTA, SUB = Listener.MTA, Listener.SUBMISSION

# The exact replies DESIGN.md fixes, "<rcpt>" / "<sender>" filled in.
RCPT_OK = "250 2.1.5 Ok"
SENDER_OK = "250 2.1.0 Ok"
RELAY_DENIED = "554 5.7.1 <{}>: Relay access denied"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
USER_UNKNOWN = "550 5.1.1 <{}>: Recipient address rejected: User unknown"
SENDER_REJECTED = "553 5.1.0 <{}> sender rejected"

ALICE = Account(address="alice@example.test", domain="example.test", local="alice")
BOB = Account(address="bob@other.test", domain="other.test", local="bob")

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
OUTSIDE = "192.0.2.10"


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Directory:
    """Domains example.test and other.test, example.org=example.test, two accounts."""
    home: Path = tmp_path_factory.mktemp("policy")
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode("ascii")
    (home / "accounts").write_text(
        f"alice@example.test:{hashed}\nbob@other.test:{hashed}\n", encoding="utf-8"
    )
    (home / "aliases").write_text("info@example.test: alice@example.test\n", encoding="utf-8")
    loaded, problems = load_directory(
        home / "accounts",
        home / "aliases",
        ("example.test", "other.test"),
        {"example.org": "example.test"},
    )
    assert problems == []
    return loaded


def reply(decision) -> str:
    return f"{decision.code} {decision.text}"


def smtp_address(path: str, keyword: str = "TO") -> Address | None:
    """What the SMTP server hands the policy for ``RCPT TO:<path>``; None means 501."""
    parsed = parse_path(f"{keyword}:<{path}>", keyword)
    if parsed is None:
        return None
    text, _params = parsed
    return parse_mailbox(text)


# --- the clients --------------------------------------------------------------
#
# name -> (Client fields apart from the listener, may relay?, the domains a
# sender must be in with sender_must_match_login, or None for "unrestricted").
CLIENTS: dict[str, tuple[dict, bool, tuple[str, ...] | None]] = {
    # Not authorised: an outside IP with the default trusted networks ...
    "anon": (dict(ip=OUTSIDE, trusted_networks=LOOPBACK), False, None),
    "anon-v6": (dict(ip="2001:db8::25", trusted_networks=LOOPBACK), False, None),
    "anon-mapped-v4": (dict(ip="::ffff:192.0.2.10", trusted_networks=LOOPBACK), False, None),
    # ... and loopback itself when trusted_networks is empty (empty = none).
    "untrusted-empty-networks": (dict(ip="127.0.0.1", trusted_networks=()), False, None),
    "untrusted-empty-networks-v6": (dict(ip="::1", trusted_networks=()), False, None),
    # Authorised by AUTH, by POP-before-SMTP, or by a trusted network.
    "auth-alice": (
        dict(ip=OUTSIDE, account=ALICE, trusted_networks=LOOPBACK),
        True,
        ("example.test",),
    ),
    "auth-bob": (dict(ip=OUTSIDE, account=BOB, trusted_networks=LOOPBACK), True, ("other.test",)),
    "pop-example.test": (
        dict(ip=OUTSIDE, pop_domains=("example.test",), trusted_networks=LOOPBACK),
        True,
        ("example.test",),
    ),
    "pop-two-domains": (
        dict(ip=OUTSIDE, pop_domains=("example.test", "other.test"), trusted_networks=LOOPBACK),
        True,
        ("example.test", "other.test"),
    ),
    "trusted-127.0.0.1": (dict(ip="127.0.0.1", trusted_networks=LOOPBACK), True, None),
    "trusted-127.1.2.3": (dict(ip="127.1.2.3", trusted_networks=LOOPBACK), True, None),
    "trusted-::1": (dict(ip="::1", trusted_networks=LOOPBACK), True, None),
    "trusted-::ffff:127.0.0.1": (
        dict(ip="::ffff:127.0.0.1", trusted_networks=LOOPBACK),
        True,
        None,
    ),
}
UNAUTHORISED = [name for name, (_, may_relay, _) in CLIENTS.items() if not may_relay]


def client(name: str, listener: Listener) -> Client:
    return Client(listener=listener, **CLIENTS[name][0])


# --- recipients -----------------------------------------------------------------

LOCAL, UNKNOWN, REMOTE = "local", "unknown", "remote"

# (id, RCPT path as the client sends it, kind, address echoed in replies, accounts reached)
RECIPIENTS = [
    ("account", "alice@example.test", LOCAL, "alice@example.test", {ALICE}),
    ("account-other-domain", "bob@other.test", LOCAL, "bob@other.test", {BOB}),
    ("address-alias", "info@example.test", LOCAL, "info@example.test", {ALICE}),
    ("domain-alias", "alice@example.org", LOCAL, "alice@example.org", {ALICE}),
    ("address-alias-via-domain-alias", "info@example.org", LOCAL, "info@example.org", {ALICE}),
    ("unknown", "nobody@example.test", UNKNOWN, "nobody@example.test", None),
    ("unknown-domain-alias", "nobody@example.org", UNKNOWN, "nobody@example.org", None),
    ("unknown-wrong-domain", "alice@other.test", UNKNOWN, "alice@other.test", None),
    ("remote", "carol@far.test", REMOTE, "carol@far.test", None),
    ("remote-subdomain", "carol@sub.example.test", REMOTE, "carol@sub.example.test", None),
    ("remote-suffix", "alice@example.test.far.test", REMOTE, "alice@example.test.far.test", None),
    ("remote-literal", "carol@[192.0.2.1]", REMOTE, "carol@[192.0.2.1]", None),
]

# Open-relay address tricks, parsed exactly as the SMTP server parses them.
TRICKS = [
    # percent hack: only the domain after the last @ routes, so a local unknown user
    ("percent", "user%far.test@example.test", UNKNOWN, "user%far.test@example.test", None),
    ("percent-upper", "USER%FAR.TEST@EXAMPLE.TEST", UNKNOWN, "USER%FAR.TEST@example.test", None),
    (
        "percent-domain-alias",
        "user%far.test@example.org",
        UNKNOWN,
        "user%far.test@example.org",
        None,
    ),
    (
        "percent-real-user",
        "alice%far.test@example.test",
        UNKNOWN,
        "alice%far.test@example.test",
        None,
    ),
    # source route: dropped by parse_path, leaving the real (remote) mailbox
    ("source-route", "@example.test:user@far.test", REMOTE, "user@far.test", None),
    (
        "source-route-two-hops",
        "@example.test,@other.test:user@far.test",
        REMOTE,
        "user@far.test",
        None,
    ),
    ("source-route-to-local", "@far.test:alice@example.test", LOCAL, "alice@example.test", {ALICE}),
    # bang path: a local part like any other
    ("bang", "far.test!user@example.test", UNKNOWN, "far.test!user@example.test", None),
    ("bang-real-user", "far.test!alice@example.test", UNKNOWN, "far.test!alice@example.test", None),
    (
        "bang-and-percent",
        "far.test!u%x.far.test@example.org",
        UNKNOWN,
        "far.test!u%x.far.test@example.org",
        None,
    ),
    # quoted local part holding a whole remote address
    ("quoted", '"user@far.test"@example.test', UNKNOWN, '"user@far.test"@example.test', None),
    ("quoted-percent", '"user%far.test"@example.org', UNKNOWN, '"user%far.test"@example.org', None),
    # case games: domains fold, local parts compare case-insensitively
    ("case-upper", "ALICE@EXAMPLE.TEST", LOCAL, "ALICE@example.test", {ALICE}),
    ("case-domain-alias", "alice@Example.Org", LOCAL, "alice@example.org", {ALICE}),
    ("case-alias", "Info@EXAMPLE.ORG", LOCAL, "Info@example.org", {ALICE}),
    ("case-unknown", "NoBody@Example.Test", UNKNOWN, "NoBody@example.test", None),
    ("case-remote", "Carol@FAR.Test", REMOTE, "Carol@far.test", None),
]

# Paths the server refuses with 501 before asking the policy.
NOT_MAILBOXES = [
    ("two-ats", "user@far.test@example.test"),
    ("two-ats-reversed", "user@example.test@far.test"),
    ("source-route-then-two-ats", "@example.test:user@far.test@example.test"),
    ("trailing-dot-remote", "user@far.test."),
    ("trailing-dot-local", "alice@example.test."),
    ("trailing-dot-domain-alias", "alice@example.org."),
    ("percent-trailing-dot", "user%far.test@example.test."),
    ("unterminated-quote", '"user@far.test@example.test'),
    ("empty-domain", "user@"),
    ("no-local-part", "@far.test"),
    ("bare-route", "@example.test:"),
    ("double-dot", "user@far..test"),
    ("space", "user @far.test"),
]


def expected_rcpt(listener: Listener, may_relay: bool, kind: str, echo: str) -> tuple:
    """(verdict, reply) by DESIGN.md's rules."""
    if listener is SUB and not may_relay:
        return Verdict.REJECT, AUTH_REQUIRED
    if kind == UNKNOWN:
        return Verdict.REJECT, USER_UNKNOWN.format(echo)
    if kind == REMOTE:
        if may_relay:
            return Verdict.RELAY, RCPT_OK
        return Verdict.REJECT, RELAY_DENIED.format(echo)
    return Verdict.LOCAL, RCPT_OK


def rcpt_rows(table: list) -> list:
    return [
        pytest.param(listener, name, path, kind, echo, accounts, id=f"{listener.name}-{name}-{rid}")
        for listener in (MTA, SUB)
        for name in CLIENTS
        for rid, path, kind, echo, accounts in table
    ]


RCPT_ROWS = rcpt_rows(RECIPIENTS)
TRICK_ROWS = rcpt_rows(TRICKS)
RCPT_ARGS = "listener,name,path,kind,echo,accounts"


def check_rcpt(directory, listener, name, path, kind, echo, accounts) -> None:
    rcpt = smtp_address(path)
    assert rcpt is not None, path
    assert str(rcpt) == echo
    may_relay = CLIENTS[name][1]
    decision = decide(client(name, listener), directory, rcpt)
    verdict, text = expected_rcpt(listener, may_relay, kind, echo)
    assert (decision.verdict, reply(decision)) == (verdict, text)
    if verdict is Verdict.LOCAL:
        assert set(decision.accounts) == accounts
        assert len(decision.accounts) == len(accounts)
    else:
        assert decision.accounts == ()
    if not may_relay:
        assert decision.verdict is not Verdict.RELAY


@pytest.mark.parametrize(RCPT_ARGS, RCPT_ROWS)
def test_recipient_table(directory, listener, name, path, kind, echo, accounts):
    check_rcpt(directory, listener, name, path, kind, echo, accounts)


@pytest.mark.parametrize(RCPT_ARGS, TRICK_ROWS)
def test_open_relay_trick_table(directory, listener, name, path, kind, echo, accounts):
    check_rcpt(directory, listener, name, path, kind, echo, accounts)


@pytest.mark.parametrize("path", [pytest.param(p, id=i) for i, p in NOT_MAILBOXES])
def test_trick_is_not_a_mailbox(path):
    # None here means the server answers 501 and the policy is never asked.
    assert smtp_address(path) is None
    assert parse_mailbox(path) is None


def test_smtp_server_drops_the_source_route_before_parsing():
    assert parse_path("TO:<@example.test:user@far.test>", "TO") == ("user@far.test", {})
    assert parse_path("TO:<@a.test,@b.test:alice@example.test>", "TO") == (
        "alice@example.test",
        {},
    )
    assert parse_path("FROM:<>", "FROM") == ("", {})


def test_trusted_network_matching():
    assert is_trusted("127.0.0.1", LOOPBACK)
    assert is_trusted("::1", LOOPBACK)
    assert is_trusted("::ffff:127.0.0.1", LOOPBACK)
    assert not is_trusted("::ffff:192.0.2.10", LOOPBACK)
    assert not is_trusted("127.0.0.1", ())
    assert not is_trusted("not an ip", LOOPBACK)
    assert not is_trusted("", LOOPBACK)


def test_directory_fixture(directory):
    assert directory.account(parse_mailbox("alice@example.test")) == ALICE
    assert directory.account(parse_mailbox("bob@other.test")) == BOB
    assert directory.resolve(parse_mailbox("info@example.test")) == (ALICE,)


# --- property: an unauthorised client never gets RELAY ------------------------

_LOCALS = [
    "alice",
    "ALICE",
    "nobody",
    "info",
    "postmaster",
    "user%far.test",
    "user%far.test%example.test",
    "alice%example.test",
    "far.test!user",
    "far.test!alice",
    "example.test!far.test!user",
    '"user@far.test"',
    '"alice"',
    '"user%far.test"',
    '"@far.test:user"',
    '"far.test!user"',
    "a.b-c+d",
    "user@far.test",
    "",
]
_DOMAINS = [
    "example.test",
    "EXAMPLE.TEST",
    "Example.Test",
    "example.org",
    "EXAMPLE.ORG",
    "other.test",
    "far.test",
    "FAR.TEST",
    "sub.example.test",
    "example.test.far.test",
    "example.testfar.test",
    "example.test.",
    "far.test.",
    "localhost",
    "[127.0.0.1]",
    "[192.0.2.1]",
    "[IPv6:::1]",
    "example.test@far.test",
    "far.test@example.test",
    "far.test%example.test",
    "",
]
_ROUTES = ["", "@example.test:", "@far.test:", "@example.test,@far.test:", "@:", "@far.test,:"]
_ALPHABET = 'aeflrstux.@%!:,"\\[]-_+ AEX'
_PIECES = ["example.test", "example.org", "far.test", "alice", "@", "%", "!", ":", '"', "."]


def tricky_paths() -> list[str]:
    paths = [
        f"{route}{local}@{domain}"
        for route, local, domain in itertools.product(_ROUTES, _LOCALS, _DOMAINS)
    ]
    paths += [f"{local}{domain}" for local, domain in itertools.product(_LOCALS, _DOMAINS)]
    rng = random.Random(5321)
    for _ in range(3000):
        paths.append("".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 30))))
        paths.append("".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 8))))
    return paths


def test_unauthorised_client_never_relays(directory):
    paths = tricky_paths()
    assert len(paths) > 8000
    parsed = 0
    failures = []
    for path in paths:
        rcpt = smtp_address(path)
        if rcpt is None:
            continue  # the server answers 501
        parsed += 1
        local = directory.is_local_domain(rcpt.domain)
        for name in UNAUTHORISED:
            mta = decide(client(name, MTA), directory, rcpt)
            sub = decide(client(name, SUB), directory, rcpt)
            if mta.verdict is Verdict.RELAY or sub.verdict is Verdict.RELAY:
                failures.append((path, name, "relayed"))
            if reply(sub) != AUTH_REQUIRED:
                failures.append((path, name, f"submission: {reply(sub)}"))
            if not local and reply(mta) != RELAY_DENIED.format(rcpt):
                failures.append((path, name, f"remote: {reply(mta)}"))
            if local and mta.verdict not in (Verdict.LOCAL, Verdict.REJECT):
                failures.append((path, name, f"local: {reply(mta)}"))
            if local and mta.verdict is Verdict.REJECT and mta.code != 550:
                failures.append((path, name, f"local: {reply(mta)}"))
    assert parsed > 1000
    assert failures == [], failures[:20]


def test_local_domain_is_never_relayed_even_when_authorised(directory):
    """Mail for our own domains is delivered here, never sent back out (no loops)."""
    failures = []
    for path in tricky_paths():
        rcpt = smtp_address(path)
        if rcpt is None:
            continue
        local = directory.is_local_domain(rcpt.domain)
        for name, listener in itertools.product(CLIENTS, (MTA, SUB)):
            decision = decide(client(name, listener), directory, rcpt)
            if local and decision.verdict is Verdict.RELAY:
                failures.append((path, name, listener.name))
    assert failures == [], failures[:20]


# --- the sender check -----------------------------------------------------------

# (id, MAIL FROM path, the canonical domain the check compares, or None for remote)
SENDERS = [
    ("own-domain", "alice@example.test", "example.test"),
    ("own-domain-other-user", "nobody@example.test", "example.test"),
    ("own-domain-upper", "Alice@EXAMPLE.TEST", "example.test"),
    ("domain-alias-of-own", "alice@example.org", "example.test"),
    ("domain-alias-of-own-upper", "Someone@Example.ORG", "example.test"),
    ("other-local-domain", "bob@other.test", "other.test"),
    ("remote", "carol@far.test", None),
    ("remote-percent-to-local", "alice%example.test@far.test", None),
    ("local-percent-to-remote", "carol%far.test@example.test", "example.test"),
    ("source-route-to-remote", "@example.test:carol@far.test", None),
    ("null", "", "<>"),
]


def expected_sender(
    must_match: bool, name: str, canonical: str | None, echo: str, listener: Listener = SUB
) -> str:
    allowed_domains = CLIENTS[name][2]
    if canonical == "<>" or not must_match or allowed_domains is None:
        return SENDER_OK
    if name.startswith("pop-") and listener is MTA:
        return SENDER_OK  # checked at RCPT, for the recipients the POP login is needed for
    if canonical in allowed_domains:
        return SENDER_OK
    return SENDER_REJECTED.format(echo)


SENDER_ROWS = [
    pytest.param(
        must_match,
        listener,
        name,
        path,
        canonical,
        id=f"{'match' if must_match else 'nomatch'}-{listener.name}-{name}-{sid}",
    )
    for must_match in (True, False)
    for listener in (MTA, SUB)
    for name in CLIENTS
    for sid, path, canonical in SENDERS
]


@pytest.mark.parametrize("must_match,listener,name,path,canonical", SENDER_ROWS)
def test_sender_table(directory, must_match, listener, name, path, canonical):
    if path == "":
        sender = None  # MAIL FROM:<>
        assert parse_path("FROM:<>", "FROM") == ("", {})
    else:
        sender = smtp_address(path, "FROM")
        assert sender is not None, path
    decision = decide_sender(client(name, listener), directory, sender, must_match)
    text = expected_sender(must_match, name, canonical, str(sender), listener)
    assert reply(decision) == text
    assert decision.verdict is (Verdict.ACCEPT if text == SENDER_OK else Verdict.REJECT)
    assert decision.accounts == ()


def test_policy_is_pure(directory):
    rcpt = smtp_address("info@example.org")
    c = client("anon", MTA)
    assert decide(c, directory, rcpt) == decide(c, directory, rcpt)
    assert decide(c, directory, rcpt).accounts == (ALICE,)
    sender = smtp_address("carol@far.test", "FROM")
    c = client("auth-alice", SUB)
    assert decide_sender(c, directory, sender, True) == decide_sender(c, directory, sender, True)
    assert sorted(directory.hashes) == ["alice@example.test", "bob@other.test"]


# --- when the POP authorisation need not be looked up --------------------------------

POP_VARIANTS = (None, ("example.test",), ("other.test",), ("example.test", "other.test"))
SAMPLE_RCPTS = ["alice@example.test", "nobody@example.test", "x@far.test", "bob@example.org"]
SAMPLE_SENDERS = [None, "alice@example.test", "bob@other.test", "x@far.test"]


@pytest.mark.parametrize("name", sorted(CLIENTS))
@pytest.mark.parametrize("listener", [MTA, SUB])
def test_pop_lookup_is_skipped_only_where_it_cannot_matter(directory, name, listener):
    from mailboxd.policy import rcpt_needs_pop, sender_needs_pop

    fields = {k: v for k, v in CLIENTS[name][0].items() if k != "pop_domains"}
    for pop in POP_VARIANTS:
        client = Client(listener=listener, pop_domains=pop, **fields)
        bare = Client(listener=listener, **fields)  # as the server asks before a lookup
        for path in SAMPLE_RCPTS:
            rcpt = parse_mailbox(path)
            if not rcpt_needs_pop(bare, directory, rcpt):
                assert decide(client, directory, rcpt) == decide(bare, directory, rcpt)
        for sender_path in SAMPLE_SENDERS:
            sender = None if sender_path is None else parse_mailbox(sender_path)
            for must_match in (True, False):
                if not sender_needs_pop(bare, sender, must_match):
                    assert decide_sender(client, directory, sender, must_match) == (
                        decide_sender(bare, directory, sender, must_match)
                    )


@pytest.mark.parametrize(
    "fields,listener,rcpt,needed",
    [
        (dict(ip=OUTSIDE), MTA, "alice@example.test", False),  # local: anyone may send
        (dict(ip=OUTSIDE), MTA, "x@far.test", True),  # relaying: the POP login decides
        (dict(ip=OUTSIDE), SUB, "alice@example.test", True),  # submission: always
        (dict(ip=OUTSIDE, account=ALICE), SUB, "x@far.test", False),  # AUTH decides
        (dict(ip="127.0.0.1", trusted_networks=LOOPBACK), MTA, "x@far.test", False),
    ],
)
def test_rcpt_needs_pop_table(directory, fields, listener, rcpt, needed):
    from mailboxd.policy import rcpt_needs_pop

    client = Client(listener=listener, **fields)
    assert rcpt_needs_pop(client, directory, parse_mailbox(rcpt)) is needed


# --- the sender check at RCPT, for clients authorised only by a POP login ---------


@pytest.mark.parametrize("must_match", [True, False])
@pytest.mark.parametrize("name", [n for n in CLIENTS if n.startswith("pop-")])
@pytest.mark.parametrize("sid,path,canonical", SENDERS)
@pytest.mark.parametrize("rcpt_path", ["alice@example.test", "info@example.org", "x@far.test"])
def test_pop_login_checks_the_sender_only_where_it_relays(
    directory, must_match, name, sid, path, canonical, rcpt_path
):
    sender = None if path == "" else smtp_address(path, "FROM")
    c = client(name, MTA)
    rcpt = smtp_address(rcpt_path)
    decision = decide(c, directory, rcpt, sender, must_match)
    if directory.is_local_domain(rcpt.domain):  # what anybody may send: the login changes nothing
        assert decision == decide(client("anon", MTA), directory, rcpt, sender, must_match)
        assert reply(decision) == RCPT_OK
        return
    expected = expected_sender(must_match, name, canonical, str(sender), SUB)
    if expected == SENDER_OK:
        assert (decision.verdict, reply(decision)) == (Verdict.RELAY, RCPT_OK)
    else:
        assert (decision.verdict, reply(decision)) == (Verdict.REJECT, expected)


@pytest.mark.parametrize("name", ["auth-alice", "trusted-127.0.0.1"])
def test_auth_and_trusted_clients_are_not_checked_at_rcpt(directory, name):
    far = smtp_address("carol@far.test", "FROM")
    decision = decide(client(name, MTA), directory, smtp_address("x@far.test"), far, True)
    assert decision.verdict is Verdict.RELAY  # AUTH is checked at MAIL FROM; trusted never
