"""What an operator graphs and alerts on (`[metrics] listen`): counters of
connections, messages, recipients, logins, POP3 sessions and deliveries, the
time from the end of DATA to `250`, and the state read at each scrape
(blocked IPs, POP-authorised IPs, queued messages), served as `GET /metrics`
in Prometheus' text format by `prometheus_client`.

Each process counts in its own registry. A child process (see processes.py)
sends its totals to the primary every second; totals rather than increments,
so that a record dropped or late costs nothing, and the primary serves the
sum of its own counts, its children's last totals, and the last totals of
children that have ended (counters never go down while the primary runs).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from .state import StateError

log = Logger()

LISTENERS = ("listen", "listen-tls", "submission", "submission-tls")
RECIPIENT_VERDICTS = ("local", "relay", "rejected")
DELIVERY_RESULTS = ("delivered", "deferred", "bounced")
# A message is acknowledged once its copies are fsynced: milliseconds on a
# healthy disk, seconds on a struggling one.
DATA_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SEND_EVERY = 1.0  # seconds between a child's totals

Key = tuple[str, tuple[tuple[str, str], ...]]  # a sample's name and labels
Totals = dict[Key, float]


class Metrics:
    """One process's counters. Every labelled series exists from the start,
    at 0, so that a rate or an alert works before the first event."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        connections = Counter(
            "mailbox_smtp_connections",
            "SMTP connections accepted, by listener.",
            ["listener"],
            registry=r,
        )
        messages = Counter(
            "mailbox_smtp_messages",
            "Messages whose data ended: accepted (250) or rejected (any other reply).",
            ["result"],
            registry=r,
        )
        recipients = Counter(
            "mailbox_smtp_recipients",
            "RCPT commands answered: accepted for local delivery or relay, or rejected.",
            ["verdict"],
            registry=r,
        )
        auth = Counter(
            "mailbox_auth",
            "Logins with a verdict, by protocol and result.",
            ["protocol", "result"],
            registry=r,
        )
        deliveries = Counter(
            "mailbox_outbound_deliveries",
            "Outbound delivery attempts, per recipient, by result.",
            ["result"],
            registry=r,
        )
        self.pop3_sessions = Counter(
            "mailbox_pop3_sessions", "Authenticated POP3 sessions.", registry=r
        )
        self.data_seconds = Histogram(
            "mailbox_smtp_data_seconds",
            "Seconds from the end of a message's data to its 250 reply.",
            buckets=DATA_BUCKETS,
            registry=r,
        )
        self.connections = {name: connections.labels(name) for name in LISTENERS}
        self.messages = {name: messages.labels(name) for name in ("accepted", "rejected")}
        self.recipients = {name: recipients.labels(name) for name in RECIPIENT_VERDICTS}
        self.deliveries = {name: deliveries.labels(name) for name in DELIVERY_RESULTS}
        self.auth = {
            (protocol, result): auth.labels(protocol, result)
            for protocol in ("smtp", "pop3")
            for result in ("success", "failure")
        }

    def totals(self) -> Totals:
        return dict(_samples(self.registry.collect()))


def _key(name: str, labels: dict[str, str]) -> Key:
    return name, tuple(sorted(labels.items()))


def _samples(families: Iterable[Metric]) -> Iterator[tuple[Key, float]]:
    for family in families:
        for s in family.samples:
            # When a series began: a per-process instant, not a count to add.
            if not s.name.endswith("_created"):
                yield _key(s.name, s.labels), s.value


def to_record(totals: Totals) -> bytes:
    """A child's totals, for the channel to the primary (one line of JSON)."""
    return json.dumps(
        [[name, dict(labels), value] for (name, labels), value in totals.items()]
    ).encode()


def from_record(record: bytes) -> Totals | None:
    """The totals a child sent, or None for a record that cannot be read."""
    try:
        found = {
            _key(str(name), {str(k): str(v) for k, v in labels.items()}): float(value)
            for name, labels, value in json.loads(record)
        }
    except (ValueError, TypeError, AttributeError):
        return None
    return found


def add(into: dict[Key, float], totals: Totals) -> None:
    for key, value in totals.items():
        into[key] += value


class Combined:
    """A collector: this process's families, each sample plus what the
    other processes counted for it."""

    def __init__(self, own: Metrics, others: Callable[[], Iterable[Totals]]) -> None:
        self.own = own
        self.others = others

    def collect(self) -> Iterator[Metric]:
        extra: dict[Key, float] = collections.defaultdict(float)
        for totals in self.others():
            add(extra, totals)
        for family in self.own.registry.collect():
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                if not s.name.endswith("_created"):
                    value = s.value + extra.get(_key(s.name, s.labels), 0.0)
                    merged.add_sample(s.name, s.labels, value)
            yield merged


class Exposition:
    """What `/metrics` shows: the counters of every process, and the gauges
    read when it is asked. `read_state` runs off the reactor thread (`db`)
    and gives (blocked IPs, POP-authorised IPs)."""

    def __init__(
        self,
        own: Metrics,
        others: Callable[[], Iterable[Totals]],
        db: Callable[..., Deferred],
        read_state: Callable[[], tuple[int, int]],
        queued: Callable[[], int],
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(Combined(own, others))
        self.blocked = Gauge(
            "mailbox_blocked_ips", "Client addresses blocked now.", registry=self.registry
        )
        self.pop_authorised = Gauge(
            "mailbox_pop_authorised_ips",
            "Client addresses allowed to relay by a recent POP3 login.",
            registry=self.registry,
        )
        self.queue = Gauge(
            "mailbox_queue_messages", "Messages in the outbound queue.", registry=self.registry
        )
        self.db = db
        self.read_state = read_state
        self.queued = queued

    def latest(self, accept: str) -> Deferred:
        """Fires with (content type, body) in the format `accept` (an HTTP
        Accept header) asks for: Prometheus' text format or OpenMetrics."""
        return self.db(self.read_state).addCallback(self._render, accept)

    def _render(self, state: tuple[int, int], accept: str) -> tuple[str, bytes]:
        self.blocked.set(state[0])
        self.pop_authorised.set(state[1])
        self.queue.set(self.queued())
        encode, content_type = choose_encoder(accept)
        return content_type, encode(self.registry)


class MetricsPage(Resource):
    isLeaf = True

    def __init__(self, exposition: Exposition) -> None:
        super().__init__()
        self.exposition = exposition

    def render_GET(self, request: Request) -> Any:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def send(found: tuple[str, bytes]) -> None:
            if gone:
                return
            content_type, body = found
            request.setHeader(b"content-type", content_type.encode())
            request.write(body)
            request.finish()

        def failed(f: Any) -> None:
            if f.check(StateError):
                log.error("metrics: state store: {error}", error=str(f.value))
            else:
                log.failure("metrics: cannot render", f)
            if gone:
                return
            # A failed scrape is what an alert on `up` notices.
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(b"metrics unavailable, see the server's log\n")
            request.finish()

        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        self.exposition.latest(accept).addCallback(send).addErrback(failed)
        return NOT_DONE_YET


class MetricsSite(Site):
    """`/metrics` and nothing else, with no access log: a scrape every few
    seconds would bury what the log is for."""

    noisy = False

    def __init__(self, exposition: Exposition) -> None:
        root = Resource()
        root.putChild(b"metrics", MetricsPage(exposition))
        super().__init__(root)

    def log(self, request: Any) -> None:
        pass
