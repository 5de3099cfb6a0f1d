"""``sample:ubuntu24-like`` is laid out as Ubuntu 24.04's cloud image is, seen from the host
without booting it: GPT with partition 1 the root (``cloudimg-rootfs``, at the end), 14 BIOS
boot, 15 the ESP (FAT32 ``UEFI``), 16 ``/boot`` (ext4 ``BOOT``), fstab by LABEL, Ubuntu's release
files, netplan's file for networkd with its mode and no ifupdown, initramfs-tools' initrds and
Ubuntu's kernel links in /boot, and the profile detected from os-release is ``ubuntu``; then
exported for OpenStack and VirtualBox through that profile and booted as a working server."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import yaml

from imaging.disk.files import Guest
from imaging.guest import profiles
from imaging.guest.initrd import list_initrd
from imaging.samples import catalog, layouts, ubuntu

from . import families
from .conftest import Cli, leftovers

# Building the sample is a few minutes of mmdebstrap and update-initramfs (cached afterwards).
pytestmark = pytest.mark.timeout(2400)


def _ubuntu_files(root: Path) -> None:
    etc = root / "etc"
    os_release = dict(re.findall(r'^([A-Z_]+)="?([^"\n]*)"?$', (etc / "os-release").read_text(), re.M))
    assert (os_release["ID"], os_release["ID_LIKE"], os_release["VERSION_ID"]) == (
        "ubuntu",
        "debian",
        "24.04",
    )
    assert os_release["VERSION_CODENAME"] == os_release["UBUNTU_CODENAME"] == "noble"
    assert "DISTRIB_RELEASE=24.04\n" in (etc / "lsb-release").read_text()
    assert (etc / "debian_version").read_text() == "trixie/sid\n"
    fstab = [line.split() for line in (etc / "fstab").read_text().splitlines()]
    assert fstab == [
        ["LABEL=cloudimg-rootfs", "/", "ext4", "discard,commit=30,errors=remount-ro", "0", "1"],
        ["LABEL=BOOT", "/boot", "ext4", "defaults", "0", "2"],
        ["LABEL=UEFI", "/boot/efi", "vfat", "umask=0077", "0", "1"],
    ]
    assert "link_in_boot = yes" in (etc / "kernel-img.conf").read_text()
    cloudimg = (etc / "default" / "grub.d" / "50-cloudimg-settings.cfg").read_text()
    assert 'GRUB_CMDLINE_LINUX_DEFAULT="console=tty1 console=ttyS0"' in cloudimg
    assert re.search(
        r"^ubuntu:x:1000:1000:Ubuntu:/home/ubuntu:/bin/bash$", (etc / "passwd").read_text(), re.M
    )
    assert "ubuntu ALL=(ALL) NOPASSWD:ALL" in (etc / "sudoers.d" / "90-cloud-init-users").read_text()
    assert "name: ubuntu" in (etc / "cloud" / "cloud.cfg").read_text()
    assert (root / "var" / "log" / "auth.log").stat().st_size
    assert (root / "home" / "ubuntu" / "results" / "experiment-7.csv").stat().st_uid == 1000


def _netplan(root: Path) -> None:
    """cloud-init's netplan file, MAC-pinned, only for root; networkd on; no ifupdown."""
    path = root / ubuntu.NETPLAN_PATH.lstrip("/")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == 0
    eth0 = yaml.safe_load(path.read_text())["network"]["ethernets"]["eth0"]
    assert eth0 == {"dhcp4": True, "match": {"macaddress": ubuntu.MAC}, "set-name": "eth0"}
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    assert (wants / "systemd-networkd.service").is_symlink()
    assert not (root / "etc" / "network" / "interfaces").exists()


def _boot(boot: Path) -> list[str]:
    """The BOOT filesystem: both kernels, initramfs-tools' initrds, Ubuntu's links, GRUB's menu."""
    versions = sorted(p.name.removeprefix("vmlinuz-") for p in boot.glob("vmlinuz-*"))
    assert len(versions) == 2 and any(v.endswith("-cloud-amd64") for v in versions), versions
    cloud, generic = sorted(versions, key=lambda v: not v.endswith("-cloud-amd64"))
    # The generic kernel installed first, then the cloud one: the links name the latter.
    assert {link: os.readlink(boot / link) for link in ("vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old")} == {
        "vmlinuz": f"vmlinuz-{cloud}",
        "vmlinuz.old": f"vmlinuz-{generic}",
        "initrd.img": f"initrd.img-{cloud}",
        "initrd.img.old": f"initrd.img-{generic}",
    }  # fmt: skip
    for version in versions:
        with open(boot / f"initrd.img-{version}", "rb") as f:
            names = list_initrd(f)
        # initramfs-tools' own layout (its scripts), not dracut's.
        assert "scripts/local" in names and "usr/lib/dracut/modules.txt" not in names, names[:20]
    grub = (boot / "grub" / "grub.cfg").read_text()
    assert f"linux\t/vmlinuz-{cloud} root=PARTUUID={ubuntu.ROOT_PARTUUID} ro" in grub
    assert (boot / "efi").is_dir() and not list((boot / "efi").iterdir())
    return versions


