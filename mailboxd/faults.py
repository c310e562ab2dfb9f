"""Deterministic fault injection for tests (mailboxd.testing): rules that
answer, delay or drop a protocol command instead of the server."""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.task import deferLater

Reply = Any  # an SMTP (code, text) tuple, or a POP3 line


@attrs.define
class Rule:
    point: str  # "smtp.RCPT", "pop3.RETR", ...
    match: str | None = None  # a glob on the command's argument, e.g. "*bad@*"
    reply: Reply = None
    drop: bool = False
    delay: float = 0.0
    times: int | None = None  # None: for ever
    hits: int = 0


@attrs.define
class Faults:
    """The active rules; `on` may be called from any thread."""

    rules: list[Rule] = attrs.field(factory=list)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def on(
        self,
        point: str,
        *,
        match: str | None = None,
        reply: Reply = None,
        drop: bool = False,
        delay: float = 0.0,
        times: int | None = None,
    ) -> Rule:
        protocol, _, command = point.partition(".")
        if protocol not in ("smtp", "pop3") or not command.isalpha():
            raise ValueError(f"fault point {point!r}: expected smtp.COMMAND or pop3.COMMAND")
        if reply is None and not drop and not delay:
            raise ValueError("a fault needs reply=, drop=True or delay=")
        rule = Rule(f"{protocol}.{command.upper()}", match, reply, drop, delay, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def take(self, point: str, argument: str) -> Rule | None:
        """The first live rule for `point` whose pattern matches; counts the hit."""
        with self._lock:
            for rule in self.rules:
                if rule.point != point:
                    continue
                if rule.match is not None and not fnmatch.fnmatch(
                    argument.lower(), rule.match.lower()
                ):
                    continue
                rule.hits += 1
                if rule.times is not None and rule.hits >= rule.times:
                    self.rules.remove(rule)
                return rule
        return None


def apply(rule: Rule, transport: Any, clock: Any, proceed: Callable[[], Any]) -> Any:
    """What the protocol answers under `rule`: its reply, a delay, or nothing (dropped)."""
    if rule.drop:
        transport.abortConnection()
        return None

    def after() -> Any:
        return rule.reply if rule.reply is not None else proceed()

    if rule.delay:
        return deferLater(clock, rule.delay, after)
    return after()
