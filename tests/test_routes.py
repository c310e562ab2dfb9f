"""Routes: the smarthost, or the MX hosts' addresses by preference, from
scripted DNS answers, and from a real DNS server on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from twisted.internet import defer
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.python.failure import Failure
from zone_server import AAAA, MX, A, ZoneServer

from mailboxd.routes import (
    LOOKUP_TIMEOUT,
    MAX_ADDRESSES,
    Hop,
    RouteError,
    destination,
    mx_hosts,
    order_mx,
    parse_smarthost,
)


def mx(domain: str, preference: int, host: str | bytes) -> dns.RRHeader:
    return dns.RRHeader(name=domain, type=dns.MX, payload=dns.Record_MX(preference, host))


class ItsOwnName:
    """An A record's payload whose address is the host's name (see FakeResolver)."""

    TYPE = dns.A

    def __init__(self, name: str) -> None:
        self.name = name

    def dottedQuad(self) -> str:
        return self.name


class FakeResolver:
    """`lookupMailExchange` from a script: domain -> list of (preference, host),
    a list of RRHeaders, or an exception to fail with. Unknown domains: NXDOMAIN.
    Address lookups from `addresses`: host -> its IPv4 and IPv6 addresses, or an
    exception. A host not in it has one "address", its own name: the stand-in
    network of test_outbound knows its hosts by name."""

    def __init__(self, answers: dict | None = None, addresses: dict | None = None) -> None:
        self.answers = dict(answers or {})
        self.addresses = dict(addresses or {})
        self.queries: list[str] = []  # MX lookups
        self.address_queries: list[tuple[str, int]] = []
        self.timeouts: list = []  # the timeout every lookup was given

    def lookupMailExchange(self, name, timeout=None):
        name = name.decode() if isinstance(name, bytes) else name
        self.queries.append(name)
        self.timeouts.append(timeout)
        answer = self.answers.get(name, dns_error.DNSNameError(name))
        if isinstance(answer, BaseException):
            return defer.fail(answer)
        records = [a if isinstance(a, dns.RRHeader) else mx(name, *a) for a in answer]
        return defer.succeed((records, [], []))

    def lookupAddress(self, name, timeout=None):
        return self._addresses(name, dns.A, timeout)

    def lookupIPV6Address(self, name, timeout=None):
        return self._addresses(name, dns.AAAA, timeout)

    def _addresses(self, name, rdtype: int, timeout) -> defer.Deferred:
        self.address_queries.append((name, rdtype))
        self.timeouts.append(timeout)
        if name not in self.addresses:
            own = [dns.RRHeader(name=name, type=dns.A, payload=ItsOwnName(name))]
            return defer.succeed((own if rdtype == dns.A else [], [], []))
        answer = self.addresses[name]
        if isinstance(answer, BaseException):
            return defer.fail(answer)
        records = [
            dns.RRHeader(name=name, type=dns.AAAA, payload=dns.Record_AAAA(a))
            if ":" in a
            else dns.RRHeader(name=name, type=dns.A, payload=dns.Record_A(a))
            for a in answer
        ]
        return defer.succeed(([r for r in records if r.type == rdtype], [], []))


def result_of(d: defer.Deferred):
    """The result of an already-fired Deferred (raising its failure)."""
    out: list = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def hosts(resolver: FakeResolver, domain: str) -> list[str]:
    return result_of(defer.ensureDeferred(mx_hosts(resolver, domain)))


def route_error(resolver: FakeResolver, domain: str) -> RouteError:
    with pytest.raises(RouteError) as info:
        hosts(resolver, domain)
    return info.value


# --- order_mx ----------------------------------------------------------------


def test_order_mx_sorts_by_preference_and_strips_the_root_dot():
    answers = [
        mx("far.test", 30, "mx3.far.test."),
        mx("far.test", 10, "mx1.far.test."),
        mx("far.test", 20, "mx2.far.test"),
    ]
    assert order_mx(answers, "far.test") == ["mx1.far.test", "mx2.far.test", "mx3.far.test"]


def test_order_mx_keeps_the_answer_order_for_equal_preferences():
    answers = [mx("far.test", 10, "b.far.test"), mx("far.test", 10, "a.far.test")]
    assert order_mx(answers, "far.test") == ["b.far.test", "a.far.test"]


def test_order_mx_lists_a_duplicate_host_once_at_its_best_preference():
    answers = [
        mx("far.test", 50, "backup.far.test"),
        mx("far.test", 20, "mx.far.test."),
        mx("far.test", 40, "mx.far.test"),
        mx("far.test", 10, "backup.far.test."),
    ]
    assert order_mx(answers, "far.test") == ["backup.far.test", "mx.far.test"]


def test_order_mx_host_names_are_case_insensitive():
    # DNS names compare without case: MX.Far.Test and mx.far.test are one host.
    answers = [mx("far.test", 10, "MX.Far.Test."), mx("far.test", 20, "mx.far.test")]
    assert order_mx(answers, "far.test") == ["mx.far.test"]


def test_order_mx_ignores_records_that_are_not_mx():
    answers = [
        dns.RRHeader(name="far.test", type=dns.CNAME, payload=dns.Record_CNAME("alias.test")),
        mx("far.test", 5, "mx.far.test"),
        dns.RRHeader(name="far.test", type=dns.A, payload=dns.Record_A("192.0.2.1")),
    ]
    assert order_mx(answers, "far.test") == ["mx.far.test"]


@pytest.mark.parametrize(
    "answers",
    [[], [dns.RRHeader(name="far.test", type=dns.A, payload=dns.Record_A("192.0.2.1"))]],
)
def test_no_mx_means_the_domain_itself(answers):
    assert order_mx(answers, "far.test") == ["far.test"]


@pytest.mark.parametrize("null", [b".", b""])
def test_null_mx_is_a_permanent_route_error(null):
    with pytest.raises(RouteError) as info:
        order_mx([mx("far.test", 0, null)], "far.test")
    assert info.value.permanent
    assert info.value.status == "5.1.10"
    assert "far.test" in info.value.text and "null MX" in info.value.text


def test_a_null_mx_among_other_records_still_refuses():
    with pytest.raises(RouteError) as info:
        order_mx([mx("far.test", 10, "mx.far.test"), mx("far.test", 0, b".")], "far.test")
    assert info.value.permanent and info.value.status == "5.1.10"


# --- mx_hosts ----------------------------------------------------------------


def test_mx_hosts_asks_for_the_domain_and_orders_the_answer():
    resolver = FakeResolver({"far.test": [(20, "mx2.far.test."), (10, "mx1.far.test.")]})
    assert hosts(resolver, "far.test") == ["mx1.far.test", "mx2.far.test"]
    assert resolver.queries == ["far.test"]


def test_mx_hosts_empty_answer_is_the_implicit_mx():
    assert hosts(FakeResolver({"far.test": []}), "far.test") == ["far.test"]


def test_mx_hosts_null_mx():
    error = route_error(FakeResolver({"far.test": [(0, b".")]}), "far.test")
    assert error.permanent and error.status == "5.1.10"


def test_nxdomain_is_permanent():
    error = route_error(FakeResolver({"far.test": dns_error.DNSNameError("far.test")}), "far.test")
    assert error.permanent
    assert error.status == "5.1.2"
    assert "NXDOMAIN" in error.text


def test_servfail_is_temporary():
    resolver = FakeResolver({"far.test": dns_error.DNSServerError("far.test")})
    error = route_error(resolver, "far.test")
    assert not error.permanent
    assert error.status == "4.4.3"
    assert "SERVFAIL" in error.text


@pytest.mark.parametrize(
    "exception",
    [
        dns_error.DNSQueryTimeoutError(17),
        defer.TimeoutError(),
        ConnectionRefusedError(),
        dns_error.ResolverError("no nameservers"),
    ],
    ids=["DNSQueryTimeoutError", "TimeoutError", "refused", "ResolverError"],
)
def test_lookup_failures_are_temporary(exception):
    error = route_error(FakeResolver({"far.test": exception}), "far.test")
    assert not error.permanent
    assert error.status == "4.4.3"
    assert error.text.startswith("far.test: DNS lookup failed: ")
    assert not error.text.endswith(": "), "the reason must not be empty"


def test_a_bare_timeout_names_its_kind():
    error = route_error(FakeResolver({"far.test": defer.TimeoutError()}), "far.test")
    assert "TimeoutError" in error.text


@pytest.mark.parametrize(
    "exception",
    [
        dns_error.DNSQueryRefusedError("far.test"),
        dns_error.DNSFormatError("far.test"),
        dns_error.DNSNotImplementedError("far.test"),
        dns_error.DNSUnknownError("far.test"),
    ],
    ids=["REFUSED", "FORMERR", "NOTIMP", "unknown-rcode"],
)
def test_resolver_errors_are_temporary_not_an_implicit_mx(exception):
    # RFC 5321 section 5.1: the domain itself is used only when there are no
    # MX records, not when the resolver could not answer.
    error = route_error(FakeResolver({"far.test": exception}), "far.test")
    assert not error.permanent
    assert error.status == "4.4.3"


def test_a_plain_domain_error_falls_back_to_the_domain():
    # twisted.names raises a plain DomainError for "no records of that name".
    assert hosts(FakeResolver({"far.test": dns_error.DomainError("far.test")}), "far.test") == [
        "far.test"
    ]


# --- the MX hosts' addresses ---------------------------------------------------


def test_the_hosts_addresses_come_by_preference_ipv4_first_each_once():
    resolver = FakeResolver(
        {"far.test": [(20, "mx2.far.test"), (10, "mx1.far.test"), (30, "mx3.far.test")]},
        {
            "mx1.far.test": ["2001:db8::1", "192.0.2.1"],
            "mx2.far.test": ["192.0.2.2", "192.0.2.1"],  # shared with mx1: tried once
            "mx3.far.test": ["192.0.2.3"],
        },
    )
    assert hosts(resolver, "far.test") == ["192.0.2.1", "2001:db8::1", "192.0.2.2", "192.0.2.3"]
    assert sorted(resolver.address_queries) == sorted(
        (h, t) for h in ("mx1.far.test", "mx2.far.test", "mx3.far.test") for t in (dns.A, dns.AAAA)
    )


def test_at_most_max_addresses_are_tried():
    many = {f"mx{i}.far.test": [f"192.0.2.{i}", f"2001:db8::{i}"] for i in range(1, 5)}
    resolver = FakeResolver({"far.test": [(i, f"mx{i}.far.test") for i in range(1, 5)]}, many)
    found = hosts(resolver, "far.test")
    assert len(found) == MAX_ADDRESSES and found[:2] == ["192.0.2.1", "2001:db8::1"]


def test_the_implicit_mx_is_the_domain_s_own_addresses():
    resolver = FakeResolver({"far.test": []}, {"far.test": ["192.0.2.9"]})
    assert hosts(resolver, "far.test") == ["192.0.2.9"]


def test_a_host_with_no_address_is_skipped():
    resolver = FakeResolver(
        {"far.test": [(10, "gone.far.test"), (20, "mx.far.test")]},
        {"gone.far.test": dns_error.DNSNameError("gone.far.test"), "mx.far.test": ["192.0.2.2"]},
    )
    assert hosts(resolver, "far.test") == ["192.0.2.2"]


def test_a_host_whose_lookup_fails_is_skipped_while_another_answers():
    resolver = FakeResolver(
        {"far.test": [(10, "mx1.far.test"), (20, "mx2.far.test")]},
        {"mx1.far.test": dns_error.DNSServerError("x"), "mx2.far.test": ["192.0.2.2"]},
    )
    assert hosts(resolver, "far.test") == ["192.0.2.2"]


@pytest.mark.parametrize(
    "answers, where",
    [
        ({"far.test": [(10, "gone.far.test")]}, "its mail hosts have no address"),
        ({"far.test": []}, "it has no MX and no address"),
    ],
)
def test_no_address_anywhere_is_permanent(answers, where):
    resolver = FakeResolver(answers, {"gone.far.test": [], "far.test": []})
    error = route_error(resolver, "far.test")
    assert error.permanent and error.status == "5.4.4"
    assert error.text == f"far.test: {where} (A or AAAA)"


@pytest.mark.parametrize(
    "exception",
    [dns_error.DNSServerError("x"), dns_error.DNSQueryTimeoutError(4), defer.TimeoutError()],
    ids=["SERVFAIL", "DNSQueryTimeoutError", "TimeoutError"],
)
def test_no_address_because_a_lookup_failed_is_temporary(exception):
    resolver = FakeResolver({"far.test": [(10, "mx.far.test")]}, {"mx.far.test": exception})
    error = route_error(resolver, "far.test")
    assert not error.permanent and error.status == "4.4.3"
    assert error.text.startswith("far.test: mx.far.test: DNS lookup failed: "), error.text


def test_every_lookup_has_the_bounded_timeout():
    resolver = FakeResolver({"far.test": [(10, "mx.far.test")]})
    hosts(resolver, "far.test")
    assert resolver.timeouts == [LOOKUP_TIMEOUT] * 3  # MX, A, AAAA
    assert sum(LOOKUP_TIMEOUT) <= 5  # not twisted's 1 + 3 + 11 + 45 seconds


# With a real reactor and the configured resolver, in a process of its own
# (the tests' process may run the reactor in a thread for mailboxd.testing).
MX_HOSTS = """
import json, sys
from twisted.internet import defer, task
from mailboxd.resolver import twisted_resolver
from mailboxd.routes import RouteError, mx_hosts

