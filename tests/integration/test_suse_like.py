"""``sample:opensuse-like`` is laid out as openSUSE Leap 16's kiwi-built cloud image is, seen from
the host without booting it: GPT with kiwi's BIOS boot, EFI and root partitions, a btrfs root
with openSUSE's subvolumes and the system in snapper's first snapshot (the default subvolume),
a read-only snapshot beside it, SUSE's release files, GRUB 2's files in /boot/grub2, dracut's
initrd at SUSE's name with SUSE's links (listed with imaging's own reader, the host need not have
dracut), no initramfs-tools, NetworkManager's keyfile with its mode, and the profile detected
from os-release is ``suse``; then exported for OpenStack and VirtualBox through that profile and
booted as a working server, the root still the default subvolume and the old snapshot dropped."""

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
from imaging.samples import catalog, debian, layouts, suse

from . import families
from .conftest import Cli, leftovers

# Building the sample is several minutes of mmdebstrap and dracut (cached afterwards).
pytestmark = pytest.mark.timeout(2400)


def _subvolumes(top: Path) -> dict[str, str]:
    """Path from the top level -> ``btrfs subvolume list`` flags (``-s`` lists snapshots)."""
    found = {
        m: "" for m in re.findall(r" path (\S+)$", families.out("btrfs", "subvolume", "list", top), re.M)
    }
    for path in re.findall(r" path (\S+)$", families.out("btrfs", "subvolume", "list", "-s", top), re.M):
        found[path] = "snapshot"
    return found


def _suse_files(root: Path) -> None:
    etc = root / "etc"
    assert (etc / "os-release").is_symlink() and str(
        (etc / "os-release").readlink()
    ) == "../usr/lib/os-release"
    os_release = dict(re.findall(r'^([A-Z_]+)="?([^"\n]*)"?$', (etc / "os-release").read_text(), re.M))
    assert (os_release["ID"], os_release["VERSION_ID"], os_release["ID_LIKE"]) == (
        "opensuse-leap",
        "16.0",
        "suse opensuse",
    )
    assert os_release["CPE_NAME"] == "cpe:/o:opensuse:leap:16.0"
    assert (etc / "SUSE-brand").read_text() == "openSUSE\nVERSION = 16.0\n"
    assert (etc / "products.d" / "baseproduct").resolve().name == "Leap.prod"
    assert "[repo-oss]" in (etc / "zypp" / "repos.d" / "repo-oss.repo").read_text()
    assert not (etc / "debian_version").exists()
    assert re.search(r"^SELINUX=enforcing$", (etc / "selinux" / "config").read_text(), re.M)
    assert "console=ttyS0,115200" in (etc / "default" / "grub").read_text()
    assert 'LOADER_TYPE="grub2"' in (etc / "sysconfig" / "bootloader").read_text()
    fstab = (etc / "fstab").read_text()
    assert re.search(rf"^UUID={suse.ROOT_UUID} +/ +btrfs +defaults +0 +0$", fstab, re.M)
    for sub in (*suse.SUBVOLUMES, ".snapshots"):
        assert re.search(rf"^UUID={suse.ROOT_UUID} +/{re.escape(sub)} +btrfs +subvol=/@/{re.escape(sub)} +0 +0$",
                         fstab, re.M), sub  # fmt: skip
    assert re.search(rf"^UUID={suse.ESP_UUID} +/boot/efi +vfat +utf8 +0 +2$", fstab, re.M)
    assert re.search(r"^opensuse:x:1000:1000:", (etc / "passwd").read_text(), re.M)
    assert (root / "usr" / "sbin" / "sshd-gen-keys-start").stat().st_mode & 0o111
    dropin = (etc / "systemd" / "system" / "ssh.service.d" / "50-sshd-gen-keys-start.conf").read_text()
    assert "ExecStartPre=/usr/sbin/sshd-gen-keys-start\nExecStartPre=/usr/sbin/sshd -t\n" in dropin


