"""A cache of verified credentials, so that a mail client polling every few
minutes costs one bcrypt check an hour, not one a login (as Dovecot's
``auth_cache``).

What is kept for an address is an HMAC, under a key made at random when the
process starts, of the stored hash and the password that matched it. No
password is kept, nor anything from which one could be recovered without the
key, which never leaves this process's memory. The stored hash is part of the
HMAC's input, and the entry holds that hash: a changed password or a removed
account (the hash differs or is gone) misses the cache at once. Only a match
is cached; a wrong password always costs a full bcrypt check.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable

import attrs


@attrs.frozen
class _Entry:
    hashed: bytes
    digest: bytes
    expires: float


@attrs.define(repr=False)
class CredentialCache:
    ttl: float  # seconds a verified password is remembered; 0 remembers nothing
    now: Callable[[], float]  # a monotonic clock
    _key: bytes = attrs.field(init=False, factory=lambda: secrets.token_bytes(32))
    _entries: dict[str, _Entry] = attrs.field(init=False, factory=dict)

    def __repr__(self) -> str:  # never show digests
        return f"<CredentialCache ttl={self.ttl} entries={len(self._entries)}>"

    def _digest(self, hashed: bytes, password: bytes) -> bytes:
        message = len(hashed).to_bytes(2, "big") + hashed + password
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def verified(self, key: str, hashed: bytes, password: bytes) -> bool:
        """True if `password` matched `hashed` for `key` within the last `ttl` seconds."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        if entry.expires <= self.now() or not hmac.compare_digest(entry.hashed, hashed):
            del self._entries[key]
            return False
        return hmac.compare_digest(entry.digest, self._digest(hashed, password))

    def remember(self, key: str, hashed: bytes, password: bytes) -> None:
        """Record that `password` matched `hashed` for `key` (a bcrypt check said so)."""
        if self.ttl <= 0:
            return
        now = self.now()
        if len(self._entries) >= 1024 and len(self._entries) % 1024 == 0:
            self._drop_expired(now)
        self._entries[key] = _Entry(hashed, self._digest(hashed, password), now + self.ttl)

    def _drop_expired(self, now: float) -> None:
        for key in [k for k, e in self._entries.items() if e.expires <= now]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
