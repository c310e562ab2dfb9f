"""Routes: the smarthost, or MX hosts by preference, from scripted DNS answers."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.python.failure import Failure

from mailboxd.routes import Hop, RouteError, destination, mx_hosts, order_mx, parse_smarthost


def mx(domain: str, preference: int, host: str | bytes) -> dns.RRHeader:
    return dns.RRHeader(name=domain, type=dns.MX, payload=dns.Record_MX(preference, host))


class FakeResolver:
    """`lookupMailExchange` from a script: domain -> list of (preference, host),
    a list of RRHeaders, or an exception to fail with. Unknown domains: NXDOMAIN."""

    def __init__(self, answers: dict | None = None) -> None:
        self.answers = dict(answers or {})
        self.queries: list[str] = []

    def lookupMailExchange(self, name, timeout=None):
        name = name.decode() if isinstance(name, bytes) else name
        self.queries.append(name)
        answer = self.answers.get(name, dns_error.DNSNameError(name))
        if isinstance(answer, BaseException):
            return defer.fail(answer)
        records = [a if isinstance(a, dns.RRHeader) else mx(name, *a) for a in answer]
        return defer.succeed((records, [], []))


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
