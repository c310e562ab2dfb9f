"""What failed logins, blocks and relay counts count a client address under
(the counts themselves: tests/test_state_contract.py)."""

from __future__ import annotations

import ipaddress

import pytest

from mailboxd.accounts import Account
from mailboxd.limits import relay_sender
from mailboxd.policy import Client, Listener
from mailboxd.state import client_key


@pytest.mark.parametrize(
    "ip, prefix, key",
    [
        ("192.0.2.7", 64, "192.0.2.7"),
        ("::ffff:192.0.2.7", 64, "192.0.2.7"),  # IPv4-mapped: the IPv4 address
        ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::9", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2::9", 128, "2001:db8:1:2::9"),
        ("::1", 64, "::/64"),
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("not an address", 64, "not an address"),
    ],
)
def test_what_an_address_is_counted_under(ip, prefix, key):
    assert client_key(ip, prefix) == key


ALICE = Account(address="alice@example.test", domain="example.test", local="alice")
TRUSTED = (ipaddress.ip_network("2001:db8:9::/48"),)


@pytest.mark.parametrize(
    "client, counted",
    [
        # Two addresses of one /64, POP-authorised: one count, the network's.
        (
            Client(Listener.MTA, "2001:db8:1:2::1", pop_domains=("example.test",)),
            "2001:db8:1:2::/64",
        ),
        (
            Client(Listener.MTA, "2001:db8:1:2::ff", pop_domains=("example.test",)),
            "2001:db8:1:2::/64",
        ),
        (
            Client(Listener.MTA, "2001:db8:1:3::1", pop_domains=("example.test",)),
            "2001:db8:1:3::/64",
        ),
        (Client(Listener.MTA, "192.0.2.7", pop_domains=("example.test",)), "192.0.2.7"),
        # An account counts as itself, wherever it logs in from.
        (Client(Listener.SUBMISSION, "2001:db8:1:2::1", account=ALICE), "alice@example.test"),
        # Trusted networks and clients that may not relay count nothing.
        (
            Client(
                Listener.MTA,
                "2001:db8:9::1",
                pop_domains=("example.test",),
                trusted_networks=TRUSTED,
            ),
            None,
        ),
        (Client(Listener.MTA, "2001:db8:1:2::1"), None),
    ],
)
def test_whose_count_a_relayed_recipient_goes_to(client, counted):
    assert relay_sender(client, 64) == counted
