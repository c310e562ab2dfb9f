"""Operator mistakes (issue 11) that need no running server: mailboxctl's
output closed early, a certificate and a key that do not belong together."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest

from mailboxd.tls import ServerTLS, TLSConfigError, make_self_signed

MAILBOXCTL = Path(sys.executable).parent / "mailboxctl"


def test_a_key_that_does_not_match_its_certificate_says_so(tmp_path):
    from twisted.internet.task import Clock

    make_self_signed("a.example.test", tmp_path / "a.pem", tmp_path / "a.key")
    make_self_signed("b.example.test", tmp_path / "b.pem", tmp_path / "b.key")
    with pytest.raises(TLSConfigError) as info:
        ServerTLS(tmp_path / "a.pem", tmp_path / "b.key", Clock())
    assert (
        str(info.value)
        == f"{tmp_path / 'b.key'}: the private key does not match {tmp_path / 'a.pem'}"
    )


def test_mailboxctl_into_a_pipe_closed_early_says_so_in_one_line(tmp_path):
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    (tmp_path / "etc").mkdir()
    lines = "".join(f"user{i:05d}@example.test:{hashed}\n" for i in range(5000))
    (tmp_path / "etc" / "accounts").write_text(lines)
    (tmp_path / "etc" / "aliases").write_text("")
    (tmp_path / "etc" / "mailbox.ini").write_text("[mailbox]\ndomains = example.test\n")
    done = subprocess.run(
        f"'{MAILBOXCTL}' --config etc/mailbox.ini user list | head -1",
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert done.stdout == "user00000@example.test\n"
    assert done.stderr == "mailboxctl: the output was closed before everything was written\n"
