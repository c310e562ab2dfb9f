"""TLS for both protocols: a server context that follows the certificate on
disk, the implicit-TLS endpoint, and a self-signed certificate for `make run`.

The certificate and key are checked at most once a second, on a new
connection; when either file changed they are loaded again, so a renewed
certificate (from an ACME client, say) is used without a restart. A renewal
that cannot be loaded is logged and the last good certificate stays in use.

The implicit-TLS endpoint is a Twisted endpoint-string parser plugin
(`ImplicitTLSParser`, found through ``twisted/plugins/mailboxd_tls.py``), so
that ``serverFromString`` parses and checks it as it does ``tcp:``::

    mailbox-tls:PORT[:interface=ADDRESS][:backlog=N][:certKey=PEM[:privateKey=PEM]]

PORT, interface and backlog mean what they mean for ``tcp:``: TLS from the
first byte over TCP. certKey and privateKey are the certificate (chain) and
its key, as for Twisted's ``ssl:`` (privateKey defaults to certKey).

The operator writes ``tls:PORT[:interface=...]`` (the documented form, a
config contract), and `endpoint_string` names the plugin for Twisted. The
prefix ``tls`` itself is taken, by Twisted's own server parser in
twisted_core (``tls:DIRECTORY[:port=N]``, certificates by SNI; Twisted 26.10
has it): of two plugins with one prefix, Twisted takes whichever it finds
first, and its own reads ``tls:465`` as the directory "465" on port 443.
Only the prefix changes; the rest of the string is the operator's, parsed
by Twisted. The certificate is the one in [tls]: the service adds it
(`with_certificate`), and the config refuses a certKey or privateKey of the
operator's own.

Parsing reads no file: the config is checked with this parser, and only a
listening server loads certificates. The endpoint loads them when it
listens, as a `ServerTLS` (so renewals are followed here too), and a
certificate that cannot be loaded fails the listen, naming the file. An
endpoint parsed without certKey (as the config check parses the operator's
words) refuses to listen.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ServerEndpoint, quoteStringArgument
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from .private import private_dir

log = Logger()

IMPLICIT_PREFIX = "tls:"  # what the operator writes: TLS from the first byte, [tls]'s certificate
PLUGIN_PREFIX = "mailbox-tls"  # what Twisted knows our parser by (see the module docstring)


class TLSConfigError(Exception):
    """The certificate or key cannot be used; str() is one line naming the file."""


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def context_for(certificate: Path, private_key: Path) -> SSL.Context:
    """The server's TLS context for this certificate and key; TLSConfigError
    naming the file if either cannot be used."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.set_cipher_list(b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!eNULL")
    for path, what, load in (
        (certificate, "certificate", ctx.use_certificate_chain_file),
        (private_key, "private key", ctx.use_privatekey_file),
    ):
        try:
            path.read_bytes()  # OpenSSL's own error for a missing file says less
            load(str(path))
        except (SSL.Error, OSError) as e:
            if isinstance(e, SSL.Error) and "mismatch" in str(e):
                # OpenSSL checks the key against the certificate as it loads it.
                raise TLSConfigError(
                    f"{private_key}: the private key does not match {certificate}"
                ) from None
            reason = e.strerror if isinstance(e, OSError) else "not a PEM " + what
            raise TLSConfigError(f"{path}: cannot load the TLS {what}: {reason}") from None
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(
            f"{private_key}: the private key does not match {certificate}"
        ) from None
    return ctx


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """An OpenSSL context factory for servers that reloads changed files."""

    def __init__(self, certificate: Path, private_key: Path, clock: IReactorTime) -> None:
        self.certificate = certificate
        self.private_key = private_key
        self.clock = clock
        self._stamps = (_stamp(certificate), _stamp(private_key))
        self._ctx = context_for(certificate, private_key)  # errors stop start-up
        self._checked = clock.seconds()

    def getContext(self) -> SSL.Context:
        now = self.clock.seconds()
        if now - self._checked >= 1.0:
            self._checked = now
            stamps = (_stamp(self.certificate), _stamp(self.private_key))
            if stamps != self._stamps:
                self._stamps = stamps
                try:
                    self._ctx = context_for(self.certificate, self.private_key)
                    log.info("TLS certificate reloaded from {path}", path=str(self.certificate))
                except TLSConfigError as e:
                    log.error("{error}; still using the previous certificate", error=str(e))
        return self._ctx


