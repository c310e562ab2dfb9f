"""The two clocks: intervals on the monotonic clock, instants on the wall clock.

A step of the wall clock (an operator's `date -s`, NTP after a suspend, a
virtual machine resumed) must not stall a timeout or fire it early. So
everything that waits (session timeouts, retry back-off, reload polling, queue
ages) counts on the monotonic clock, through the reactor; only instants that
are stored for other processes or for after a restart (POP-before-SMTP
expiry, failed logins and blocks, a queued message's arrival) are wall-clock
times, passed in as a `Wall` so that tests can hand in a fake.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.base import DelayedCall, ReactorBase
from twisted.internet.interfaces import IDelayedCall

Wall = Callable[[], float]  # Unix time now

_T = TypeVar("_T")


def cancelling(result: _T, call: IDelayedCall) -> _T:
    """Cancel `call` unless it has run, and pass `result` on: a Deferred's
    callback that ends the timer set on it."""
    if call.active():
        call.cancel()
    return result


def use_monotonic_clock(reactor: Any) -> None:
    """Make `reactor` schedule by the monotonic clock.

    Twisted's reactors time every callLater (so every TimeoutMixin and
    LoopingCall) by `time.time`, and no reactor offers another clock: its
    `seconds` is replaced here, before the appliance schedules anything.
    Calls already scheduled are moved to the new clock's scale, keeping their
    remaining delay and their order. Not a Twisted reactor (a test's
    `task.Clock`): left as it is.
    """
    if not isinstance(reactor, ReactorBase) or reactor.seconds is time.monotonic:
        return
    shift = time.monotonic() - reactor.seconds()
    for call in reactor.getDelayedCalls():
        assert isinstance(call, DelayedCall)  # what a ReactorBase schedules
        call.time += shift
        call.seconds = time.monotonic
    reactor.seconds = time.monotonic
