"""The limit on new connections per remote address (``personaplex.server.address_limit``), with driven time.

The same limit against a real server (an attacker on 127.0.0.2 beside a caller on 127.0.0.1) is in
``test_server_hardening.py``."""

from __future__ import annotations

import ipaddress

import pytest

from personaplex.server.address_limit import NewConnectionLimit, address_key


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate_then_a_full_bucket_again():
    clock = Clock()
    limit = NewConnectionLimit(rate=2.0, burst=5, clock=clock)
    attacker = ("127.0.0.2", 40000)
    assert [limit.allow(attacker) for _ in range(7)] == [True] * 5 + [False, False]
    assert limit.refused == 2
    clock.now += 0.4  # 0.8 of a token
    assert not limit.allow(attacker)
    clock.now += 0.1  # 1.0 token
    assert limit.allow(attacker) and not limit.allow(attacker)
    clock.now += 1.0  # two more
    assert [limit.allow(attacker) for _ in range(3)] == [True, True, False]
    clock.now += 60.0  # refilled to the burst, no further
    assert sum(limit.allow(attacker) for _ in range(10)) == 5


def test_addresses_have_their_own_buckets_and_ports_do_not_matter():
    clock = Clock()
    limit = NewConnectionLimit(rate=1.0, burst=3, clock=clock)
    assert all(limit.allow(("127.0.0.2", port)) for port in (1, 2, 3))
    assert not limit.allow(("127.0.0.2", 4))
    assert all(limit.allow(("127.0.0.1", port)) for port in (1, 2, 3))  # another address: untouched


def test_ipv4_mapped_ipv6_is_the_ipv4_address_and_ipv6_is_keyed_by_its_64():
    assert address_key(("::ffff:192.0.2.7", 1, 0, 0)) == address_key(("192.0.2.7", 2)) == "192.0.2.7"
    same_host = [("2001:db8:1:2::1", 1, 0, 0), ("2001:db8:1:2:ffff:abcd:1234:5678", 2, 0, 0)]
    assert address_key(same_host[0]) == address_key(same_host[1]) == "2001:db8:1:2::/64"
    assert address_key(("2001:db8:1:3::1", 1, 0, 0)) != address_key(same_host[0])
    assert address_key(("::1", 1, 0, 0)) == "::/64"
    assert address_key(("fe80::1%lo", 1, 0, 1)) == "fe80::/64"
    assert address_key("/run/personaplex.sock") == "/run/personaplex.sock"  # not an IP: as given
    for host in ("10.1.2.3", "::ffff:10.1.2.3", "2001:db8::7", "fe80::1"):  # the same as ipaddress says
        ip = ipaddress.ip_address(host)
        if ip.version == 4:
            expected = str(ip)
        elif ip.ipv4_mapped is not None:
            expected = str(ip.ipv4_mapped)
        else:
            expected = str(ipaddress.ip_network(f"{host}/64", strict=False))
        assert address_key((host, 1)) == expected

    clock = Clock()
    limit = NewConnectionLimit(rate=1.0, burst=2, clock=clock)
    assert limit.allow(("::ffff:192.0.2.7", 1, 0, 0)) and limit.allow(("192.0.2.7", 2))
    assert not limit.allow(("::ffff:192.0.2.7", 3, 0, 0))  # one bucket for both spellings
    assert limit.allow(same_host[0]) and limit.allow(same_host[1]) and not limit.allow(same_host[0])


def test_the_table_forgets_refilled_buckets_and_never_exceeds_its_cap():
    clock = Clock()
    limit = NewConnectionLimit(rate=10.0, burst=20, max_addresses=100, clock=clock)
    for host in range(1000):  # address churn: each address once
        limit.allow((str(ipaddress.ip_address(0x0A000000 + host)), 1))
        assert len(limit) <= 100
    assert len(limit) == 100

    # An address that keeps flooding stays in the table (it is the most recently used) while others churn.
    attacker = ("127.0.0.2", 1)
    assert sum(limit.allow(attacker) for _ in range(30)) == 20
    for host in range(500):
        limit.allow((str(ipaddress.ip_address(0x0B000000 + host)), 1))
        assert not limit.allow(attacker)
        assert len(limit) <= 100

    # burst / rate = 2 s untouched: full again, so forgotten at the next connection.
    clock.now += 2.0
    assert limit.allow(("192.0.2.1", 1))
    assert len(limit) == 1
    assert sum(limit.allow(attacker) for _ in range(30)) == 20  # a full burst again, as for a new address


def test_rate_zero_turns_the_limit_off():
    limit = NewConnectionLimit(rate=0.0, burst=1, clock=Clock())
    assert all(limit.allow(("127.0.0.2", port)) for port in range(1000))
    assert len(limit) == 0 and not limit.enabled


@pytest.mark.parametrize("rate, burst", [(-1.0, 5), (1.0, 0)])
def test_bad_settings_are_refused(rate, burst):
    with pytest.raises(ValueError):
        NewConnectionLimit(rate=rate, burst=burst)
