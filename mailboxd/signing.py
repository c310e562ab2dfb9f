"""DKIM signing of relayed mail (RFC 6376, with dkimpy) and its keys
(`[dkim] keys`, `selector`; `mailboxctl dkim keygen|show`).

A domain's key is `<keys>/<domain>/<selector>.pem`, readable by the server
only. Keys are read where they are used, in the checks' threads: a key
added, replaced or removed takes effect with the next message, and a key
that cannot be used is said once (per file version) while that domain's
mail goes out unsigned rather than not at all.
"""

from __future__ import annotations

import base64
import os
import re
import threading
from pathlib import Path

import attrs
import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.logger import Logger

from .printable import shown

log = Logger()

CANONICALIZATION = (b"relaxed", b"relaxed")  # survives the header rewrapping relays do
TXT_STRING_MAX = 255  # characters in one string of a TXT record (RFC 1035 §3.3)
CAUSES_SAID = 100  # distinct signing failures said; the set stays small whatever comes in
_CAUSE_DIGITS = re.compile(r"[0-9]+")  # an instance number or a count: one cause


class KeyProblem(Exception):
    """A key that cannot be used; str() says why, in one line."""


def key_path(keys: Path, domain: str, selector: str) -> Path:
    return keys / domain.lower() / f"{selector}.pem"


def new_key(bits: int = 2048) -> bytes:
    """A new RSA private key, PEM (PKCS#8)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key(pem: bytes) -> str:
    """The p= value of the DNS record: the public key, DER, base64."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise KeyProblem(f"not a PEM private key without a password ({e})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyProblem("not an RSA key")
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def dns_record(domain: str, selector: str, pem: bytes) -> str:
    """The TXT record to publish, as one line in zone-file syntax, its value
    split into quoted strings of at most 255 characters."""
    value = f"v=DKIM1; k=rsa; p={public_key(pem)}"
    strings = [value[i : i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)]
    quoted = " ".join(f'"{s}"' for s in strings)
    return f"{selector}._domainkey.{domain.lower()}. IN TXT {quoted}"


def write_key(path: Path, pem: bytes, group: int) -> None:
    """Create `path` (never over an existing key), and the folders to it,
    readable by their owner and `group` only: run as root, with the config
    file's group, that is the server's user and no other."""
    made = [p for p in (path.parent.parent, path.parent) if not p.exists()]
    for folder in made:
        folder.mkdir()
        _share(os.open(folder, os.O_RDONLY | os.O_DIRECTORY), 0o750, group)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        _share(fd, 0o640, group)


def _share(fd: int, mode: int, group: int) -> None:
    try:
        os.fchmod(fd, mode)  # whatever the umask
        if os.geteuid() == 0:
            os.fchown(fd, -1, group)
    finally:
        os.close(fd)


@attrs.define(eq=False)
class Signer:
    """Signs with the keys under `keys`; blocking, for the checks' threads."""

    keys: Path
    selector: str
    # Per key file: its (mtime, size) when read, and the key or the problem.
    _read: dict[Path, tuple[tuple[float, int], bytes | str]] = attrs.field(factory=dict)
    _said: set[tuple[Path, object]] = attrs.field(factory=set)
    _failures: set[tuple[str, str, str]] = attrs.field(factory=set)  # said by _cannot
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def key(self, domain: str) -> bytes | None:
        """`domain`'s private key, or None (said once) if it has none usable."""
        path = key_path(self.keys, domain, self.selector)
        try:
            st = path.stat()
        except FileNotFoundError:
            self._say_once(
                path, "missing", "dkim: no key for {domain} ({path}): sending unsigned", domain
            )
            return None
        except OSError as e:
            self._say_once(
                path,
                e.errno,
                "dkim: cannot read the key of {domain} ({path}): " + _brace(str(e.strerror)),
                domain,
            )
            return None
        version = (st.st_mtime, st.st_size)
        with self._lock:
            known = self._read.get(path)
        if known is None or known[0] != version:
            try:
                pem = path.read_bytes()
                public_key(pem)  # a key dkimpy can use
                found: bytes | str = pem
            except (OSError, KeyProblem) as e:
                found = str(e.strerror if isinstance(e, OSError) else e)
            with self._lock:
                self._read[path] = known = (version, found)
        value = known[1]
        if isinstance(value, str):
            self._say_once(
                path,
                version,
                "dkim: the key of {domain} ({path}) cannot be used: " + _brace(value),
                domain,
            )
            return None
        return value

    def survey(self, domains: list[str]) -> None:
        """Say, at start, which domains have no usable key (the same lines
        the first message would cause). Blocking."""
        for domain in domains:
            self.key(domain)

    def sign(self, message: bytes, domain: str) -> bytes | None:
        """The DKIM-Signature field (CRLF line ends) for `message` (CRLF
        line ends), with d=`domain`; None if the domain has no usable key.
        dkimpy's default header list is RFC 6376 §5.4.1's, with From signed
        once more than it occurs (no From can be added after signing)."""
        key = self.key(domain)
        if key is None:
            return None
        try:
            return dkim.sign(
                message,
                self.selector.encode("ascii"),
                domain.lower().encode("ascii"),
                key,
                canonicalize=CANONICALIZATION,
            )
        except Exception as e:  # noqa: BLE001 - see _cannot
            self._cannot("sign", domain, e)
            return None

    def seal(self, message: bytes, domain: str, authserv_id: str) -> bytes | None:
        """The ARC set (RFC 8617) for a message forwarded off-site, sealed
        with `domain`'s key: ARC-Seal, ARC-Message-Signature and
        ARC-Authentication-Results, the last made from our
        Authentication-Results (`authserv_id`), which the message (CRLF line
        ends) must carry. None if the domain has no usable key."""
        key = self.key(domain)
        if key is None:
            return None
        try:
            fields = dkim.arc_sign(
                message,
                self.selector.encode("ascii"),
                domain.lower().encode("ascii"),
                key,
                authserv_id.encode("ascii"),
            )
        except Exception as e:  # noqa: BLE001 - see _cannot
            self._cannot("seal", domain, e)
            return None
        return b"".join(fields) or None

    def _cannot(self, what: str, domain: str, error: Exception) -> None:
        """A message dkimpy would not sign or seal: it goes out without, since
        refusing it (or a 451, again at every try) would lose mail that is
        only unusual. dkimpy says so with a DKIMException: a header line
        without a colon (MessageFormatError), no From: field, an ARC chain
        past i=50 (ParameterError); and, for inputs it did not foresee, with
        whatever Python raised (an IndexError for a header that starts
        folded). Said once per cause, in the library's words up to the first
        colon, which come before any text of the message's."""
        cause = _CAUSE_DIGITS.sub("N", str(error).split(":", 1)[0])[:80]
        key = (what, type(error).__name__, cause)
        with self._lock:
            if key in self._failures or len(self._failures) >= CAUSES_SAID:
                return
            self._failures.add(key)
        log.warn(
            "dkim: cannot {what} a message for {domain} ({error}: {cause}): "
            "sending it without; said once for this cause",
            what=what,
            domain=domain,
            error=type(error).__name__,
            cause=shown(cause),
        )

    def _say_once(self, path: Path, version: object, text: str, domain: str) -> None:
        with self._lock:
            if (path, version) in self._said:
                return
            self._said.add((path, version))
        log.warn(text, domain=domain, path=str(path))


def _brace(text: str) -> str:
    """Text put into a log format, its braces kept literal."""
    return text.replace("{", "{{").replace("}", "}}")