async def main(reactor, port, *domains):
    resolver = twisted_resolver(("127.0.0.1", int(port)))
    found = {}
    for domain in domains:
        try:
            found[domain] = await mx_hosts(resolver, domain)
        except RouteError as e:
            found[domain] = [e.status, e.text]
    print(json.dumps(found))

task.react(lambda reactor, *a: defer.ensureDeferred(main(reactor, *a)), sys.argv[1:])
"""


def mx_hosts_from(server: ZoneServer, *domains: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MX_HOSTS, str(server.port), *domains],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def zone(tmp_path_factory):
    """Names no resolver but this one knows (they are under .test)."""
    server = ZoneServer(tmp_path_factory.mktemp("routes"))
    server.add(
        "far.test",
        MX("far.test", 20, "mx2.far.test"),
        MX("far.test", 10, "mx1.far.test"),
        MX("far.test", 30, "nowhere.far.test"),
        A("mx1.far.test", "127.0.0.1"),
        AAAA("mx1.far.test", "::1"),
        A("mx2.far.test", "127.0.0.2"),
        A("plain.far.test", "127.0.0.3"),
        MX("empty.far.test", 10, "nowhere.far.test"),
        MX("broken.far.test", 10, "mx.broken.far.test"),
        MX("slow.far.test", 10, "mx.slow.far.test"),
    )
    server.failing("mx.broken.far.test").never("mx.slow.far.test", "silent.far.test").start()
    yield server
    server.stop()


def test_mx_hosts_resolve_through_the_configured_dns_server(zone):
    found = mx_hosts_from(zone, "far.test", "plain.far.test", "empty.far.test", "broken.far.test")
    assert found == {
        "far.test": ["127.0.0.1", "::1", "127.0.0.2"],
        "plain.far.test": ["127.0.0.3"],  # no MX: its own address
        "empty.far.test": ["5.4.4", "empty.far.test: its mail hosts have no address (A or AAAA)"],
        "broken.far.test": [
            "4.4.3",
            "broken.far.test: mx.broken.far.test: DNS lookup failed: DNSServerError",
        ],
    }


@pytest.mark.parametrize("domain", ["silent.far.test", "slow.far.test"])
def test_a_dns_server_that_never_answers_costs_seconds_not_a_minute(zone, domain):
    began = time.monotonic()
    [status, text] = mx_hosts_from(zone, domain)[domain]
    took = time.monotonic() - began
    assert status == "4.4.3" and "DNS lookup failed" in text, text
    assert took < sum(LOOKUP_TIMEOUT) + 4, took  # the lookup's tries, and starting Python


# --- destination and parse_smarthost -------------------------------------------------


def test_destination_is_the_smarthost_when_there_is_one():
    assert destination("x@far.test", "127.0.0.1:2525") == "127.0.0.1:2525"
    assert destination("x@FAR.test", "[::1]:25") == "[::1]:25"


def test_destination_is_the_lower_cased_domain_after_the_last_at():
    assert destination("X@Far.TEST", "") == "far.test"
    assert destination('"a@b"@Other.Test', "") == "other.test"
    assert destination("a@b.test", "") == destination("c@B.Test", "")


@pytest.mark.parametrize(
    "text, hop",
    [
        ("127.0.0.1:2525", Hop("127.0.0.1", 2525)),
        ("smtp.relay.test:587", Hop("smtp.relay.test", 587)),
        ("[::1]:25", Hop("::1", 25)),
        ("[2001:db8::25]:2525", Hop("2001:db8::25", 2525)),
        ("[192.0.2.1]:25", Hop("192.0.2.1", 25)),
    ],
)
def test_parse_smarthost(text, hop):
    assert parse_smarthost(text) == hop
