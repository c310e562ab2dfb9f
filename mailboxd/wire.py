"""A stored message as POP3 sends it, made chunk by chunk.

Maildir files have LF line ends (or CRLF, from other tools); on the wire each
line ends in CRLF, a line starting with "." gets another (RFC 1939 §3), and
the last line ends in CRLF. `WireEncoder` does this as the file is read, so
RETR and TOP hold one chunk of a message in memory, whatever its size.
"""

from __future__ import annotations

import attrs


@attrs.define
class WireEncoder:
    """Feed the file's bytes in any chunks; `done` turns True once TOP has all it wants."""

    top: int | None = None  # TOP: body lines wanted after the header; None: the whole message
    done: bool = False
    _line_start: bool = True
    _held_cr: bool = False  # a chunk's last CR, which may begin a CRLF split across chunks
    _in_header: bool = True

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        if self._held_cr:
            chunk = b"\r" + chunk
        self._held_cr = chunk.endswith(b"\r")
        if self._held_cr:
            chunk = chunk[:-1]
        data = chunk.replace(b"\r\n", b"\n")
        if self.top is None:  # RETR: where the header ends does not matter
            return self._bulk(data)
        # TOP: line by line, to see where the header ends and count the lines
        # asked for after it.
        out: list[bytes] = []
        pos = 0
        while pos < len(data) and not self.done:
            pos = self._one_line(data, pos, out)
        return b"".join(out)

    def finish(self) -> bytes:
        """What is left once the file has been read: a held CR, and the last CRLF."""
        if self.done:
            return b""
        self.done = True
        tail = b"\r" if self._held_cr else b""
        if tail or not self._line_start:
            tail += b"\r\n"
        return tail

    def _one_line(self, data: bytes, pos: int, out: list[bytes]) -> int:
        end = data.find(b"\n", pos)
        segment = data[pos:] if end < 0 else data[pos:end]
        if self._line_start and segment.startswith(b"."):
            out.append(b".")
        out.append(segment)
        if end < 0:
            self._line_start = False
            return len(data)
        out.append(b"\r\n")
        blank = self._line_start and not segment
        self._line_start = True
        if self._in_header:
            if blank:
                self._in_header = False
                self.done = self.top == 0
        elif self.top is not None:
            self.top -= 1
            self.done = self.top == 0
        return end + 1

    def _bulk(self, data: bytes) -> bytes:
        stuffed = data.replace(b"\n.", b"\n..")
        if self._line_start and stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        self._line_start = stuffed.endswith(b"\n")
        return stuffed.replace(b"\n", b"\r\n")


def wire_form(stored: bytes) -> bytes:
    """A whole message, held in memory, as RETR sends it (before the final
    dot): what WireEncoder gives, in three passes and no object."""
    data = stored.replace(b"\r\n", b"\n")
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\n.", b"\n..").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data
