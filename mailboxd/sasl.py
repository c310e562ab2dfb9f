"""The SASL exchange both protocols speak: PLAIN (RFC 4616) and LOGIN.

`start` and `respond` return what happens next, as a value; each protocol
turns it into its own reply (SMTP ``334``/``501``, POP3 ``+``/``-ERR``) and
logs in with the credentials it ends with. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

import attrs


@attrs.frozen
class Challenge:
    """Send `text` (already base64) and pass the client's next line to `respond`."""

    text: str


@attrs.frozen(repr=False)
class Credentials:
    username: str
    password: bytes

    def __repr__(self) -> str:  # never show the password
        return f"<Credentials {self.username!r}>"


@attrs.frozen
class Malformed:
    """A response that cannot be decoded; `why` says how."""

    why: str


@attrs.frozen
class Forbidden:
    """Well-formed but refused without a password check; counts as a failure."""

    username: str
    why: str


@attrs.frozen
class Aborted:
    """The client sent ``*`` (RFC 4954 §4)."""


@attrs.frozen
class Unsupported:
    mechanism: str


Step = Challenge | Credentials | Malformed | Forbidden | Aborted | Unsupported

USERNAME = "VXNlcm5hbWU6"  # "Username:", as LOGIN clients expect
PASSWORD = "UGFzc3dvcmQ6"  # "Password:"


class SASLError(ValueError):
    """A malformed SASL response; str() says what was wrong."""


def b64decode(response: str) -> bytes:
    """Decode a SASL response line; ``=`` is the empty response (RFC 4954)."""
    if response == "=":
        return b""
    try:
        return base64.b64decode(response, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError("cannot decode the response as base64") from None


@attrs.define
class Exchange:
    """One client's SASL exchange, from AUTH to credentials."""

    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    _next: Callable[[str], Step] | None = attrs.field(init=False, default=None)

    @property
    def waiting(self) -> bool:
        """True while the client's next line is a SASL response, not a command."""
        return self._next is not None

    def start(self, mechanism: str, initial: str | None) -> Step:
        """Begin with AUTH `mechanism`, with its initial response if one was given."""
        self._next = None
        mechanism = mechanism.upper()
        if mechanism not in self.mechanisms:
            return Unsupported(mechanism)
        if mechanism == "PLAIN":
            return self._plain(initial) if initial else self._ask(self._plain, "")
        if initial:
            return self._username(initial)
        return self._ask(self._username, USERNAME)

    def respond(self, line: str) -> Step:
        """The client's line after a Challenge."""
        step, self._next = self._next, None
        line = line.strip()
        if step is None:
            return Malformed("no authentication exchange in progress")
        if line == "*":
            return Aborted()
        return step(line)

    def cancel(self) -> None:
        self._next = None

    def _ask(self, step: Callable[[str], Step], challenge: str) -> Challenge:
        self._next = step
        return Challenge(challenge)

    def _plain(self, response: str) -> Step:
        try:
            parts = b64decode(response).split(b"\0")
        except SASLError as e:
            return Malformed(str(e))
        if len(parts) != 3 or not parts[1]:
            return Malformed("expected authzid NUL authcid NUL password")
        authzid, authcid, password = parts
        username = authcid.decode("utf-8", "replace")
        if authzid and authzid != authcid:  # nobody may act for another
            return Forbidden(
                username, "authorization identity differs from authentication identity"
            )
        return Credentials(username, password)

    def _username(self, response: str) -> Step:
        try:
            username = b64decode(response).decode("utf-8", "replace")
        except SASLError as e:
            return Malformed(str(e))

        def password(answer: str) -> Step:
            try:
                return Credentials(username, b64decode(answer))
            except SASLError as e:
                return Malformed(str(e))

        return self._ask(password, PASSWORD)
