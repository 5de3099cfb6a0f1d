"""``sample:rocky9-like`` is laid out as Rocky Linux 9's GenericCloud image is, seen from the host
without booting it: GPT with a BIOS boot partition, an XFS v5 root, RHEL's release files,
GRUB 2's and the BLS files, dracut's initrds at RHEL's name (listed with imaging's own reader,
the host need not have dracut), no initramfs-tools, NetworkManager's keyfile with its mode, and
the profile detected from os-release is ``rhel``; then exported for OpenStack and VirtualBox
through that profile and booted as a working server."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from imaging.disk.files import Guest
from imaging.guest import profiles
from imaging.guest.initrd import initrd_modules, list_initrd
from imaging.samples import catalog, debian, layouts, packages, rhel

from . import families
from .conftest import Cli, leftovers
from .kernel_update import update_kernel

# Building the sample is several minutes of mmdebstrap and dracut (cached afterwards).
pytestmark = pytest.mark.timeout(2400)


def _rhel_files(root: Path) -> None:
    etc = root / "etc"
    os_release = dict(re.findall(r'^([A-Z_]+)="?([^"\n]*)"?$', (etc / "os-release").read_text(), re.M))
    assert (os_release["ID"], os_release["VERSION_ID"], os_release["PLATFORM_ID"]) == (
        "rocky",
        "9.4",
        "platform:el9",
    )
    assert os_release["ID_LIKE"] == "rhel centos fedora"
    assert (etc / "redhat-release").read_text() == "Rocky Linux release 9.4 (Blue Onyx)\n"
    assert (etc / "system-release").is_symlink() and (etc / "system-release").read_text() == rhel.RELEASE
    assert not (etc / "debian_version").exists()
    selinux = (etc / "selinux" / "config").read_text()
    assert re.search(r"^SELINUX=enforcing$", selinux, re.M) and re.search(
        r"^SELINUXTYPE=targeted$", selinux, re.M
    )
    assert "console=ttyS0,115200n8" in (etc / "default" / "grub").read_text()
    assert "GRUB_ENABLE_BLSCFG=true" in (etc / "default" / "grub").read_text()
    assert "DEFAULTKERNEL=kernel-core" in (etc / "sysconfig" / "kernel").read_text()
    assert re.search(rf"^UUID={rhel.ROOT_UUID} +/ +xfs +defaults +0 0$", (etc / "fstab").read_text(), re.M)
    assert "Created by anaconda" in (etc / "fstab").read_text()
    assert re.search(r"^rocky:x:1000:1000:", (etc / "passwd").read_text(), re.M)


def _boot(root: Path) -> list[str]:
    """GRUB 2's files, a BLS entry per kernel, each kernel's initrd dracut's at RHEL's name."""
    boot = root / "boot"
    versions = rhel.kernel_versions(root)
    assert len(versions) == 2 and any(v.endswith("-cloud-amd64") for v in versions), versions
    assert "blscfg" in (boot / "grub2" / "grub.cfg").read_text()
    grubenv = (boot / "grub2" / "grubenv").read_bytes()
    assert len(grubenv) == 1024 and f"saved_entry={debian.MACHINE_ID}-{versions[-1]}".encode() in grubenv
    assert not list(boot.glob("initrd.img-*")) and not (root / "initrd.img").exists()
    for version in versions:
        entry = (boot / "loader" / "entries" / f"{debian.MACHINE_ID}-{version}.conf").read_text()
        assert f"\nlinux /boot/vmlinuz-{version}\n" in entry
        assert f"\ninitrd /boot/initramfs-{version}.img $tuned_initrd\n" in entry
        assert re.search(rf"^options root=UUID={rhel.ROOT_UUID} ro .*console=ttyS0,115200n8.* \$tuned_params$",
                         entry, re.M)  # fmt: skip
        with open(boot / f"initramfs-{version}.img", "rb") as f:
            names = list_initrd(f)
        # dracut's own record of what it put in; the XFS driver the root needs, and virtio's.
        assert "usr/lib/dracut/modules.txt" in names, names[:20]
        assert {"xfs", "virtio_blk"} <= set(initrd_modules(names))
    return versions


def test_rocky9_like_sample_is_laid_out_as_rocky_9_generic_cloud() -> None:
    disk = catalog.ensure_sample(rhel.NAME)
    table: dict[str, Any] = json.loads(families.out("sfdisk", "--json", disk))["partitiontable"]
    assert table["label"] == "gpt"
    bios, root = table["partitions"]
    assert (bios["start"], bios["size"], bios["type"]) == (2048, 2048, layouts.BIOS_BOOT)
    assert (root["start"], root["type"]) == (4096, layouts.LINUX_FS)
    start, size = root["start"] * 512, root["size"] * 512
    probe = families.blkid(disk, start)
    assert (probe["TYPE"], probe["LABEL"], probe["UUID"]) == ("xfs", "root", rhel.ROOT_UUID)
    with layouts.loop(disk, start, size, read_only=True) as dev:
        assert "= V5," in families.out("xfs_db", "-r", "-c", "sb 0", "-c", "version", dev)
        with layouts.mounted(dev, "ro,nouuid") as mnt:
            _rhel_files(mnt)
            versions = _boot(mnt)
            installed = families.installed(mnt)
            assert {
                "dracut",
                "network-manager",
                "xfsprogs",
                "linux-image-amd64",
                "linux-image-cloud-amd64",
            } <= installed
            assert not {"initramfs-tools", "initramfs-tools-core", "ifupdown"} & installed
            assert not (mnt / "usr" / "sbin" / "update-initramfs").exists()
            keyfile = mnt / rhel.NM_KEYFILE_PATH.lstrip("/")
            assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600 and keyfile.stat().st_uid == 0
            text = keyfile.read_text()
            assert "\ninterface-name=eth0\n" in text and "[ipv4]\nmethod=auto\n" in text
            check = (mnt / "usr" / "local" / "sbin" / "imaging-sample-check").read_text()
            assert (
                "/home/rocky/.ssh" in check
                and "/var/log/secure" in check
                and "Freeing initrd memory" in check
            )
            assert (mnt / "home" / "rocky" / "results" / "experiment-7.csv").stat().st_uid == 1000
            # What 10-clean and 20-migrate will take it for: the rhel profile, by os-release.
            with Guest(mnt) as guest:  # closed before the unmount: its fd would keep it busy
                detected = profiles.detect(guest)
            assert detected.profile.name == "rhel" and not detected.assumed, detected
            assert detected.profile.initrd is not None
            assert (
                detected.profile.initrd.image.format(version=versions[0])
                == f"/boot/initramfs-{versions[0]}.img"
            )
    families.not_attached(disk)


@pytest.mark.parametrize(("fmt", "target"), families.BOOTS, ids=[b[0] for b in families.BOOTS])
def test_a_rhel_like_instance_boots_as_a_working_server(
    cli: Cli, tmp_path: Path, fmt: str, target: str
) -> None:
    # Detected as rhel from its os-release; its initrd rebuilt by its own dracut in the sandbox;
    # the guest's own check (secrets gone, data intact, eth0 by NetworkManager, sshd, no failed
    # unit, dracut's initrd, XFS) passing inside. Nothing installed: the generic kernel is there.
    ws = families.export_and_boot(cli, tmp_path, rhel.NAME, fmt, target, "rhel")
    migrated = ws.result("20-migrate")
    assert migrated["initrd"].startswith("/boot/initramfs-")
    assert "dracut" in (ws.root / "verify" / "serial.log").read_text(errors="replace")
    if target == "openstack":
        # Its next kernel update boots. RHEL's kernel tools keep no link, so 20-migrate installed
        # the hook that keeps /boot/vmlinuz; here the guest's dpkg runs it from postinst.d after
        # the guest's dracut made the new initrd (on RHEL, kernel-install runs it as a plugin).
        assert (
            migrated["kernel_links"]["kernel"] == "/boot/vmlinuz"
            and "hook" in migrated["kernel_links"]["kept_by"]
        )
        deb = packages.release_kernel_deb("trixie", debian.MIRROR)
        version = deb.name.split("_")[0].removeprefix("linux-image-")
        artifact = Path(ws.result("40-export")["path"])
        updated = update_kernel(artifact, target, deb, tmp_path / "update", install="dpkg -i")
        assert updated.before == migrated["kernel"] and updated.after == version, updated
        assert f"/boot/vmlinuz -> vmlinuz-{version}" in updated.links
    assert leftovers(tmp_path) == []
