"""Which hosts and addresses a package install may reach (the sandbox's proxy)."""

from __future__ import annotations

import ipaddress

import pytest

from imaging.guest.mirrors import MirrorProxy, forbidden


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.3.2.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("169.254.169.254", "a link-local address (the cloud's metadata service lives there)"),
        ("fe80::1", "a link-local address (the cloud's metadata service lives there)"),
        ("0.0.0.0", "not a host's address"),
        ("224.0.0.1", "not a host's address"),
        ("10.1.2.3", "this host's own address"),
        ("151.101.2.132", ""),
        ("10.9.9.9", ""),  # a site mirror on the LAN is fine, when the site lists it
    ],
)
def test_addresses_that_lead_back_to_the_host_are_forbidden(address: str, why: str) -> None:
    assert forbidden(address, {ipaddress.ip_address("10.1.2.3")}) == why


def test_only_listed_hosts_are_mirrors() -> None:
    proxy = MirrorProxy(["deb.debian.org", "*.archive.ubuntu.com"])
    assert proxy.allowed("deb.debian.org") and proxy.allowed("DEB.debian.org.")
    assert proxy.allowed("us-east-1.ec2.archive.ubuntu.com")
    assert not proxy.allowed("archive.ubuntu.com") and not proxy.allowed("deb.debian.org.evil.example")
    assert not proxy.allowed("evil.example/deb.debian.org") and not proxy.allowed("")
