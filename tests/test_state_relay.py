"""What failed logins, blocks and relay counts count a client address under
(the counts themselves: tests/test_state_contract.py)."""

from __future__ import annotations

import pytest

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
