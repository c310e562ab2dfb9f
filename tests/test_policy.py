"""The recipient decision as a table, plus the old open-relay address tricks."""

from __future__ import annotations

import itertools

import pytest

from mailboxd.accounts import Account, Directory
from mailboxd.addresses import parse_mailbox
from mailboxd.policy import Listener, Verdict, decide_recipient

MTA, SUB = Listener.MTA, Listener.SUBMISSION

# The exact replies DESIGN.md fixes ("<rcpt>" filled in).
RELAY_DENIED = "554 5.7.1 <{rcpt}>: Relay access denied"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
USER_UNKNOWN = "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown"

HASH = b"$2b$04$" + b"x" * 53

DIRECTORY = Directory(
    domains=("example.test", "other.test"),
    domain_aliases={"example.org": "example.test"},
    hashes={"alice@example.test": HASH, "bob@other.test": HASH},
    aliases={
        "info@example.test": ("alice@example.test", "bob@other.test"),
        "postmaster@example.test": ("alice@example.test",),
    },
)

ALICE = Account(address="alice@example.test", domain="example.test", local="alice")
BOB = Account(address="bob@other.test", domain="other.test", local="bob")


def reply(decision) -> str:
    return f"{decision.code} {decision.text}"


def parse(text: str):
    address = parse_mailbox(text)
    assert address is not None, text
    return address


# kind -> recipients of that kind, and the accounts a local one reaches
RECIPIENTS = {
    "local user": [
        ("alice@example.test", {ALICE}),
        ("bob@other.test", {BOB}),
        ("Alice@EXAMPLE.TEST", {ALICE}),
    ],
    "alias": [
        ("info@example.test", {ALICE, BOB}),
        ("postmaster@example.test", {ALICE}),
        ("INFO@example.test", {ALICE, BOB}),
    ],
    "domain alias": [
        ("alice@example.org", {ALICE}),
        ("info@EXAMPLE.ORG", {ALICE, BOB}),
    ],
    "unknown local user": [
        ("nobody@example.test", None),
        ("nobody@example.org", None),
        ("alice@other.test", None),
        ("bob@example.test", None),
    ],
    "remote domain": [
        ("carol@far.test", None),
        ("carol@sub.example.test", None),  # a subdomain is not a local domain
        ("carol@example.test.far.test", None),
        ("alice@[192.0.2.1]", None),
    ],
}


def expected(listener: Listener, authorised: bool, kind: str, rcpt: str):
    """(verdict, reply) from DESIGN.md's rules."""
    if listener is SUB and not authorised:
        return Verdict.REJECT, AUTH_REQUIRED
    if kind == "unknown local user":
        return Verdict.REJECT, USER_UNKNOWN.format(rcpt=rcpt)
    if kind == "remote domain":
        if authorised:
            return Verdict.RELAY, "250 2.1.5 Ok"
        return Verdict.REJECT, RELAY_DENIED.format(rcpt=rcpt)
    return Verdict.LOCAL, "250 2.1.5 Ok"


CASES = [
    (listener, authorised, kind, text, accounts)
    for listener, authorised in itertools.product((MTA, SUB), (False, True))
    for kind, recipients in RECIPIENTS.items()
    for text, accounts in recipients
]


@pytest.mark.parametrize(
    "listener,authorised,kind,text,accounts",
    CASES,
    ids=[f"{c[0].name}-{'auth' if c[1] else 'anon'}-{c[3]}" for c in CASES],
)
def test_decide_recipient_table(listener, authorised, kind, text, accounts):
    rcpt = parse(text)
    decision = decide_recipient(listener, authorised, DIRECTORY, rcpt)
    verdict, text_reply = expected(listener, authorised, kind, str(rcpt))
    assert decision.verdict is verdict
    assert reply(decision) == text_reply
    if verdict is Verdict.LOCAL:
        assert set(decision.accounts) == accounts
        assert len(decision.accounts) == len(accounts)
    else:
        assert decision.accounts == ()


def test_reply_names_the_recipient_as_given():
    # The local part keeps its case; only the domain is folded.
    d = decide_recipient(MTA, False, DIRECTORY, parse("Carol.Smith@FAR.Test"))
    assert reply(d) == "554 5.7.1 <Carol.Smith@far.test>: Relay access denied"
    d = decide_recipient(MTA, False, DIRECTORY, parse("NoBody@Example.Test"))
    assert reply(d) == "550 5.1.1 <NoBody@example.test>: Recipient address rejected: User unknown"


# --- open-relay tricks --------------------------------------------------------

