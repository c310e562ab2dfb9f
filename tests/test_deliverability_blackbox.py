"""Mail the big providers accept, and honest results for mail coming in
(issue 14), on the real server: loop detection, and (with a DNS server on
loopback) DKIM signing, ARC sealing and the inbound SPF, DKIM and DMARC checks."""

from __future__ import annotations

import smtplib

import pytest
from conftest import ALICE

pytestmark = pytest.mark.blackbox


def received(count: int) -> bytes:
    return b"".join(
        b"Received: from hop%d.far.test by mx%d.far.test; Tue, 1 Dec 2026 10:00:00 +0000\r\n"
        % (i, i)
        for i in range(count)
    )


def test_a_message_with_more_than_max_hops_received_fields_is_refused(server):
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as s:
        s.sendmail("a@far.test", [ALICE], received(50) + b"Subject: ok\r\n\r\nfifty\r\n")
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("a@far.test", [ALICE], received(51) + b"Subject: loop\r\n\r\nloop\r\n")
    assert e.value.smtp_code == 554 and e.value.smtp_error == b"5.4.6 Too many hops"
    [kept] = server.messages(ALICE)
    assert b"fifty" in kept.read_bytes()
