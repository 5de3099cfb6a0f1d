"""The first boot on the target: what the guest is set up to do, and what cleaning and migration
give it so that it does it (host keys, machine-id, NIC names, MAC-free network configuration)."""

from __future__ import annotations

import os
from pathlib import Path

from imaging.disk.files import Guest
from imaging.guest import clean_ops, firstboot
from imaging.guest.clean_ops import Context
from imaging.guest.profiles import load_profile


def _tree(root: Path, files: dict[str, str], links: dict[str, str] | None = None) -> Path:
    for path, text in files.items():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_text(text)
    for path, target in (links or {}).items():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / path.lstrip("/"))
    return root


DEBIAN = {
    "/usr/lib/systemd/systemd": "",
    "/usr/sbin/sshd": "",
    "/usr/bin/ssh-keygen": "",
    "/lib/udev/rules.d/80-net-setup-link.rules": "",
    "/etc/network/interfaces": "source /etc/network/interfaces.d/*\nauto lo\niface lo inet loopback\n",
    "/etc/network/interfaces.d/50-cloud-init": "auto eth0\niface eth0 inet dhcp\niface eth1 inet dhcp\n",
    "/etc/machine-id": "0c10ad5eed0000000000000000000001\n",
    "/etc/ssh/ssh_host_ed25519_key.pub": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMrbQXl6cbD1Zxt0zUeo0Kfp3vOWq/fM8wqRgkE0qmGn root@i-1\n",
}
DEBIAN_LINKS = {
    "/sbin/init": "../usr/lib/systemd/systemd",
    "/etc/systemd/system/multi-user.target.wants/ssh.service": "/lib/systemd/system/ssh.service",
    "/var/lib/dbus/machine-id": "/etc/machine-id",
}


def test_a_debian_cloud_instance_is_read_as_its_first_boot_will_go(tmp_path: Path) -> None:
    with Guest(_tree(tmp_path, DEBIAN, DEBIAN_LINKS)) as g:
        found = firstboot.facts(g)
        # eth1 has no auto/allow-hotplug line: ifup -a leaves it alone.
        assert (found.systemd, found.sshd, found.dhcp, found.eth_names) == (
            True,
            True,
            ["eth0"],
            ["eth0", "eth1"],
        )
        assert firstboot.kernel_args(found) == ["net.ifnames=0", "biosdevname=0"]
        unit = firstboot.ssh_keygen_unit(g, found, load_profile("debian").ssh_host_keys)
        assert unit and "ExecStart=/usr/bin/ssh-keygen -A" in unit and "Before=ssh.service" in unit
        assert "ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key" in unit
        assert firstboot.ssh_keygen_unit(g, found, "distro") is None
        assert firstboot.host_key_fingerprints(g) == ["SHA256:2822ao03s8R5m/K55HdqP0EFq6MVHaq+eelkhiUJi10"]


def test_other_network_configurations_are_read_too(tmp_path: Path) -> None:
    files = {
        "/etc/sysconfig/network-scripts/ifcfg-eth0": "DEVICE=eth0\nBOOTPROTO=dhcp\nONBOOT=yes\n",
        "/etc/sysconfig/network-scripts/ifcfg-eth1": "DEVICE=eth1\nBOOTPROTO=dhcp\nONBOOT=no\n",
        "/etc/netplan/50-cloud-init.yaml": "network:\n  version: 2\n  ethernets:\n    ens5:\n      dhcp4: true\n",
        "/etc/systemd/network/10-en.network": "[Match]\nName=enp0s3\n[Network]\nDHCP=ipv4\n",
        "/etc/NetworkManager/system-connections/w.nmconnection": "[connection]\ninterface-name=em1\n[ipv4]\nmethod=manual\n",
        "/etc/netplan/99-bad.yaml": "network: [unclosed\n",
    }
    with Guest(_tree(tmp_path, files)) as g:
        found = firstboot.facts(g)
    assert found.dhcp == ["enp0s3", "ens5", "eth0"] and not found.sshd and not found.systemd
    assert firstboot.kernel_args(found) == []  # no udev predictable names in this guest


def _ctx(g: Guest) -> Context:
    return Context(g, load_profile("debian"), [], [])


AL2023 = {
    "/usr/lib/systemd/systemd": "",
    "/usr/lib/udev/rules.d/80-net-setup-link.rules": "",
    "/usr/lib/systemd/network/80-ec2.network": "[Match]\nDriver=ena ixgbevf vif\n\n[Link]\nMTUBytes=9001\n\n"
    "[Network]\nDHCP=yes\n",
    "/usr/lib/systemd/network/80-container-host0.network": "[Match]\nVirtualization=container\nName=host0\n\n"
    "[Network]\nDHCP=yes\n",
}
AL2023_LINKS = {
    "/sbin/init": "../usr/lib/systemd/systemd",
    "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service": "/usr/lib/systemd/system/systemd-networkd.service",
}


