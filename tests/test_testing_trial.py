"""The Twisted-native fixture, run by trial itself in a child process: trial
runs the reactor in the main thread, which the in-process tests here cannot
share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TRIAL_TESTS = """
import smtplib

from twisted.internet import threads
from twisted.trial import unittest

from mailboxd.testing import TwistedMailServer


class MailTests(unittest.TestCase):
    def setUp(self):
        self.server = TwistedMailServer(domains=["example.test"])
        return self.server.start()

    def tearDown(self):
        return self.server.stop()

    def send(self):
        with smtplib.SMTP(self.server.host, self.server.smtp_port) as s:
            s.sendmail("x@far.test", ["alice@example.test"], b"Subject: trial\\r\\n\\r\\nhi\\r\\n")

    def test_wait_for_message_is_a_deferred(self):
        self.server.add_account("alice@example.test", "pw")
        waiting = self.server.wait_for_message(to="alice@example.test", subject="trial")
        threads.deferToThread(self.send)
        return waiting.addCallback(lambda m: self.assertEqual(m.envelope_from, "x@far.test"))

    def test_timeout_fails_the_deferred(self):
        d = self.server.wait_for_message(to="alice@example.test", timeout=0.2)
        return self.assertFailure(d, AssertionError)

    def test_advance_and_reset_answer_at_once(self):
        self.server.add_account("alice@example.test", "pw")
        self.server.advance(3600)
        self.server.reset()
        self.assertEqual(self.server.accounts(), [])
"""


def test_twisted_mail_server_under_trial(tmp_path):
    (tmp_path / "test_with_trial.py").write_text(TRIAL_TESTS)
    env = {"PYTHONPATH": f"{ROOT}:{tmp_path}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "twisted.trial", "test_with_trial"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASSED (successes=3)" in out.stdout, out.stdout