def _boot(root: Path) -> str:
    """GRUB 2's files, the one kernel, its initrd dracut's at SUSE's name, SUSE's links."""
    boot = root / "boot"
    versions = suse.kernel_versions(root)
    assert len(versions) == 1 and versions[0].endswith("-amd64") and "cloud" not in versions[0], versions
    version = versions[0]
    assert str((boot / "vmlinuz").readlink()) == f"vmlinuz-{version}"
    assert str((boot / "initrd").readlink()) == f"initrd-{version}"
    grub_cfg = (boot / "grub2" / "grub.cfg").read_text()
    assert "blscfg" not in grub_cfg and f"\tinitrd\t/boot/initrd-{version}\n" in grub_cfg
    assert f"\tlinux\t/boot/vmlinuz-{version} root=UUID={suse.ROOT_UUID} " in grub_cfg
    grubenv = (boot / "grub2" / "grubenv").read_bytes()
    assert len(grubenv) == 1024 and b"\nsaved_entry=openSUSE Leap 16.0\n" in grubenv
    assert not list(boot.glob("initrd.img-*")) and not (root / "initrd.img").exists()
    with open(boot / f"initrd-{version}", "rb") as f:
        names = list_initrd(f)
    # dracut's own record of what it put in; the btrfs driver the root needs, and virtio's.
    assert "usr/lib/dracut/modules.txt" in names, names[:20]
    assert {"btrfs", "virtio_blk", "ahci"} <= set(initrd_modules(names))
    return version


def _layout(top: Path) -> None:
    """openSUSE's subvolumes; snapshot 1 the default, snapshot 2 read-only; data where it goes."""
    subvolumes = _subvolumes(top)
    expected = {"@", *(f"@/{s}" for s in (*suse.SUBVOLUMES, ".snapshots")), suse.SNAPSHOT, suse.OLD_SNAPSHOT}
    assert set(subvolumes) == expected
    assert [p for p, kind in subvolumes.items() if kind] == [suse.OLD_SNAPSHOT]
    assert families.out("btrfs", "subvolume", "get-default", top).strip().endswith(f" path {suse.SNAPSHOT}")
    assert (
        families.out("btrfs", "property", "get", "-ts", top / suse.OLD_SNAPSHOT, "ro").strip() == "ro=true"
    )
    assert (
        "<description>first root filesystem</description>" in (top / "@/.snapshots/1/info.xml").read_text()
    )
    assert "C" in families.out("lsattr", "-d", top / "@" / "var").split()[0]  # no copy-on-write, as kiwi's
    # The user's files are in the subvolumes, not in the snapshot (whose mount points are empty).
    user = top / "@" / debian.Instance(user="opensuse").data_path.lstrip("/")
    assert user.read_text() == debian.DATA and user.stat().st_uid == 1000
    assert "alice@laptop" in (top / "@" / "root" / ".ssh" / "authorized_keys").read_text()
    for path, text in suse.USER_FILES.items():
        assert (top / "@" / path.lstrip("/")).read_text() == text
    assert (top / "@" / "usr" / "local" / "sbin" / "imaging-sample-check").exists()
    snapshot = top / suse.SNAPSHOT
    for sub in (*suse.SUBVOLUMES, ".snapshots", "boot/efi"):
        assert (snapshot / sub).is_dir() and not list((snapshot / sub).iterdir()), sub
    # The old snapshot holds the host keys of its day, which 10-clean removes from the live root.
    assert list((top / suse.OLD_SNAPSHOT / "etc" / "ssh").glob("ssh_host_*_key"))


