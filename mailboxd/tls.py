"""TLS for both protocols: a server context that follows the certificate on
disk, the implicit-TLS endpoint, and a self-signed certificate for `make run`.

The certificate and key are checked at most once a second, on a new
connection; when either file changed they are loaded again, so a renewed
certificate (from an ACME client, say) is used without a restart. A renewal
that cannot be loaded is logged and the last good certificate stays in use.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from .private import private_dir

log = Logger()

IMPLICIT_PREFIX = "tls:"  # our endpoint: TLS from the first byte, with [tls]'s certificate


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


def implicit_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """The TCP endpoint under ``tls:PORT:...`` (the TLS layer wraps the factory)."""
    return serverFromString(reactor, "tcp:" + description[len(IMPLICIT_PREFIX) :])


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