def test_ubuntu24_like_sample_is_laid_out_as_the_noble_cloud_image() -> None:
    disk = catalog.ensure_sample(ubuntu.NAME)
    parts = families.gpt(disk)
    assert sorted(parts) == [1, 14, 15, 16]
    assert (parts[14]["start"], parts[14]["size"], parts[14]["type"]) == (2048, 8192, layouts.BIOS_BOOT)
    assert (parts[15]["start"], parts[15]["type"]) == (10240, ubuntu.ESP_TYPE)
    assert (parts[16]["start"], parts[16]["type"]) == (227328, ubuntu.XBOOTLDR)
    assert (parts[1]["start"], parts[1]["type"], parts[1]["uuid"].lower()) == (
        2099200, layouts.LINUX_FS, ubuntu.ROOT_PARTUUID,
    )  # fmt: skip
    assert parts[1]["start"] > max(p["start"] for n, p in parts.items() if n != 1)  # the root last
    esp = families.blkid(disk, parts[15]["start"] * 512)
    assert (esp["TYPE"], esp["LABEL"], esp["VERSION"]) == ("vfat", "UEFI", "FAT32")
    boot_probe = families.blkid(disk, parts[16]["start"] * 512)
    assert (boot_probe["TYPE"], boot_probe["LABEL"], boot_probe["UUID"]) == (
        "ext4",
        "BOOT",
        ubuntu.BOOT_UUID,
    )
    start, size = parts[1]["start"] * 512, parts[1]["size"] * 512
    probe = families.blkid(disk, start)
    assert (probe["TYPE"], probe["LABEL"], probe["UUID"]) == ("ext4", "cloudimg-rootfs", ubuntu.ROOT_UUID)
    boot_start, boot_size = parts[16]["start"] * 512, parts[16]["size"] * 512
    with layouts.loop(disk, boot_start, boot_size, read_only=True) as dev, layouts.mounted(dev, "ro") as mnt:
        versions = _boot(mnt)
    with layouts.loop(disk, start, size, read_only=True) as dev, layouts.mounted(dev, "ro") as mnt:
        # The root's /boot is the BOOT filesystem's mount point, and there are no links in /.
        assert not list((mnt / "boot").iterdir()) and not (mnt / "vmlinuz").exists()
        _ubuntu_files(mnt)
        _netplan(mnt)
        installed = families.installed(mnt)
        assert {"initramfs-tools", "netplan.io", "systemd-resolved", "linux-image-amd64",
                "linux-image-cloud-amd64"} <= installed  # fmt: skip
        assert not {"dracut", "ifupdown", "isc-dhcp-client", "network-manager"} & installed
        check = (mnt / "usr" / "local" / "sbin" / "imaging-sample-check").read_text()
        assert "/home/ubuntu/.ssh" in check and "10-netplan-eth0.network" in check
        # What 10-clean and 20-migrate will take it for: the ubuntu profile, by os-release.
        with Guest(mnt) as guest:  # closed before the unmount: its fd would keep it busy
            detected = profiles.detect(guest)
        assert detected.profile.name == "ubuntu" and not detected.assumed, detected
        assert detected.profile.initrd is not None
        assert detected.profile.initrd.image.format(version=versions[0]) == f"/boot/initrd.img-{versions[0]}"
    families.not_attached(disk)


@pytest.mark.parametrize(("fmt", "target"), families.BOOTS, ids=[b[0] for b in families.BOOTS])
def test_an_ubuntu_like_instance_boots_as_a_working_server(
    cli: Cli, tmp_path: Path, fmt: str, target: str
) -> None:
    # Found the root among four partitions, merged /boot (by LABEL) into it, left the ESP;
    # detected as ubuntu; the netplan file un-pinned; the initrd rebuilt by its own
    # update-initramfs; the guest's own check (secrets gone, data intact, eth0 by networkd from
    # netplan, /boot on the root, Ubuntu's links, sshd, no failed unit) passing inside.
    # The qcow2 boots UEFI with Secure Boot through the guest's own shim-signed and
    # grub-efi-amd64-signed, the source's ESP kept (its volume id, which fstab now names by UUID).
    firmware = "uefi" if fmt == "qcow2" else "bios"
    ws = families.export_and_boot(cli, tmp_path, ubuntu.NAME, fmt, target, "ubuntu", firmware)
    acquired = ws.result("00-acquire")
    assert (acquired["partition"], acquired["label"]) == (1, "cloudimg-rootfs")
    assert [m.split(":")[0] for m in acquired["merged"]] == ["/boot"] and "partition 16" in acquired[
        "merged"
    ][0]
    migrated = ws.result("20-migrate")
    assert migrated["initrd"].startswith("/boot/initrd.img-")
    changes = {c["path"]: c["diff"] for c in migrated["changes"]}
    assert "+# merged into the root filesystem (imaging, 00-acquire): LABEL=BOOT" in changes["/etc/fstab"]
    if firmware == "uefi":
        esp = ws.result("00-acquire")["esp"]
        assert f"\n+UUID={esp['uuid']} /boot/efi vfat umask=0077 0 1" in changes["/etc/fstab"]
        assert ws.result("30-bootable")["grub"]["esp"]["kept_from_source"] == esp["files"]
        assert ws.result("50-verify")["secure_boot"] == "Secure boot enabled"
        assert (
            migrated["firmware"]["shim"] == "/usr/lib/shim/shimx64.efi.signed"
            and not migrated["firmware"]["packages"]
        )
    else:
        assert re.search(
            r"^\+# not on the \S+ target \(imaging, 20-migrate\): LABEL=UEFI", changes["/etc/fstab"], re.M
        )
    assert "\n LABEL=cloudimg-rootfs\t/" in changes["/etc/fstab"]  # the root's line kept as it was
    cleaned = ws.result("10-clean")
    assert any(a["path"] == ubuntu.NETPLAN_PATH and a["op"] == "net-hwaddr" for a in cleaned["actions"])
    assert leftovers(tmp_path) == []
