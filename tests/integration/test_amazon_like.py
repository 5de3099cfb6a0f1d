"""``sample:amazon2023-like`` is laid out as an Amazon Linux 2023 AMI's disk is, seen from the host
without booting it: GPT with the root XFS as partition 1 after the BIOS boot partition 127 and
the EFI system partition 128 (FAT), AL2023's release files and no Debian or Red Hat ones, GRUB
2's and the BLS files, dracut's generic initrd at RHEL's name (listed with imaging's own reader),
no initramfs-tools, systemd-networkd enabled with amazon-ec2-net-utils' configuration only, and
the profile detected from os-release is ``amazon``; then exported for OpenStack and VirtualBox
through that profile (which configures eth0 for the target's NIC) and booted as a working
server."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from imaging.disk.files import Guest
from imaging.guest import firstboot, profiles
from imaging.guest.initrd import initrd_modules, list_initrd
from imaging.samples import amazon, catalog, debian, layouts, rhel

from . import families
from .conftest import Cli, leftovers

# Building the sample is minutes of mmdebstrap and dracut (cached afterwards).
pytestmark = pytest.mark.timeout(2400)


def _amazon_files(root: Path) -> None:
    etc = root / "etc"
    os_release = dict(re.findall(r'^([A-Z_]+)="?([^"\n]*)"?$', (etc / "os-release").read_text(), re.M))
    ids = ("ID", "VERSION_ID", "ID_LIKE", "PLATFORM_ID")
    assert [os_release[k] for k in ids] == ["amzn", "2023", "fedora", "platform:al2023"]
    assert os_release["PRETTY_NAME"].startswith("Amazon Linux 2023.")
    assert (etc / "system-release").is_symlink() and (etc / "system-release").read_text() == amazon.RELEASE
    assert (etc / "amazon-linux-release").read_text().startswith("Amazon Linux release 2023.")
    assert (etc / "system-release-cpe").read_text() == "cpe:2.3:o:amazon:amazon_linux:2023\n"
    assert not (etc / "debian_version").exists() and not (etc / "redhat-release").exists()
    assert re.search(r"^SELINUX=permissive$", (etc / "selinux" / "config").read_text(), re.M)
    grub = (etc / "default" / "grub").read_text()
    assert "nvme_core.io_timeout=4294967295 rd.emergency=poweroff" in grub and "net.ifnames" not in grub
    fstab = (etc / "fstab").read_text()
    assert re.search(rf"^UUID={amazon.ROOT_UUID} +/ +xfs +defaults,noatime +1 +1$", fstab, re.M)
    esp = rf"^UUID={amazon.ESP_UUID} +/boot/efi +vfat +\S*x-systemd.automount +0 +2$"
    assert re.search(esp, fstab, re.M)
    assert re.search(r"^ec2-user:x:1000:1000:", (etc / "passwd").read_text(), re.M)
    # The journal is the only log: no syslog files of the instance's.
    assert not [
        name for name in ("secure", "auth.log", "messages") if (root / "var" / "log" / name).exists()
    ]
    assert "Accepted publickey for ec2-user" in (root / amazon.INSTANCE.auth_log.lstrip("/")).read_text()


def _network(root: Path) -> None:
    """systemd-networkd enabled with EC2's configuration only, resolved the resolver."""
    ec2 = (root / amazon.EC2_NETWORK_PATH.lstrip("/")).read_text()
    assert ec2.startswith("[Match]\nDriver=ena ixgbevf vif\n")
    assert not list((root / "etc" / "systemd" / "network").glob("*.network"))
    units = root / "etc" / "systemd" / "system"
    assert (units / "multi-user.target.wants" / "systemd-networkd.service").is_symlink()
    assert (units / "sysinit.target.wants" / "systemd-resolved.service").is_symlink()
    assert "stub-resolv.conf" in str((root / "etc" / "resolv.conf").readlink())
    # (cloud-init's NetworkManager dispatcher hook is there, as in AL2023's cloud-init; no keyfiles.)
    assert not (root / "etc" / "NetworkManager" / "system-connections").exists()
    assert not (root / "etc" / "network" / "interfaces").exists()


def _boot(root: Path) -> str:
    """GRUB 2's files, the kernel's BLS entry, dracut's generic initrd at RHEL's name."""
    boot = root / "boot"
    (version,) = rhel.kernel_versions(root)
    assert "blscfg" in (boot / "grub2" / "grub.cfg").read_text()
    assert amazon.ROOT_UUID in (boot / "grub2" / "grub.cfg").read_text()
    grubenv = (boot / "grub2" / "grubenv").read_bytes()
    assert len(grubenv) == 1024 and f"saved_entry={debian.MACHINE_ID}-{version}".encode() in grubenv
    assert not list(boot.glob("initrd.img-*")) and not (root / "initrd.img").exists()
    assert not (root / "vmlinuz").exists()
    entry = (boot / "loader" / "entries" / f"{debian.MACHINE_ID}-{version}.conf").read_text()
    assert f"\ninitrd /boot/initramfs-{version}.img\n" in entry and "\ngrub_class amzn\n" in entry
    assert re.search(rf"^options root=UUID={amazon.ROOT_UUID} ro .*rd.emergency=poweroff.*$", entry, re.M)
    with open(boot / f"initramfs-{version}.img", "rb") as f:
        names = list_initrd(f)
    # dracut's own record of what it put in; generic: every target's drivers, and XFS.
    assert "usr/lib/dracut/modules.txt" in names, names[:20]
    assert {"xfs", "virtio_blk", "nvme", "ahci"} <= set(initrd_modules(names))
    return version


