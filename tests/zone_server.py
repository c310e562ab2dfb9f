"""A real DNS server on loopback for the tests: Twisted's own (the
`twisted.names` server, authorities and protocols that `twistd dns` is made
of), serving zones the test writes, as Python zone files; and, where a test
asks, names it answers with SERVFAIL or never answers at all.

    server = ZoneServer(tmp_path).add("far.test", TXT("far.test", "v=spf1 -all")).start()
    ... [mailbox] resolver = 127.0.0.1:{server.port} ...
    server.stop()

Run as a program, it is that server: `zone_server.py PORT [--zone FILE]...
[--servfail NAME]... [--silent NAME]...`.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.resolver

HERE = Path(__file__).resolve()


def TXT(name: str, *strings: str) -> str:
    """A TXT record; each string at most 255 characters, as on the wire."""
    assert all(len(s) <= 255 for s in strings)
    return f"TXT({name!r}, {', '.join(repr(s.encode()) for s in strings)})"


def A(name: str, address: str) -> str:
    return f"A({name!r}, {address!r})"


def AAAA(name: str, address: str) -> str:
    return f"AAAA({name!r}, {address!r})"


def MX(name: str, preference: int, host: str) -> str:
    return f"MX({name!r}, {preference}, {host!r})"


class ZoneServer:
    """A DNS server for each zone added, on a free loopback port (UDP and TCP)."""

    def __init__(self, home: Path) -> None:
        from conftest import free_port

        self.home = home / "dns"
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.zones: dict[str, list[str]] = {}
        self.servfail: list[str] = []  # names answered with SERVFAIL
        self.silent: list[str] = []  # names never answered (a lookup times out)
        self.proc: subprocess.Popen | None = None

    def add(self, zone: str, *records: str) -> ZoneServer:
        self.zones.setdefault(zone, []).extend(records)
        return self

    def failing(self, *names: str) -> ZoneServer:
        """Answer these names (any type) with SERVFAIL, as a broken server does."""
        self.servfail.extend(names)
        return self

    def never(self, *names: str) -> ZoneServer:
        """Never answer these names: each lookup of them times out."""
        self.silent.extend(names)
        return self

    def start(self) -> ZoneServer:
        args = [sys.executable, str(HERE), str(self.port)]
        for zone, records in self.zones.items():
            path = self.home / f"{zone}.py"
            soa = (
                f"SOA({zone!r}, mname='ns.{zone}', rname='hostmaster.{zone}', serial=1,"
                " refresh=3600, retry=600, expire=86400, minimum=60)"
            )
            path.write_text("zone = [\n" + "".join(f"    {r},\n" for r in [soa, *records]) + "]\n")
            args += ["--zone", str(path)]
        args += [a for name in self.servfail for a in ("--servfail", name)]
        args += [a for name in self.silent for a in ("--silent", name)]
        self.log = (self.home / "server.log").open("ab")
        self.proc = subprocess.Popen(args, cwd=self.home, stdout=self.log, stderr=subprocess.STDOUT)
        resolver = self.resolver()
        resolver.lifetime = 0.25  # asked again and again until the server is up
        deadline = time.monotonic() + 20
        first = next(iter(self.zones))
        while True:
            try:
                resolver.resolve(first, "SOA")
                return self
            except dns.exception.DNSException:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "the DNS server did not answer:\n"
                        + (self.home / "server.log").read_text(errors="replace")
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


def serve(argv: list[str]) -> None:
    """The server: as `twistd dns --pyzone` builds it, with one resolver in
    front of the zones for the names a test wants to fail."""
    from twisted.internet import defer, reactor
    from twisted.names import authority, common, server
    from twisted.names import dns as names_dns
    from twisted.names import error as names_error

    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--zone", action="append", default=[])
    parser.add_argument("--servfail", action="append", default=[])
    parser.add_argument("--silent", action="append", default=[])
    options = parser.parse_args(argv)
    servfail = {n.lower().encode() for n in options.servfail}
    silent = {n.lower().encode() for n in options.silent}

    class Failing(common.ResolverBase):
        def _lookup(self, name, cls, type, timeout):  # noqa: A002 - IResolver's names
            if name.lower() in silent:
                return defer.Deferred()  # never fires: no answer is sent
            if name.lower() in servfail:
                # Not a DomainError (that would be NXDOMAIN): the server says SERVFAIL.
                return defer.fail(RuntimeError("SERVFAIL, as the test asked"))
            return defer.fail(names_error.DomainError(name))  # on to the zones

    zones = [authority.PySourceAuthority(path) for path in options.zone]
    factory = server.DNSServerFactory(authorities=[Failing(), *zones])
    factory.noisy = False
    reactor.listenUDP(options.port, names_dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    reactor.listenTCP(options.port, factory, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    serve(sys.argv[1:])