def test_networkd_configured_for_the_clouds_nics_only_gets_eth0_for_the_targets(tmp_path: Path) -> None:
    # Amazon Linux 2023: amazon-ec2-net-utils' 80-ec2.network is all; no NIC of KVM's matches it.
    with Guest(_tree(tmp_path, AL2023, AL2023_LINKS)) as g:
        found = firstboot.facts(g, "virtio_net")
        assert (found.dhcp, found.eth_names) == (["eth0"], ["eth0"])
        assert "Name=eth0" in found.networkd_eth0 and "DHCP=yes" in found.networkd_eth0
        assert "ena ixgbevf vif" in found.networkd_eth0 and "virtio_net" in found.networkd_eth0
        assert firstboot.kernel_args(found) == ["net.ifnames=0", "biosdevname=0"]
        # On EC2 its own file matches the NIC; with no target named nothing is assumed.
        for nic in ("ena", ""):
            assert firstboot.facts(g, nic).networkd_eth0 == "" and firstboot.facts(g, nic).dhcp == []
    # A configuration of ours (or the user's) naming eth0 masks the need; so does networkd disabled.
    with Guest(_tree(tmp_path / "b", {**AL2023, firstboot.NETWORKD_ETH0: "[Match]\nName=eth0\n[Network]\nDHCP=yes\n"},
                     AL2023_LINKS)) as g:  # fmt: skip
        found = firstboot.facts(g, "e1000")
        assert (found.networkd_eth0, found.dhcp) == ("", ["eth0"])
    with Guest(_tree(tmp_path / "c", AL2023, {"/sbin/init": "../usr/lib/systemd/systemd"})) as g:
        assert firstboot.facts(g, "e1000").networkd_eth0 == ""


def test_machine_id_becomes_uninitialized_for_systemd_and_empty_otherwise(tmp_path: Path) -> None:
    with Guest(_tree(tmp_path / "debian", DEBIAN, DEBIAN_LINKS)) as g:
        actions = clean_ops.machine_id(_ctx(g))
    # systemd makes a new id (and runs first-boot units) only from "uninitialized"; D-Bus's
    # link to it follows.
    assert [(a.path, a.action, a.new_text) for a in actions] == [
        ("/etc/machine-id", "edit", "uninitialized\n")
    ]
    old = {"/etc/machine-id": "abc\n", "/var/lib/dbus/machine-id": "abc\n"}
    with Guest(_tree(tmp_path / "old", old)) as g:
        actions = clean_ops.machine_id(_ctx(g))
    assert [(a.path, a.action) for a in actions] == [
        ("/etc/machine-id", "truncate"),
        ("/var/lib/dbus/machine-id", "remove"),
    ]


def test_random_seeds_and_networkmanagers_secret_key_go(tmp_path: Path) -> None:
    files = {"/var/lib/systemd/random-seed": "x" * 512, "/var/lib/NetworkManager/secret_key": "k" * 32,
             "/var/lib/NetworkManager/NetworkManager.state": "[main]\nNetworkingEnabled=true\n"}  # fmt: skip
    with Guest(_tree(tmp_path, files)) as g:
        actions = clean_ops.random_seed(_ctx(g))
    assert sorted(a.path for a in actions) == [
        "/var/lib/NetworkManager/secret_key",
        "/var/lib/systemd/random-seed",
    ]


def test_network_configurations_lose_their_mac_addresses(tmp_path: Path) -> None:
    netplan = (
        "network:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp4: true\n      match:\n"
        "        macaddress: 06:aa:bb:cc:dd:ee\n      set-name: eth0\n"
    )
    files = {
        "/etc/netplan/50-cloud-init.yaml": netplan,
        "/etc/systemd/network/10-eth0.network": "[Match]\nMACAddress=06:aa:bb:cc:dd:ee\nName=eth0\n[Network]\nDHCP=yes\n",
        "/etc/NetworkManager/system-connections/eth0.nmconnection": "[ethernet]\nmac-address=06:AA:BB:CC:DD:EE\ncloned-mac-address=preserve\n",
        "/etc/sysconfig/network-scripts/ifcfg-eth0": "DEVICE=eth0\nHWADDR=06:aa:bb:cc:dd:ee\nONBOOT=yes\n",
    }
    with Guest(_tree(tmp_path, files)) as g:
        edited = {a.path: a.new_text for a in clean_ops.net_hwaddr(_ctx(g))}
    # The one pinned NIC is any Ethernet NIC now, renamed to its old name.
    assert edited["/etc/netplan/50-cloud-init.yaml"] == netplan.replace(
        "macaddress: 06:aa:bb:cc:dd:ee", 'name: "e*"'
    )
    assert edited["/etc/systemd/network/10-eth0.network"] == "[Match]\nName=eth0\n[Network]\nDHCP=yes\n"
    assert (
        edited["/etc/NetworkManager/system-connections/eth0.nmconnection"]
        == "[ethernet]\ncloned-mac-address=preserve\n"
    )
    assert edited["/etc/sysconfig/network-scripts/ifcfg-eth0"] == "DEVICE=eth0\nONBOOT=yes\n"


def test_several_pinned_netplan_interfaces_are_each_found_by_name(tmp_path: Path) -> None:
    two = "".join(
        f"    {n}:\n      dhcp4: true\n      match:\n        macaddress: 06:aa:bb:cc:dd:0{i}\n      set-name: {n}\n"
        for i, n in enumerate(["ens3", "ens4"])
    )
    files = {"/etc/netplan/50-cloud-init.yaml": f"network:\n  version: 2\n  ethernets:\n{two}"}
    with Guest(_tree(tmp_path, files)) as g:
        (action,) = clean_ops.net_hwaddr(_ctx(g))
    assert action.new_text == (
        "network:\n  version: 2\n  ethernets:\n    ens3:\n      dhcp4: true\n    ens4:\n      dhcp4: true\n"
    )


def test_dhcp_leases_go(tmp_path: Path) -> None:
    files = {"/var/lib/dhcp/dhclient.eth0.leases": "lease { fixed-address 10.31.7.19; }\n"}
    with Guest(_tree(tmp_path, files)) as g:
        assert [a.path for a in clean_ops.dhcp_client_state(_ctx(g))] == [
            "/var/lib/dhcp/dhclient.eth0.leases"
        ]
