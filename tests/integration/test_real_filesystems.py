"""Real Debian 12 instances on the roots other families use, each exported for KVM/OpenStack and
for VirtualBox and booted as a working server (the same honest check as test_real_guests.py):
XFS on a GPT disk (RHEL 8/9, Rocky, Alma, Amazon Linux 2023), btrfs with subvolumes, zstd and a
snapshot (Fedora, openSUSE), ext4 on LVM with a separate /boot (ISO installs). The guests are
built from Debian's packages by their own mkfs tools (imaging/samples/layouts.py); their own
check verifies from inside what placement keeps (hard links, xattrs, SELinux labels, ACLs,
sparseness) and the filesystem and subvolumes the root is on. A file of its own, so that pytest's
loadfile sends it to the other worker than test_real_guests.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import Cli
from .test_real_guests import export_and_boot

pytestmark = pytest.mark.timeout(1800)

CASES = [
    # XFS's qcow2 and btrfs's OVA boot UEFI with Secure Boot: Debian's signed GRUB reads them
    # (btrfs: the root in a subvolume, zstd); the others BIOS, this host's GRUB. One boot per
    # filesystem and firmware: XFS under BIOS is the Rocky-9-like guest's (test_rhel_like).
    ("debian12-xfs", "qcow2", "openstack", ["--firmware", "uefi"]),
    ("debian12-btrfs", "qcow2", "openstack", ["--keep-work", "--firmware", "bios"]),
    ("debian12-btrfs", "ova", "", ["--install", "linux-image-amd64", "--firmware", "uefi"]),
    ("debian12-lvm", "ova", "", ["--install", "linux-image-amd64", "--firmware", "bios"]),
]


@pytest.mark.parametrize(("sample", "fmt", "target", "extra"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_a_root_on_xfs_btrfs_or_lvm_boots_as_a_working_server(
    cli: Cli, tmp_path: Path, sample: str, fmt: str, target: str, extra: list[str]
) -> None:
    ws = export_and_boot(cli, tmp_path, sample, fmt, target, extra)
    if "uefi" in extra:  # Debian's signed GRUB read the kernel off this filesystem, Secure Boot on
        assert (ws.result("50-verify")["firmware"], ws.result("50-verify")["secure_boot"]) == (
            "uefi", "Secure boot enabled")  # fmt: skip
    acquired = ws.result("00-acquire")
    placed = ws.result("30-bootable")
    grub = placed["grub"]["config_diff"]
    serial = (ws.root / "verify" / "serial.log").read_text(errors="replace")
    if sample == "debian12-xfs":
        assert (acquired["fs_type"], acquired["source_layout"], acquired["partition"]) == (
            "xfs",
            "partitioned",
            2,
        )
        assert "XFS (" in serial and "Ending clean mount" in serial
    elif sample == "debian12-btrfs":
        assert (acquired["fs_type"], acquired["subvolume"]) == ("btrfs", "root")
        assert acquired["snapshots_dropped"] == ["snapshots/root-1"]
        # GRUB reads from the top level; the kernel mounts the root subvolume, not the default one.
        assert "linux /root/boot/vmlinuz-" in grub and "rootflags=subvol=root" in grub
        assert "linux /root/vmlinuz " in grub  # the default entry, through linux-base's link
        assert acquired["write_options"] == ["compress=zstd:1"]
        if "--keep-work" in extra:
            # GRUB's modules were written as the guest writes (zstd), and GRUB read them to boot.
            offset = placed["layout"]["offset_bytes"]
            mnt = tmp_path / "placed"
            mnt.mkdir()
            subprocess.run(["mount", "-o", f"loop,ro,offset={offset},subvolid=5", ws.disk, mnt], check=True)
            try:
                extents = subprocess.run(["filefrag", "-v", mnt / "root/boot/imaging-grub/i386-pc/normal.mod"],
                                         capture_output=True, text=True, check=True).stdout  # fmt: skip
            finally:
                subprocess.run(["umount", mnt], check=True)
            assert "encoded" in extents, extents
    else:
        assert (acquired["fs_type"], acquired["volume"], acquired["source_layout"]) == (
            "ext4",
            "debian-vg/root",
            "lvm",
        )
        assert [m.split(" (")[0] for m in acquired["merged"]] == ["/boot: partition 1"]
        assert {row["volume"] for row in acquired["volumes"]} == {"root", "swap_1"}
    assert placed["disk"]["fs_type"] == acquired["fs_type"] and placed["disk"]["uuid"] == acquired["uuid"]
    assert placed["placement"]["grown"] is True