def test_amazon2023_like_sample_is_laid_out_as_an_al2023_ami() -> None:
    disk = catalog.ensure_sample(amazon.NAME)
    table: dict[str, Any] = json.loads(families.out("sfdisk", "--json", disk))["partitiontable"]
    assert table["label"] == "gpt"
    parts = {int(re.sub(r".*?(\d+)$", r"\1", p["node"])): p for p in table["partitions"]}
    assert sorted(parts) == [1, 127, 128]
    assert (parts[127]["start"], parts[127]["size"], parts[127]["type"]) == (2048, 2048, layouts.BIOS_BOOT)
    assert (parts[128]["start"], parts[128]["size"], parts[128]["type"]) == (4096, 20480, amazon.EFI_SYSTEM)
    assert (parts[1]["start"], parts[1]["type"]) == (24576, layouts.LINUX_FS)
    esp = families.blkid(disk, 4096 * 512)
    assert (esp["TYPE"], esp["UUID"]) == ("vfat", amazon.ESP_UUID)
    start, size = parts[1]["start"] * 512, parts[1]["size"] * 512
    probe = families.blkid(disk, start)
    assert (probe["TYPE"], probe["LABEL"], probe["UUID"]) == ("xfs", "/", amazon.ROOT_UUID)
    with layouts.loop(disk, start, size, read_only=True) as dev:
        assert "= V5," in families.out("xfs_db", "-r", "-c", "sb 0", "-c", "version", dev)
        with layouts.mounted(dev, "ro,nouuid") as mnt:
            _amazon_files(mnt)
            _network(mnt)
            version = _boot(mnt)
            installed = families.installed(mnt)
            assert {"dracut", "xfsprogs", "linux-image-amd64", "systemd-resolved"} <= installed
            # (isc-dhcp-client is there: Debian's cloud-init needs it; nothing runs it at boot.)
            assert not {"initramfs-tools", "initramfs-tools-core", "ifupdown", "network-manager",
                        "linux-image-cloud-amd64", "rsyslog"} & installed  # fmt: skip
            check = (mnt / "usr" / "local" / "sbin" / "imaging-sample-check").read_text()
            assert (
                "/home/ec2-user/.ssh" in check and "networkctl" in check and "Freeing initrd memory" in check
            )
            assert (mnt / "home" / "ec2-user" / "results" / "experiment-7.csv").stat().st_uid == 1000
            # What 10-clean and 20-migrate will take it for: the amazon profile, by os-release;
            # eth0 configured for a KVM or VirtualBox NIC, not for EC2's (its own file does).
            with Guest(mnt) as guest:  # closed before the unmount: its fd would keep it busy
                detected = profiles.detect(guest)
                facts = {nic: firstboot.facts(guest, nic) for nic in ("virtio_net", "e1000", "ena")}
            assert detected.profile.name == "amazon" and not detected.assumed, detected
            assert detected.profile.initrd is not None
            assert detected.profile.initrd.image.format(version=version) == f"/boot/initramfs-{version}.img"
            assert facts["virtio_net"].networkd_eth0 and facts["e1000"].networkd_eth0
            assert facts["virtio_net"].dhcp == ["eth0"] and facts["ena"].networkd_eth0 == ""
    families.not_attached(disk)


# The qcow2 only: the VirtualBox path (the generic kernel chosen for AHCI and e1000) is booted
# for the RHEL- and Ubuntu-like guests and four Debian ones; each OVA here is 2-3 minutes of TCG.
@pytest.mark.parametrize(("fmt", "target"), families.BOOTS[:1], ids=[b[0] for b in families.BOOTS[:1]])
def test_an_al2023_like_instance_boots_as_a_working_server(
    cli: Cli, tmp_path: Path, fmt: str, target: str
) -> None:
    # Detected as amazon from its os-release; eth0 configured for the target's NIC (networkd's
    # own file matches EC2's only); the initrd rebuilt by its own dracut in the sandbox; the ESP
    # left behind, its fstab entry commented out; the guest's own check (secrets gone, data
    # intact, eth0 by networkd, resolved, sshd, no failed unit, dracut's initrd, XFS)
    # passing inside. Nothing installed: the one kernel has every target's drivers.
    # The qcow2 boots UEFI with Secure Boot through the chain shim-x64 and grub2-efi-x64 left on
    # the source's ESP (EFI/amzn/), found there, checked against Microsoft's keys, kept with the
    # ESP's other files and its volume id (fstab's automounted /boot/efi line stays as it was).
    firmware = "uefi" if fmt == "qcow2" else "bios"
    ws = families.export_and_boot(cli, tmp_path, amazon.NAME, fmt, target, "amazon", firmware)
    if firmware == "uefi":
        chosen, grub = ws.result("20-migrate")["firmware"], ws.result("30-bootable")["grub"]
        assert chosen["platforms"] == ["uefi"] and chosen["secure_boot"] and not chosen["packages"]
        assert chosen["shim"] == "/boot/efi/EFI/amzn/shimx64.efi" and chosen["esp_uuid"] == amazon.ESP_UUID
        assert grub["uefi"].startswith("the guest's shim") and grub["esp"]["kept_from_source"] == 4
        verified = ws.result("50-verify")
        assert (verified["firmware"], verified["secure_boot"]) == ("uefi", "Secure boot enabled")
    assert ws.result("00-acquire")["fs_type"] == "xfs"
    migrated = ws.result("20-migrate")
    assert migrated["initrd"].startswith("/boot/initramfs-")
    assert migrated["first_boot"]["dhcp"] == ["eth0"] and "net.ifnames=0" in migrated["kernel_args"]
    assert "dracut" in (ws.root / "verify" / "serial.log").read_text(errors="replace")
    assert leftovers(tmp_path) == []
