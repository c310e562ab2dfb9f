"""Client text made safe to show: in a reply or a header, or in a log line.

Whatever a client sends (a user name, an address, a HELO name) may hold a CR,
an LF, a NUL or an escape sequence; echoed as is, it could forge a reply, a
header or a log line (that fail2ban-style tools then act on), or make `grep`
take the log for a binary file.
"""

from __future__ import annotations

_LOG_LIMIT = 300


def arg_safe(text: str) -> str:
    """For a reply or a header: printable ASCII only, the rest as '?'."""
    return "".join(c if 0x20 < ord(c) < 0x7F else "?" for c in text)[:255]


def shown(text: str) -> str:
    """For a log event: one line, every control character (C0, DEL, C1, the
    Unicode line and paragraph separators) and the backslash escaped, so that
    what the client sent can still be read exactly."""
    text = text[:_LOG_LIMIT]
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(c) for c in text)


def _escape(c: str) -> str:
    if c == "\\":
        return "\\\\"
    if c.isprintable() or c == " ":
        return c
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
