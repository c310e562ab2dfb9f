"""DNS blocklist lookups (mailboxd.dnsbl) against a stand-in resolver and a Clock."""

from __future__ import annotations

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.names import error as dns_error

from mailboxd.dnsbl import Blocklists, Listing, query_name


@pytest.mark.parametrize(
    "ip, name",
    [
        ("192.0.2.99", "99.2.0.192.bl.test"),
        ("::ffff:192.0.2.99", "99.2.0.192.bl.test"),
        (
            "2001:db8:1:2::ab",
            "b.a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.test",
        ),
        ("nonsense", None),
    ],
)
def test_the_name_asked(ip, name):
    assert query_name(ip, "bl.test") == name


class Resolver:
    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def lookupAddress(self, name, timeout=None):
        self.asked.append(name)
        answer = self.answers.get(name)
        if isinstance(answer, Exception):
            return fail(answer)
        if answer is None:
            return fail(dns_error.DNSNameError())
        records = [dns.RRHeader(name, dns.A, ttl=ttl, payload=dns.Record_A(a)) for a, ttl in answer]
        return succeed((records, [], []))


def test_listed_answers_are_kept_for_their_ttl_and_others_list_nobody():
    clock = Clock()
    resolver = Resolver(
        {
            "2.2.0.192.one.test": [("127.0.0.2", 600)],
            "2.2.0.192.two.test": [("127.0.0.4", 60)],
            "3.2.0.192.one.test": [("127.255.255.254", 60)],  # "you may not ask"
            "4.2.0.192.one.test": TimeoutError("no answer"),
        }
    )
    lists = Blocklists(("one.test", "two.test"), resolver, clock)
    assert lists.listed("192.0.2.2").result == "one.test"  # the first zone in order
    assert lists.listed("192.0.2.3").result is None
    assert lists.listed("192.0.2.4").result is None  # a timeout lets the client in
    assert lists.listed("192.0.2.5").result is None  # NXDOMAIN
    asked = len(resolver.asked)
    assert lists.listed("192.0.2.2").result == "one.test"
    assert len(resolver.asked) == asked  # remembered
    clock.advance(601)
    lists.listed("192.0.2.2")
    assert len(resolver.asked) == asked + 2  # the TTL has passed


def test_every_rcpt_waits_for_the_one_answer():
    from twisted.internet.defer import Deferred

    asked: Deferred = Deferred()
    listing = Listing(asked)
    first, second = listing.zone(), listing.zone()
    assert not first.called
    asked.callback("bl.test")
    assert first.result == second.result == listing.zone().result == "bl.test"
