"""Deterministic fault injection for tests (mailboxd.testing): rules that
answer, delay or drop a protocol command instead of the server."""

from __future__ import annotations

import fnmatch
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.task import deferLater

from .lines import POP3Reply, SMTPReply

_PATH = re.compile(r"^(?:FROM|TO):\s*<?([^<>\s]*)>?", re.IGNORECASE)


def _subjects(argument: str) -> list[str]:
    """What `match` is tried on: the argument, and for MAIL and RCPT the address."""
    found = _PATH.match(argument)
    return [argument, found.group(1)] if found else [argument]


@attrs.define
class Rule:
    point: str  # "smtp.RCPT", "pop3.RETR", ...; or a stage of the world's ("RCPT", ...)
    match: str | None = None  # a glob on the argument, or MAIL/RCPT's address: "bad@*"
    reply: SMTPReply | POP3Reply | None = None
    drop: bool = False
    delay: float = 0.0
    times: int | None = None  # None: for ever
    hits: int = 0


@attrs.define
class Rules:
    """Active rules, each for a point; `add` and `clear` may be called from any
    thread. Faults (the server's own commands) and mailboxd.testing's World
    (the remote side of relayed mail) are Rules for their own points."""

    rules: list[Rule] = attrs.field(factory=list)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def add(
        self,
        point: str,
        *,
        match: str | None,
        reply: SMTPReply | POP3Reply | None,
        drop: bool,
        delay: float,
        times: int | None,
        smtp: bool = True,
    ) -> Rule:
        """A rule for `point`, whose name its caller has checked; `smtp`: its
        reply is SMTP's (code, text), else a POP3 line."""
        if reply is None and not drop and not delay:
            raise ValueError("a fault needs reply=, drop=True or delay=")
        if times is not None and times < 1:
            raise ValueError(f"{point}: times= must be at least 1, or None for ever")
        if reply is not None and smtp:
            if not (
                isinstance(reply, tuple)
                and len(reply) == 2
                and isinstance(reply[0], int)
                and isinstance(reply[1], str)
            ):
                raise TypeError(f"{point}: reply= must be (code, text), e.g. (550, '5.1.1 no')")
        elif reply is not None and not isinstance(reply, str):
            raise TypeError(f"{point}: reply= must be a line, e.g. '-ERR broken'")
        rule = Rule(point, match, reply, drop, delay, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def first(self, point: str, subjects: Iterable[str]) -> Rule | None:
        """The first live rule for `point` whose pattern matches one of
        `subjects` (without case); counts the hit."""
        subjects = [subject.lower() for subject in subjects]
        with self._lock:
            for rule in self.rules:
                if rule.point != point:
                    continue
                if rule.match is not None and not any(
                    fnmatch.fnmatchcase(subject, rule.match.lower()) for subject in subjects
                ):
                    continue
                rule.hits += 1
                if rule.times is not None and rule.hits >= rule.times:
                    self.rules.remove(rule)
                return rule
        return None


@attrs.define
class Faults(Rules):
    """The rules on the server's own commands (`smtp.RCPT`, `pop3.RETR`, ...)."""

    def on(
        self,
        point: str,
        *,
        match: str | None = None,
        reply: SMTPReply | POP3Reply | None = None,
        drop: bool = False,
        delay: float = 0.0,
        times: int | None = None,
    ) -> Rule:
        protocol, _, command = point.partition(".")
        if protocol not in ("smtp", "pop3") or not command.isalpha():
            raise ValueError(f"fault point {point!r}: expected smtp.COMMAND or pop3.COMMAND")
        return self.add(
            f"{protocol}.{command.upper()}",
            match=match,
            reply=reply,
            drop=drop,
            delay=delay,
            times=times,
            smtp=protocol == "smtp",
        )

    def take(self, point: str, argument: str) -> Rule | None:
        """The first live rule for `point` whose pattern matches; counts the hit."""
        return self.first(point, _subjects(argument))


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