@implementer(IStreamServerEndpoint)
@attrs.frozen
class ImplicitTLSEndpoint:
    """TLS from the first byte over `endpoint` (TCP), with the certificate
    and key loaded when it listens; see the module docstring."""

    endpoint: IStreamServerEndpoint
    clock: IReactorTime
    certificate: Path | None
    private_key: Path | None

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        if self.certificate is None or self.private_key is None:
            return fail(ValueError("a tls: endpoint needs certKey= (its certificate) to listen"))
        try:
            tls = ServerTLS(self.certificate, self.private_key, self.clock)
        except TLSConfigError as e:
            return fail(e)
        return self.endpoint.listen(wrap_implicit(tls, protocolFactory))


def implicit_tls_endpoint(
    reactor: Any,  # IReactorTCP for the endpoint, IReactorTime for the certificate's checks
    port: str,
    interface: str = "",
    backlog: str = "50",
    *,
    certKey: str | None = None,
    privateKey: str | None = None,
) -> ImplicitTLSEndpoint:
    """The endpoint a ``mailbox-tls:`` string describes (its words as
    Twisted hands them over); ValueError or TypeError if they are wrong."""
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is not from 0 to 65535")
    queued = int(backlog)
    if queued < 1:
        raise ValueError(f"backlog {queued} is not a positive number")
    if privateKey is not None and certKey is None:
        raise ValueError("privateKey= needs certKey=")
    tcp = TCP4ServerEndpoint(reactor, number, backlog=queued, interface=interface)
    return ImplicitTLSEndpoint(
        tcp,
        reactor,
        None if certKey is None else Path(certKey),
        None if certKey is None else Path(privateKey or certKey),
    )


@implementer(IPlugin, IStreamServerEndpointStringParser)
class ImplicitTLSParser:
    """The implicit-TLS endpoint-string parser; see the module docstring."""

    prefix = PLUGIN_PREFIX

    def parseStreamServer(self, reactor: Any, *args: Any, **kwargs: Any) -> ImplicitTLSEndpoint:
        # The interface's signature (strings from the description); what they
        # mean is implicit_tls_endpoint's.
        return implicit_tls_endpoint(reactor, *args, **kwargs)


def endpoint_string(description: str) -> str:
    """The endpoint string for Twisted of a listener as the operator wrote it:
    ``tls:...`` names our parser (see the module docstring), the rest stays."""
    if description.startswith(IMPLICIT_PREFIX):
        return f"{PLUGIN_PREFIX}:{description[len(IMPLICIT_PREFIX) :]}"
    return description


def with_certificate(description: str, certificate: Path, private_key: Path) -> str:
    """An implicit-TLS endpoint string with this certificate and key."""
    return (
        f"{description}:certKey={quoteStringArgument(str(certificate))}"
        f":privateKey={quoteStringArgument(str(private_key))}"
    )


def wrap_implicit(tls: ServerTLS, factory: Any) -> TLSMemoryBIOFactory:
    return TLSMemoryBIOFactory(tls, False, factory)


def tls_connection(transport: Any) -> SSL.Connection | None:
    """The OpenSSL connection under `transport`, if it speaks TLS."""
    get = getattr(transport, "getHandle", None)
    handle = get() if get is not None else None
    return handle if isinstance(handle, SSL.Connection) else None


def describe(transport: Any) -> str | None:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384``, for Received headers and logs."""
    conn = tls_connection(transport)
    if conn is None:
        return None
    version = conn.get_protocol_version_name()
    cipher = conn.get_cipher_name()
    return f"{version} {cipher}" if cipher else version


def make_self_signed(hostname: str, certificate: Path, private_key: Path) -> bool:
    """Create a self-signed certificate for `hostname` unless both files exist."""
    if certificate.exists() and private_key.exists():
        return False
    now = datetime.datetime.now(datetime.timezone.utc)
    cert_pem, key_pem = self_signed_pem(
        hostname, now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=825)
    )
    private_dir(certificate.parent)
    private_dir(private_key.parent)
    fd = os.open(private_key, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    certificate.write_bytes(cert_pem)
    return True


def self_signed_pem(
    hostname: str, valid_from: datetime.datetime, valid_until: datetime.datetime
) -> tuple[bytes, bytes]:
    """A self-signed certificate for `hostname` and its private key, as PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_until)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
