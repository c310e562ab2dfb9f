"""The control channel between RemoteMailServer and its child process: one
JSON request per line, one JSON answer per line; Messages travel as objects
with their bytes in base64 (and, for other languages' clients, their subject,
text and HTML parts and links, as Message has them)."""

from __future__ import annotations

import base64
from typing import Any

from .api import Message

# Operations the control channel serves: method names of MailServer.
OPERATIONS = {
    "add_account",
    "remove_account",
    "accounts",
    "messages",
    "deliver",
    "advance",
    "reset",
    "outbound",
    "wait_change",
    "faults_on",
    "faults_clear",
    "world_on",
    "world_clear",
    "stop",
}


def encode(value: Any) -> Any:
    if isinstance(value, Message):
        return {
            "__message__": True,
            "envelope_from": value.envelope_from,
            "recipients": list(value.recipients),
            "raw": base64.b64encode(value.raw).decode(),
            "account": value.account,
            "authenticated": value.authenticated,
            "tls": value.tls,
            # For clients not in Python; decode() builds them again from raw.
            "subject": value.subject,
            "text": value.text,
            "html": value.html,
            "links": value.links,
        }
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    if isinstance(value, dict) and value.get("__message__"):
        return Message(
            value["envelope_from"],
            tuple(value["recipients"]),
            base64.b64decode(value["raw"]),
            value["account"],
            value["authenticated"],
            value["tls"],
        )
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value