# Addresses whose only domain (after the last @) is local, but whose local part
# names another host. They must be decided as local users (all unknown here),
# and so be refused with 550 whatever the authorisation: never relayed.
TRICKS = [
    "user%far.test@example.test",
    '"user@far.test"@example.test',
    "far.test!user@example.test",
    "far.test!user%other.far.test@example.test",
    "USER%FAR.TEST@EXAMPLE.TEST",
    '"user%far.test"@example.org',
    "user%far.test@example.org",
]


@pytest.mark.parametrize(
    "listener,authorised", list(itertools.product((MTA, SUB), (False, True))), ids=str
)
@pytest.mark.parametrize("text", TRICKS)
def test_local_part_routing_tricks_are_unknown_local_users(text, listener, authorised):
    rcpt = parse_mailbox(text)
    assert rcpt is not None, text
    assert rcpt.domain in ("example.test", "example.org")
    decision = decide_recipient(listener, authorised, DIRECTORY, rcpt)
    assert decision.verdict is not Verdict.RELAY
    if listener is SUB and not authorised:
        assert reply(decision) == AUTH_REQUIRED
    else:
        assert reply(decision) == USER_UNKNOWN.format(rcpt=str(rcpt))


def test_percent_hack_is_parsed_as_a_local_part():
    rcpt = parse("user%far.test@example.test")
    assert (rcpt.local, rcpt.domain) == ("user%far.test", "example.test")
    decision = decide_recipient(MTA, False, DIRECTORY, rcpt)
    assert reply(decision) == (
        "550 5.1.1 <user%far.test@example.test>: Recipient address rejected: User unknown"
    )


def test_quoted_local_part_is_kept_whole():
    rcpt = parse('"user@far.test"@example.test')
    assert (rcpt.local, rcpt.domain) == ('"user@far.test"', "example.test")
    decision = decide_recipient(MTA, True, DIRECTORY, rcpt)
    assert reply(decision) == (
        '550 5.1.1 <"user@far.test"@example.test>: Recipient address rejected: User unknown'
    )


def test_bang_path_is_parsed_as_a_local_part():
    rcpt = parse("far.test!user@example.test")
    assert (rcpt.local, rcpt.domain) == ("far.test!user", "example.test")


@pytest.mark.parametrize(
    "text",
    [
        "user@far.test@example.test",
        "user@example.test@far.test",
        "@example.test:user@far.test",  # source route
        "@a.test,@b.test:user@far.test",
        "<user@far.test>",
        "user@far.test\n",
        "user@far.test\r\nRCPT TO:<x@far.test>",
        "user @far.test",
        "user",
        "@far.test",
        "user@",
        "user@far..test",
        "user@-far.test",
        '"unterminated@example.test',
    ],
)
def test_not_a_mailbox(text):
    assert parse_mailbox(text) is None


@pytest.mark.parametrize("listener", [MTA, SUB])
@pytest.mark.parametrize("authorised", [False, True])
@pytest.mark.parametrize("text", ["alice@example.test.", "carol@example.test.", "x@EXAMPLE.ORG."])
def test_trailing_dot_local_domain_is_never_relayed(text, listener, authorised):
    # "example.test." is the fully qualified local domain: refusing it as a syntax
    # error is fine, treating it as local is fine, relaying it (to ourselves) is not.
    rcpt = parse_mailbox(text)
    if rcpt is None:
        return
    decision = decide_recipient(listener, authorised, DIRECTORY, rcpt)
    assert decision.verdict is not Verdict.RELAY


@pytest.mark.parametrize(
    "text,accounts",
    [
        ("alice@EXAMPLE.TEST", {ALICE}),
        ("ALICE@Example.Org", {ALICE}),
        ("Info@Example.ORG", {ALICE, BOB}),
        ("BOB@OTHER.TEST", {BOB}),
    ],
)
def test_upper_case_domains_are_local(text, accounts):
    rcpt = parse(text)
    assert rcpt.domain == rcpt.domain.lower()
    for authorised in (False, True):
        decision = decide_recipient(MTA, authorised, DIRECTORY, rcpt)
        assert decision.verdict is Verdict.LOCAL
        assert set(decision.accounts) == accounts


def test_upper_case_remote_domain_is_refused_unauthorised():
    decision = decide_recipient(MTA, False, DIRECTORY, parse("user@FAR.TEST"))
    assert reply(decision) == "554 5.7.1 <user@far.test>: Relay access denied"


def test_decision_is_pure():
    rcpt = parse("info@example.test")
    first = decide_recipient(MTA, False, DIRECTORY, rcpt)
    second = decide_recipient(MTA, False, DIRECTORY, rcpt)
    assert first == second
    assert DIRECTORY.hashes == {"alice@example.test": HASH, "bob@other.test": HASH}
