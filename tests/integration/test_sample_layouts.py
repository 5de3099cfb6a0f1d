"""The partitioned Debian samples are laid out as their families' installers lay them out, seen
from the host without booting them: the partition table, what sits at each offset, the
filesystem's features (XFS v5 with bigtime and inobtcount; btrfs subvolumes, the default one,
a read-only snapshot, zstd extents; LVM's PV, VG and LVs), the fstab the guest mounts from, the
guest's check, and the user's files a faithful copy must keep. Nothing stays mounted or attached."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from imaging.samples import catalog, layouts
from imaging.samples.kvm import sample_uuid

# Building a sample is a minute or two of mmdebstrap (cached afterwards).
pytestmark = pytest.mark.timeout(1800)

MIB = 1 << 20


def _out(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))}: {proc.stderr}"
    return proc.stdout


def _table(disk: Path) -> dict[str, Any]:
    table = json.loads(_out("sfdisk", "--json", disk))["partitiontable"]
    assert isinstance(table, dict)
    return table


def _blkid(disk: Path, offset: int) -> dict[str, str]:
    out = _out("blkid", "--probe", "--output", "export", "--offset", str(offset), disk)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _user_files_kept(home: Path) -> None:
    results = home / "debian" / "results"
    assert (results / "run-7.log").stat().st_ino == (results / "latest.log").stat().st_ino
    assert os.getxattr(results / "notes.txt", "user.imaging") == b"kept"
    assert (
        os.getxattr(results / "labelled.txt", "security.selinux") == layouts.SELINUX_LABEL.encode() + b"\0"
    )
    acl = _out("getfacl", "--numeric", "--omit-header", results / "shared").split()
    assert "user:1000:rwx" in acl and "default:user:1000:rwx" in acl
    sparse = (results / "sparse.img").stat()
    assert sparse.st_size == 1 << 30 and sparse.st_blocks * 512 <= 64 * 1024
    assert (results / "experiment-7.csv").stat().st_uid == 1000


def _guest_root_ok(root: Path, name: str, boot: Path | None = None) -> None:
    check = (root / "usr" / "local" / "sbin" / "imaging-sample-check").read_text()
    assert all(line in check for line in layouts.LAYOUTS[name].checks.splitlines())
    assert (root / "etc" / "fstab").read_text() == layouts.LAYOUTS[name].fstab
    assert list((boot or root / "boot").glob("vmlinuz-*-cloud-amd64"))


def _nothing_left(disk: Path, mounts: list[Path]) -> None:
    """No loop device on the sample any more, and none of the test's mounts. (Not leftovers() of
    the cache directory: other samples may be building there, with their own mounts.)"""
    loops = _out("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE")
    assert str(disk) not in loops
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert mounts and not [m for m in mounts if str(m) in mountinfo or m.exists()]


def test_xfs_sample_is_laid_out_as_rhel_cloud_images_are() -> None:
    mounts: list[Path] = []
    disk = catalog.ensure_sample("debian12-xfs")
    table = _table(disk)
    assert table["label"] == "gpt"
    bios, root = table["partitions"]
    assert (bios["start"], bios["size"], bios["type"]) == (2048, 2048, layouts.BIOS_BOOT)
    assert (root["start"], root["type"]) == (4096, layouts.LINUX_FS)
    start, size = root["start"] * 512, root["size"] * 512
    assert start + size <= disk.stat().st_size - 33 * 512  # GPT's backup fits after it
    probe = _blkid(disk, start)
    assert (probe["TYPE"], probe["LABEL"], probe["UUID"]) == ("xfs", "root", sample_uuid("debian12-xfs"))
    with layouts.loop(disk, start, size, read_only=True) as dev:
        version = _out("xfs_db", "-r", "-c", "sb 0", "-c", "version", dev)
        assert "= V5," in version and "BIGTIME" in version and "INOBTCNT" in version, version
        with layouts.mounted(dev, "ro") as mnt:
            mounts.append(mnt)
            info = _out("xfs_info", mnt)
            assert "bigtime=1" in info and "inobtcount=1" in info and "crc=1" in info
            _guest_root_ok(mnt, "debian12-xfs")
            assert re.search(rf"^UUID={sample_uuid('debian12-xfs')}\s+/\s+xfs\s+defaults\s+0 0$",
                             (mnt / "etc" / "fstab").read_text(), re.M)  # fmt: skip
            _user_files_kept(mnt / "home")
    _nothing_left(disk, mounts)


def test_btrfs_sample_is_laid_out_as_fedora_is() -> None:
    mounts: list[Path] = []
    disk = catalog.ensure_sample("debian12-btrfs")
    table = _table(disk)
    assert table["label"] == "dos"
    (part,) = table["partitions"]
    assert (part["start"], part["type"]) == (2048, "83")
    start, size = part["start"] * 512, part["size"] * 512
    probe = _blkid(disk, start)
    assert (probe["TYPE"], probe["LABEL"], probe["UUID"]) == (
        "btrfs",
        "fedora",
        sample_uuid("debian12-btrfs"),
    )
    with layouts.loop(disk, start, size, read_only=True) as dev:
        try:
            with layouts.mounted(dev, "ro") as top:
                mounts.append(top)
                subvolumes = _out("btrfs", "subvolume", "list", top)
                paths = [line.split(" path ", 1)[1] for line in subvolumes.splitlines()]
                assert paths == ["root", "home", "snapshots/root-1"], subvolumes
                # The top level stays the default: the bootloader and fstab name subvol=root.
                assert _out("btrfs", "subvolume", "get-default", top).startswith("ID 5 ")
                assert (
                    _out("btrfs", "property", "get", "-ts", top / "snapshots" / "root-1", "ro").strip()
                    == "ro=true"
                )
                assert _out("btrfs", "property", "get", "-ts", top / "root", "ro").strip() == "ro=false"
                # Written with compress=zstd:1: a text file's extents are encoded (compressed).
                extents = _out("filefrag", "-v", top / "root" / "var" / "lib" / "dpkg" / "status")
                assert "encoded" in extents, extents
                usage = _out("btrfs", "filesystem", "du", "-s", "--raw", top / "root")
                assert int(usage.splitlines()[1].split()[0]) > 300 * MIB  # the whole system is there
                _guest_root_ok(top / "root", "debian12-btrfs")
                assert list((top / "root" / "home").iterdir()) == []  # /home is the home subvolume's
                assert (top / "snapshots" / "root-1" / "etc" / "fstab").exists()
                _user_files_kept(top / "home")
        finally:
            layouts.forget_btrfs(dev)
    _nothing_left(disk, mounts)


def test_lvm_sample_is_laid_out_as_the_installers_do() -> None:
    mounts: list[Path] = []
    disk = catalog.ensure_sample("debian12-lvm")
    table = _table(disk)
    assert table["label"] == "dos"
    boot, part = table["partitions"]
    assert (boot["start"], boot["type"], boot.get("bootable")) == (2048, "83", True)
    assert (part["start"], part["type"]) == (2048 + layouts.BOOT_MIB * 2048, "8e")
    probe = _blkid(disk, boot["start"] * 512)
    assert (probe["TYPE"], probe["UUID"]) == ("ext2", layouts.LVM_BOOT_UUID)
    start, size = part["start"] * 512, part["size"] * 512
    assert _blkid(disk, start)["TYPE"] == "LVM2_member"
    with layouts.loop(disk, start, size, read_only=True) as dev, layouts.lvm_env(dev) as lvm:
        env = {**os.environ, **lvm}
        pv = _out("pvs", "--noheadings", "-o", "pv_name,vg_name", env=env).split()
        assert pv == [dev, "debian-vg"]
        lvs = _out(
            "lvs",
            "--noheadings",
            "--nosuffix",
            "--units",
            "b",
            "-o",
            "lv_name,lv_size",
            "debian-vg",
            env=env,
        )
        sizes = {line.split()[0]: int(line.split()[1]) for line in lvs.splitlines() if line.strip()}
        assert set(sizes) == {"root", "swap_1"} and sizes["swap_1"] == layouts.SWAP_MIB * MIB
        offsets = {lv: start + offset for lv, offset in layouts.lv_offsets(dev, env).items()}
    # The host's own LVM state is untouched: nothing of debian-vg in its configuration's view.
    assert "debian-vg" not in subprocess.run(["vgs"], capture_output=True, text=True).stdout
    assert offsets["root"] < offsets["swap_1"] == offsets["root"] + sizes["root"]
    probe = _blkid(disk, offsets["root"])
    assert (probe["TYPE"], probe["UUID"]) == ("ext4", sample_uuid("debian12-lvm"))
    assert _blkid(disk, offsets["swap_1"])["TYPE"] == "swap"
    _out("e2fsck", "-fn", f"{disk}?offset={offsets['root']}")
    with layouts.loop(disk, offsets["root"], sizes["root"], read_only=True) as dev:
        with layouts.mounted(dev, "ro") as mnt:
            mounts.append(mnt)
            with layouts.loop(disk, boot["start"] * 512, boot["size"] * 512, read_only=True) as bdev:
                with layouts.mounted(bdev, "ro") as kernels:
                    mounts.append(kernels)
                    _guest_root_ok(mnt, "debian12-lvm", kernels)
            assert list((mnt / "boot").iterdir()) == []  # the mount point of the /boot partition
            fstab = (mnt / "etc" / "fstab").read_text()
            assert re.search(
                r"^/dev/mapper/debian--vg-root\s+/\s+ext4\s+errors=remount-ro\s+0\s+1$", fstab, re.M
            )
            assert re.search(r"^/dev/mapper/debian--vg-swap_1\s+none\s+swap\s+sw\s+0\s+0$", fstab, re.M)
            assert re.search(rf"^UUID={layouts.LVM_BOOT_UUID}\s+/boot\s+ext2\s", fstab, re.M)
            _user_files_kept(mnt / "home")
    _nothing_left(disk, mounts)