def test_opensuse_like_sample_is_laid_out_as_opensuse_leap_16() -> None:
    disk = catalog.ensure_sample(suse.NAME)
    table: dict[str, Any] = json.loads(families.out("sfdisk", "--json", disk))["partitiontable"]
    assert table["label"] == "gpt"
    bios, esp, root = table["partitions"]
    assert (bios["start"], bios["size"], bios["type"], bios["name"]) == (
        2048,
        4096,
        layouts.BIOS_BOOT,
        "p.legacy",
    )
    assert (esp["start"], esp["type"], esp["name"]) == (suse.ESP_START // 512, suse.ESP_TYPE, "p.UEFI")
    assert (root["start"], root["type"], root["name"]) == (
        suse.ROOT_START // 512,
        layouts.LINUX_FS,
        "p.lxroot",
    )
    probe = families.blkid(disk, suse.ESP_START)
    assert (probe["TYPE"], probe["UUID"], probe["LABEL"]) == ("vfat", suse.ESP_UUID, "EFI")
    esp_cfg = families.out("mtype", "-i", f"{disk}@@{suse.ESP_START}", "::/EFI/opensuse/grub.cfg")
    assert f"search --fs-uuid --set=root {suse.ROOT_UUID}" in esp_cfg
    start, size = root["start"] * 512, root["size"] * 512
    probe = families.blkid(disk, start)
    assert (probe["TYPE"], probe["UUID"]) == ("btrfs", suse.ROOT_UUID)
    with layouts.loop(disk, start, size, read_only=True) as dev:
        try:
            with layouts.mounted(dev, "ro,subvolid=5") as top:
                _layout(top)
                snapshot = top / suse.SNAPSHOT
                _suse_files(snapshot)
                version = _boot(snapshot)
                installed = families.installed(top / "@")
                assert {
                    "dracut",
                    "network-manager",
                    "btrfs-progs",
                    "dosfstools",
                    "linux-image-amd64",
                } <= installed
                assert (
                    not {"initramfs-tools", "initramfs-tools-core", "ifupdown", "linux-image-cloud-amd64"}
                    & installed
                )
                keyfile = snapshot / suse.INSTANCE.network[0][0].lstrip("/")
                assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600 and keyfile.stat().st_uid == 0
                assert "\ninterface-name=eth0\n" in keyfile.read_text()
                check = (top / "@" / "usr" / "local" / "sbin" / "imaging-sample-check").read_text()
                assert (
                    "/home/opensuse/.ssh" in check
                    and suse.INSTANCE.auth_log in check
                    and "Freeing initrd memory" in check
                )
                assert (top / "@" / suse.INSTANCE.auth_log.lstrip("/")).exists()
                assert not (top / "@" / "var" / "log" / "auth.log").exists()  # no syslog: the journal
                # What 10-clean and 20-migrate will take it for: the suse profile, by os-release.
                with Guest(snapshot) as guest:  # closed before the unmount: its fd would keep it busy
                    detected = profiles.detect(guest)
                assert detected.profile.name == "suse" and not detected.assumed, detected
                assert detected.profile.initrd is not None
                assert detected.profile.initrd.image.format(version=version) == f"/boot/initrd-{version}"
        finally:
            layouts.forget_btrfs(dev)
    families.not_attached(disk)


# The qcow2 only: the VirtualBox path (the generic kernel chosen for AHCI and e1000) is booted
# for the RHEL- and Ubuntu-like guests and four Debian ones; each OVA here is 2-3 minutes of TCG.
@pytest.mark.parametrize(("fmt", "target"), families.BOOTS[:1], ids=[b[0] for b in families.BOOTS[:1]])
def test_an_opensuse_like_instance_boots_as_a_working_server(
    cli: Cli, tmp_path: Path, fmt: str, target: str
) -> None:
    # The root is snapper's snapshot 1 because it is the default subvolume (fstab mounts / with
    # no subvol=); the other subvolumes are cleaned where fstab mounts them and kept; the user's
    # old snapshot is dropped (it predates cleaning); the ESP is not merged (its fstab entry is
    # commented out, the target has none). Detected as suse from os-release; the initrd rebuilt
    # by the guest's own dracut at SUSE's name; the guest's own check passing inside. Nothing
    # installed: the generic kernel has the targets' drivers.
    ws = families.export_and_boot(cli, tmp_path, suse.NAME, fmt, target, "suse")
    acquired = ws.result("00-acquire")
    assert (acquired["fs_type"], acquired["subvolume"], acquired["subvolume_is_default"]) == (
        "btrfs",
        suse.SNAPSHOT,
        True,
    )
    assert acquired["snapshots_dropped"] == [suse.OLD_SNAPSHOT] and acquired["merged"] == []
    migrated = ws.result("20-migrate")
    assert migrated["initrd"].startswith("/boot/initrd-")
    # The ESP's entry commented out (the target has none); the subvolumes' entries kept.
    fstab = next(c["diff"] for c in migrated["changes"] if c["path"] == "/etc/fstab")
    assert f"\n+# not on the {target} target (imaging, 20-migrate): UUID={suse.ESP_UUID} " in fstab
    assert not re.search(r"^[-+].*subvol=", fstab, re.M)
    serial = (ws.root / "verify" / "serial.log").read_text(errors="replace")
    assert "dracut" in serial and "imaging-check ok: / is snapshot 1, the default subvolume" in serial
    assert leftovers(tmp_path) == []
