import poplib
import smtplib


def test_deliver_and_retrieve(server):
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as s:
        s.sendmail("x@far.test", ["alice@example.test"], b"Subject: t\r\n\r\nbody\r\n")
    p = poplib.POP3("127.0.0.1", server.pop3_port)
    p.user("alice@example.test")
    p.pass_("alice pw")
    assert p.stat()[0] == 1
    assert p.retr(1)[1][-1] == b"body"
    p.quit()
