"""Message filters as the runner sees them (mailboxd.filtering), on a Clock;
ClamAV's answers (mailboxd.clamav)."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from mailboxd.clamav import ClamdError, verdict_of
from mailboxd.filtering import (
    FAILED,
    Filters,
    FilterVerdict,
    IMessageFilter,
    Incoming,
    accept,
    reject,
    tempfail,
)
from mailboxd.rspamd import RspamdError
from mailboxd.rspamd import verdict_of as rspamd_verdict

MESSAGE = Incoming("192.0.2.1", "client.test", None, None, "a@far.test", ("b@x.test",), b"hi\r\n")


@implementer(IMessageFilter)
class Fixed:
    def __init__(self, name, answer):
        self.name, self.answer, self.asked = name, answer, 0

    def check(self, incoming):
        self.asked += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def run(*filters, clock=None):
    return Filters(list(filters), clock or Clock(), 5).run(MESSAGE)


def test_every_filter_accepts_and_the_headers_add_up():
    one, two = Fixed("one", accept(("X-One", "1"))), Fixed("two", accept(("X-Two", "2")))
    assert run(one, two).result == accept(("X-One", "1"), ("X-Two", "2"))


def test_the_first_that_does_not_accept_decides():
    third = Fixed("third", accept())
    found = run(Fixed("a", accept()), Fixed("b", reject(554, "5.7.1 no")), third).result
    assert found == reject(554, "5.7.1 no") and third.asked == 0
    assert run(Fixed("t", tempfail())).result == tempfail()


@pytest.mark.parametrize(
    "answer",
    [
        "yes",
        None,
        FilterVerdict("maybe"),
        reject(250, "2.0.0 fine"),
        reject(451, "4.7.0 a reject that is temporary"),
        FilterVerdict("tempfail", (550, "5.0.0 a tempfail that is permanent")),
        accept(("Bad Name", "x")),
        accept(("X-Ok", "two\r\nlines")),
        ValueError("broken"),
    ],
)
def test_nonsense_or_a_failure_is_a_451(answer):
    assert run(Fixed("odd", answer)).result == FilterVerdict("tempfail", FAILED)


def test_a_filter_that_hangs_is_a_451_at_the_timeout():
    clock = Clock()

    @implementer(IMessageFilter)
    class Hangs:
        name = "hangs"

        def check(self, incoming):
            return Deferred()

    d = run(Hangs(), clock=clock)
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.2)
    assert d.result == FilterVerdict("tempfail", FAILED)


def test_a_blocking_filter_is_asked_in_the_filters_threads_and_others_are_not():
    handed: list[str] = []

    def threads(f, *args):
        handed.append(f.__self__.name)
        return succeed(f(*args))

    blocking = Fixed("blocking", accept(("X-B", "1")))
    blocking.blocking = True
    found = Filters([Fixed("plain", accept()), blocking], Clock(), 5, threads).run(MESSAGE)
    assert found.result == accept(("X-B", "1"))
    assert handed == ["blocking"] and blocking.asked == 1


def test_a_blocking_filter_that_hangs_is_a_451_at_the_timeout():
    clock = Clock()
    blocking = Fixed("blocking", accept())
    blocking.blocking = True
    d = Filters([blocking], clock, 5, lambda f, *args: Deferred()).run(MESSAGE)
    clock.advance(5.1)
    assert d.result == FilterVerdict("tempfail", FAILED)


@pytest.mark.parametrize(
    "answer, verdict",
    [
        ("stream: OK", accept()),
        (
            "stream: Eicar-Test-Signature FOUND",
            reject(554, "5.7.1 Virus found: Eicar-Test-Signature"),
        ),
        ("stream: Bad\r\nName FOUND", reject(554, "5.7.1 Virus found: Bad??Name")),
    ],
)
def test_clamd_answers(answer, verdict):
    assert verdict_of(answer) == verdict


@pytest.mark.parametrize("answer", ["", "INSTREAM size limit exceeded. ERROR", "stream: ERROR"])
def test_clamd_errors_are_errors(answer):
    with pytest.raises(ClamdError):
        verdict_of(answer)


@pytest.mark.parametrize(
    "answer, verdict",
    [
        (
            {"action": "reject", "score": 16.0, "required_score": 15.0},
            reject(554, "5.7.1 Message refused as spam"),
        ),
        ({"action": "soft reject", "score": 8.0}, tempfail("4.7.1 Try again later")),
        ({"action": "greylist", "score": 4.0}, tempfail("4.7.1 Try again later")),
        (
            {"action": "add header", "score": 9.0, "required_score": 15.0},
            accept(
                ("X-Spam", "Yes"), ("X-Spam-Score", "9.00 / 15.00"), ("X-Spam-Action", "add header")
            ),
        ),
        (
            {"action": "no action", "score": -1.5, "required_score": 15.0},
            accept(
                ("X-Spam", "No"), ("X-Spam-Score", "-1.50 / 15.00"), ("X-Spam-Action", "no action")
            ),
        ),
    ],
)
def test_rspamd_actions(answer, verdict):
    assert rspamd_verdict(answer) == verdict


@pytest.mark.parametrize("answer", [{}, {"action": "reject"}, {"score": 3}])
def test_an_rspamd_answer_without_action_and_score_is_an_error(answer):
    with pytest.raises(RspamdError):
        rspamd_verdict(answer)
