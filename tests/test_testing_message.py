"""mailboxd.testing.Message: what tests look for in a message (text, html,
links, find), here and through the control channel of a child process."""

from __future__ import annotations

import base64
import json

from mailboxd.testing import Message
from mailboxd.testing.control import decode, encode

ALTERNATIVE = (
    b"From: shop@far.test\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: =?utf-8?q?Your_code?=\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Gr=C3=BC=C3=9Fe! Your code: 123456.\r\n"
    b"Confirm at https://shop.far.test/confirm?t=3Dabc=3D1, or see\r\n"
    b"(https://shop.far.test/help). A very long line that quoted-printable wraps=\r\n"
    b" softly.\r\n"
    b"--b1\r\n"
    b"Content-Type: text/html; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    + base64.encodebytes(
        "<p>Grüße! Your code: <b>123456</b></p>"
        '<a href="https://shop.far.test/confirm?t=abc=1">confirm</a> '
        '<a href="https://shop.far.test/unsubscribe?a=1&amp;b=2">unsubscribe</a>'
        '<a name="x">no href</a>'
        "<A HREF='https://shop.far.test/help'>help</A>".encode("iso-8859-1")
    ).replace(b"\n", b"\r\n")
    + b"--b1--\r\n"
)


def test_text_and_html_are_the_decoded_parts():
    m = Message("shop@far.test", ("alice@example.test",), ALTERNATIVE)
    assert m.subject == "Your code"
    assert m.text is not None and m.html is not None
    assert m.text.startswith("Grüße! Your code: 123456.\n")  # QP and UTF-8
    assert "wraps softly." in m.text  # the soft line break joined
    assert "\r" not in m.text
    assert m.html.startswith("<p>Grüße! Your code: <b>123456</b></p>")  # base64, Latin-1


def test_links_from_both_parts_in_order_each_once():
    m = Message("shop@far.test", ("alice@example.test",), ALTERNATIVE)
    assert m.links == [
        "https://shop.far.test/confirm?t=abc=1",  # the text's, without the comma after it
        "https://shop.far.test/help",  # without the parenthesis around it
        "https://shop.far.test/unsubscribe?a=1&b=2",  # the HTML's, entities resolved
    ]


def test_find_gives_the_first_match_or_its_group():
    m = Message("shop@far.test", ("alice@example.test",), ALTERNATIVE)
    assert m.find(r"code: (\d{6})") == "123456"
    assert m.find(r"\d{6}") == "123456"
    assert m.find(r"code: (\d{7})") is None


def test_a_message_without_parts_of_a_kind():
    plain = Message("", ("a@example.test",), b"Subject: hi\n\nJust text, http://x.test/a.\n")
    assert plain.text == "Just text, http://x.test/a.\n"
    assert plain.html is None
    assert plain.links == ["http://x.test/a"]
    html_only = Message(
        "",
        ("a@example.test",),
        b"Content-Type: text/html\n\n<p>Your code: <b>987654</b> <a href='/rel'>x</a></p>\n",
    )
    assert html_only.text is None  # never made from the HTML
    assert html_only.links == ["/rel"]
    assert html_only.find(r"(\d{6})") == "987654"  # no text part: the HTML is searched


def test_the_control_channel_carries_them_and_decode_has_them_again():
    m = Message("shop@far.test", ("alice@example.test",), ALTERNATIVE, "alice@example.test")
    sent = json.loads(json.dumps(encode(m)))
    assert sent["text"] == m.text and sent["html"] == m.html and sent["links"] == m.links
    assert sent["subject"] == "Your code"
    again = decode(sent)
    assert again == m
    assert again.find(r"code: (\d{6})") == "123456"


def test_a_stored_message_has_them_too():
    from mailboxd.testing import MailServer

    with MailServer() as server:
        server.add_account("alice@example.test", "pw")
        stored = server.deliver("alice@example.test", ALTERNATIVE, sender="shop@far.test")
        [m] = server.messages("alice@example.test")
        assert m == stored and b"\r\n" not in m.raw  # stored with LF line ends
        assert m.find(r"code: (\d{6})") == "123456"
        assert m.links[0] == "https://shop.far.test/confirm?t=abc=1"
