"""AccessList: allow/deny networks for clients, IPv4 and IPv6, deny winning over allow."""

from __future__ import annotations

import pytest

from tcptotcp._access import AccessList, parse_network


def test_no_entries_permits_everyone_and_is_false() -> None:
    access = AccessList()
    assert not access
    assert access.permits("192.0.2.1")
    assert access.permits("::1")
    assert access.permits("not an address")
    assert access.describe() == "all clients"


def test_ipv4_cidr_allow() -> None:
    access = AccessList(allow=["10.0.0.0/8"])
    assert access
    assert access.permits("10.0.0.1")
    assert access.permits("10.255.255.255")
    assert not access.permits("11.0.0.1")
    assert not access.permits("9.255.255.255")


def test_single_addresses_are_hosts() -> None:
    access = AccessList(allow=["192.0.2.7", "::1"])
    assert access.permits("192.0.2.7")
    assert not access.permits("192.0.2.8")
    assert access.permits("::1")
    assert access.permits("0:0::1")  # any spelling of the same address
    assert not access.permits("::2")


def test_ipv6_cidr_allow() -> None:
    access = AccessList(allow=["2001:db8::/32"])
    assert access.permits("2001:db8::1")
    assert access.permits("2001:db8:ffff::1")
    assert not access.permits("2001:db9::1")


def test_allow_entries_of_one_family_refuse_the_other() -> None:
    assert not AccessList(allow=["0.0.0.0/0"]).permits("::1")
    assert not AccessList(allow=["::/0"]).permits("127.0.0.1")


def test_deny_overrides_allow() -> None:
    access = AccessList(allow=["10.0.0.0/8", "2001:db8::/32"], deny=["10.9.0.0/16", "2001:db8:bad::/48"])
    assert access.permits("10.1.2.3")
    assert not access.permits("10.9.2.3")
    assert access.permits("2001:db8:1::1")
    assert not access.permits("2001:db8:bad::1")


def test_deny_only_lets_the_rest_through() -> None:
    access = AccessList(deny=["192.0.2.0/24"])
    assert access
    assert not access.permits("192.0.2.200")
    assert access.permits("198.51.100.1")
    assert access.permits("::1")


def test_ipv4_mapped_clients_match_ipv4_networks() -> None:
    access = AccessList(allow=["127.0.0.0/8"], deny=["127.0.0.2"])
    assert access.permits("::ffff:127.0.0.1")
    assert access.permits("::ffff:7f00:1")
    assert not access.permits("::ffff:127.0.0.2")  # deny applies to the mapped form too
    assert not access.permits("::ffff:10.0.0.1")


def test_mapped_form_entries_are_ipv4_entries() -> None:
    access = AccessList(allow=["::ffff:192.0.2.0/120"])
    assert access.permits("192.0.2.9")
    assert access.permits("::ffff:192.0.2.9")
    assert not access.permits("192.0.3.9")


def test_ipv6_networks_do_not_cover_ipv4_hosts() -> None:
    # ::/0 means IPv6 hosts; a mapped client is an IPv4 host.
    access = AccessList(deny=["::/0"])
    assert not access.permits("2001:db8::1")
    assert access.permits("192.0.2.1")
    assert access.permits("::ffff:192.0.2.1")


def test_scoped_client_address() -> None:
    assert AccessList(allow=["fe80::/10"]).permits("fe80::1%eth0")


def test_overlapping_entries() -> None:
    access = AccessList(allow=["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3", "11.0.0.0/8"])
    assert access.permits("10.1.2.3")
    assert access.permits("11.2.3.4")
    assert not access.permits("12.0.0.1")


def test_non_ip_hosts_are_inside_no_network() -> None:
    assert not AccessList(allow=["0.0.0.0/0", "::/0"]).permits("")
    assert not AccessList(allow=["0.0.0.0/0"]).permits("/run/app.sock")
    assert AccessList(deny=["0.0.0.0/0"]).permits("/run/app.sock")


def test_a_lone_string_is_one_entry() -> None:
    access = AccessList(allow="10.0.0.0/8")
    assert access.permits("10.0.0.1")
    assert access.describe() == "allow 10.0.0.0/8"


@pytest.mark.parametrize(
    "text",
    ["10.0.0.300/8", "1.2.3.4/33", "", "example.com", "10.0.0.0/8 ", "::1/129", "10.0.0.0/-1", "1.2.3"],
)
def test_invalid_entries_name_the_value(text: str) -> None:
    for kwargs in ({"allow": [text]}, {"deny": ["10.0.0.0/8", text]}):
        with pytest.raises(ValueError) as info:
            AccessList(**kwargs)
        message = str(info.value)
        assert message.startswith(f"invalid network {text!r}")
        assert "\n" not in message


def test_host_bits_set_is_an_error() -> None:
    with pytest.raises(
        ValueError, match=r"invalid network '10\.0\.0\.1/8': host bits set \(the network is 10\.0\.0\.0/8\)"
    ):
        AccessList(allow=["10.0.0.1/8"])
    with pytest.raises(ValueError, match="host bits set"):
        AccessList(deny=["2001:db8::1/32"])


def test_zone_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="zone ids"):
        AccessList(allow=["fe80::%eth0/64"])


def test_non_strings_are_a_type_error() -> None:
    with pytest.raises(TypeError):
        AccessList(allow=[167772160])  # type: ignore[list-item]


def test_parse_network_accepts_netmasks() -> None:
    assert str(parse_network("10.0.0.0/255.0.0.0")) == "10.0.0.0/8"
    assert str(parse_network("::1")) == "::1/128"


def test_describe_and_repr() -> None:
    access = AccessList(allow=["10.0.0.0/8", "192.0.2.7", "::1"], deny=["10.9.0.0/16"])
    assert access.describe() == "allow 10.0.0.0/8, 192.0.2.7, ::1; deny 10.9.0.0/16"
    assert repr(access) == "AccessList(allow=['10.0.0.0/8', '192.0.2.7/32', '::1/128'], deny=['10.9.0.0/16'])"
    assert AccessList(deny=["::/0"]).describe() == "deny ::/0"
