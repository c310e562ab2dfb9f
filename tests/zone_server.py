"""A real DNS server on loopback for the tests: Twisted's own (`twistd dns`,
from twisted.names) serving zones the test writes, as a Python zone file.

    server = ZoneServer(tmp_path).add("far.test", TXT("far.test", "v=spf1 -all")).start()
    ... [mailbox] resolver = 127.0.0.1:{server.port} ...
    server.stop()
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.resolver
from conftest import free_port

TWISTD = Path(sys.executable).with_name("twistd")


def TXT(name: str, *strings: str) -> str:
    """A TXT record; each string at most 255 characters, as on the wire."""
    assert all(len(s) <= 255 for s in strings)
    return f"TXT({name!r}, {', '.join(repr(s.encode()) for s in strings)})"


def A(name: str, address: str) -> str:
    return f"A({name!r}, {address!r})"


def MX(name: str, preference: int, host: str) -> str:
    return f"MX({name!r}, {preference}, {host!r})"


class ZoneServer:
    """`twistd dns --pyzone` for each zone added, on a free loopback port."""

    def __init__(self, home: Path) -> None:
        self.home = home / "dns"
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.zones: dict[str, list[str]] = {}
        self.proc: subprocess.Popen | None = None

    def add(self, zone: str, *records: str) -> ZoneServer:
        self.zones.setdefault(zone, []).extend(records)
        return self

    def start(self) -> ZoneServer:
        args = [str(TWISTD), "-n", "--pidfile=", "dns", "-p", str(self.port), "-i", "127.0.0.1"]
        for zone, records in self.zones.items():
            path = self.home / f"{zone}.py"
            soa = (
                f"SOA({zone!r}, mname='ns.{zone}', rname='hostmaster.{zone}', serial=1,"
                " refresh=3600, retry=600, expire=86400, minimum=60)"
            )
            path.write_text("zone = [\n" + "".join(f"    {r},\n" for r in [soa, *records]) + "]\n")
            args += ["--pyzone", str(path)]
        self.log = (self.home / "twistd.log").open("ab")
        self.proc = subprocess.Popen(args, cwd=self.home, stdout=self.log, stderr=subprocess.STDOUT)
        resolver = self.resolver()
        deadline = time.monotonic() + 20
        first = next(iter(self.zones))
        while True:
            try:
                resolver.resolve(first, "SOA")
                return self
            except dns.exception.DNSException:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "twistd dns did not answer:\n"
                        + (self.home / "twistd.log").read_text(errors="replace")
                    ) from None
                time.sleep(0.1)

    def resolver(self) -> dns.resolver.Resolver:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers, r.port, r.lifetime = ["127.0.0.1"], self.port, 2.0
        return r

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
        if hasattr(self, "log"):
            self.log.close()


@contextlib.contextmanager
def silent_dns() -> Iterator[str]:
    """host:port of a DNS server that never answers (a UDP socket nobody reads)."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{silent.getsockname()[1]}"
    finally:
        silent.close()
