"""A scriptable SMTP capture server: the smarthost of the outbound black-box tests.

    python tests/capture_smtp.py --port N --out DIR [--script FILE]

It listens on 127.0.0.1 only. Each message it answers 250 to is written, after
the 250 has been sent, as ``DIR/NNNN.eml`` (the mail data exactly as received:
CRLF line ends, dot-stuffing undone) and ``DIR/NNNN.json`` (``mail_from``,
``rcpt_to``, ``helo``, ``size``, ``sha256``, ``connection``), the .json last. When it
listens it creates ``DIR/.ready`` and prints ``capture_smtp listening on
127.0.0.1:PORT``. ``DIR/.transcript`` logs every line in and out.

The script file is read again at each new connection, so a test can change the
behaviour of later attempts by rewriting it; a missing or empty file accepts all.
One rule a line, ``#`` comments; the first rule that matches a step decides it::

    STAGE ACTION [match=REGEX] [times=N]

    STAGE   connect | helo | mail | rcpt | data (the DATA command) | end (of data)
    ACTION  NNN text...    reply this instead of the normal answer
            hang           never answer (and ignore what follows)
            drop           close the connection without answering
            sleep SECONDS  wait, then give the normal answer
            greet TEXT     (connect only) send TEXT instead of an SMTP greeting, close
    match=  a regular expression searched in the step's argument: the EHLO name,
            the sender, the recipient; for data and end, each accepted recipient
    times=  the rule applies to its first N matches only (counted over the
            process's life, per rule text); later ones fall through

Examples: ``end 451 4.3.0 try again later times=1`` (451, then 250 for the
next transactions); ``rcpt 550 5.1.1 no such user match=^nobody@``; ``end hang``;
``mail drop``; ``connect greet HTTP/1.1 400 Bad Request``; ``end sleep 0.05``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import os
import re
import sys
from pathlib import Path

from twisted.internet import protocol, reactor
from twisted.protocols.basic import LineReceiver

STAGES = ("connect", "helo", "mail", "rcpt", "data", "end")


class Rule:
    def __init__(self, line: str) -> None:
        self.text = line
        words = line.split()
        self.match = self.times = None
        while words and words[-1].startswith(("match=", "times=")):
            key, _, value = words.pop().partition("=")
            if key == "match":
                self.match = re.compile(value, re.IGNORECASE)
            else:
                self.times = int(value)
        if len(words) < 2 or words[0] not in STAGES:
            raise ValueError(f"bad rule: {line!r}")
        self.stage, self.action, self.args = words[0], words[1], words[2:]

    def matches(self, stage: str, args: list[str], used: collections.Counter) -> bool:
        if stage != self.stage:
            return False
        if self.match is not None and not any(self.match.search(a) for a in args):
            return False
        if self.times is not None and used[self.text] >= self.times:
            return False
        used[self.text] += 1
        return True


def read_script(path: Path | None) -> list[Rule]:
    if path is None or not path.exists():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [Rule(line) for line in lines if line and not line.startswith("#")]


class Capture(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def connectionMade(self) -> None:
        self.number = next(self.factory.connections)
        self.rules = read_script(self.factory.script)
        self.helo = ""
        self.hung = False
        self.data = b""
        self.reset()
        self.step("connect", [], (220, "capture.test ESMTP capture_smtp"))

    def reset(self) -> None:
        self.sender: str | None = None
        self.recipients: list[str] = []

    def note(self, direction: str, line: bytes) -> None:
        with open(self.factory.out / ".transcript", "ab") as f:
            f.write(b"%d %s %s\n" % (self.number, direction.encode(), line[:200]))

    def send(self, code: int | str, text: str = "", more: list[str] = ()) -> None:
        for line in more:
            self.note(">", f"{code}-{line}".encode())
            self.sendLine(f"{code}-{line}".encode())
        self.note(">", f"{code} {text}".encode())
        self.sendLine(f"{code} {text}".encode())

    def step(self, stage: str, args: list[str], normal, then=None, more=()) -> None:
        """Give a step's normal answer (code, text), unless a rule says otherwise."""
        rule = next((r for r in self.rules if r.matches(stage, args, self.factory.used)), None)
        action = rule.action if rule else None
        if action == "hang":
            self.hung = True
        elif action == "drop":
            self.note("!", b"drop")
            self.transport.loseConnection()
        elif action == "greet":
            self.note(">", " ".join(rule.args).encode())
            self.sendLine(" ".join(rule.args).encode())
            self.transport.loseConnection()
        elif action == "sleep":
            self.pauseProducing()  # later pipelined lines wait for the answer
            reactor.callLater(float(rule.args[0]), self.answer, normal, then, more, True)
        elif action is not None:  # a reply code
            self.send(action, " ".join(rule.args))
        else:
            self.answer(normal, then, more)

    def answer(self, normal, then, more, resume: bool = False) -> None:
        if not self.transport.connected:
            return  # the client went away while we slept: nothing acknowledged
        self.send(*normal, more=more)
        if then is not None:
            then()
        if resume:
            self.resumeProducing()

    def lineReceived(self, line: bytes) -> None:
        self.note("<", line)
        if self.hung:
            return
        verb, _, arg = line.decode("utf-8", "replace").partition(" ")
        verb = verb.upper()
        if verb in ("EHLO", "HELO"):
            self.helo = arg.strip()
            extensions = ["capture.test", "PIPELINING", "8BITMIME", "SIZE 100000000"]
            normal = (250, extensions[-1]) if verb == "EHLO" else (250, "capture.test")
            more = extensions[:-1] if verb == "EHLO" else []
            self.step("helo", [self.helo], normal, self.reset, more)
        elif verb == "MAIL":
            sender = path(arg, "FROM:")
            self.step("mail", [sender or ""], (250, "2.1.0 Ok"), lambda: self.set_sender(sender))
        elif verb == "RCPT":
            rcpt = path(arg, "TO:")
            self.step("rcpt", [rcpt or ""], (250, "2.1.5 Ok"), lambda: self.recipients.append(rcpt))
        elif verb == "DATA":
            if self.sender is None or not self.recipients:
                self.send(503, "5.5.1 need MAIL and RCPT")
                return
            self.step("data", self.recipients, (354, "go ahead"), self.setRawMode)
        elif verb == "RSET":
            self.reset()
            self.send(250, "2.0.0 Ok")
        elif verb == "NOOP":
            self.send(250, "2.0.0 Ok")
        elif verb == "QUIT":
            self.send(221, "2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.send(500, "5.5.2 unknown command")

    def set_sender(self, sender: str | None) -> None:
        self.reset()
        self.sender = sender

    def rawDataReceived(self, data: bytes) -> None:
        self.data += data
        # The end is CRLF.CRLF, or ".CRLF" first thing for an empty message.
        if self.data.startswith(b".\r\n"):
            end, rest = 0, self.data[3:]
        elif b"\r\n.\r\n" in self.data:
            end = self.data.index(b"\r\n.\r\n") + 2
            rest = self.data[end + 3 :]
        else:
            return
        body = self.data[:end]
        body = (b"\r\n" + body).replace(b"\r\n..", b"\r\n.")[2:]
        self.data = b""
        self.note("<", b"[%d bytes of data, then .]" % len(body))
        sender, recipients = self.sender, self.recipients
        self.reset()
        self.setLineMode()
        saved = lambda: self.save(sender, recipients, body)  # noqa: E731
        self.step("end", recipients, (250, "2.0.0 Ok: captured"), saved)
        self.dataReceived(rest)  # what was pipelined behind the data, after the answer

    def save(self, sender: str, recipients: list[str], body: bytes) -> None:
        out, n = self.factory.out, next(self.factory.messages)
        name = f"{os.getpid()}-{n:05d}"
        (out / f"{name}.eml").write_bytes(body)
        envelope = {
            "mail_from": sender,
            "rcpt_to": recipients,
            "helo": self.helo,
            "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "connection": self.number,
        }
        tmp = out / f".{name}.json.tmp"
        tmp.write_text(json.dumps(envelope))
        os.rename(tmp, out / f"{name}.json")


def path(arg: str, prefix: str) -> str | None:
    """The address in `FROM:<a> params` / `TO:<a>`, or None if malformed."""
    if not arg.upper().startswith(prefix):
        return None
    m = re.match(r"\s*<([^>]*)>", arg[len(prefix) :])
    return m.group(1) if m else None


class CaptureFactory(protocol.ServerFactory):
    protocol = Capture

    def __init__(self, out: Path, script: Path | None) -> None:
        self.out = out
        self.script = script
        self.used: collections.Counter = collections.Counter()
        self.connections = itertools.count(1)
        self.messages = itertools.count(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1 (0: any)")
    p.add_argument("--out", type=Path, required=True, help="directory for captured messages")
    p.add_argument("--script", type=Path, help="rules file, read at each connection")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    read_script(args.script)  # a bad rule stops us here, not at the first connection
    port = reactor.listenTCP(
        args.port, CaptureFactory(args.out, args.script), interface="127.0.0.1"
    )
    number = port.getHost().port
    # Said before .ready appears: a test that sees .ready reads this line.
    print(f"capture_smtp listening on 127.0.0.1:{number}", flush=True)
    (args.out / ".ready").write_text(f"{number}\n")
    reactor.run()


if __name__ == "__main__":
    sys.exit(main())
