"""The source disk's other filesystems, merged into the root where its fstab mounts them.

An instance installed from an ISO has its /boot on a partition of its own beside the root (on a
logical volume, or XFS or btrfs beside it), and often /home or /var too. The bootable disk has
one partition: each filesystem the root's fstab mounts from the same source disk (by UUID,
LABEL, partition device name or /dev/mapper name) is copied, file by file, into the root at its
mount point. Its fstab entry then names a filesystem the target does not have, which 20-migrate
comments out like the cloud's other disks. Swap, the EFI system partition (copied whole
beside the root instead: esp.py) and network or pseudo filesystems are not merged.

Each merged filesystem is first copied to a scratch file and made consistent there (its
journal or log replayed on the copy, never on the source), then read through a read-only mount.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imaging import sparse, tools
from imaging.disk import filesystems, lvm, mounts
from imaging.disk.files import Guest
from imaging.errors import SourceError
from imaging.records import human_bytes

# Room for what the merged files take beyond their bytes (inodes, directories, the root's own
# allocation granularity).
_SLACK = 1.15
_MARGIN = 64 << 20
_PARTITION_DEVICE = re.compile(r"/dev/(?:[shvx]v?d[a-z]+|nvme\d+n\d+p|mmcblk\d+p)(\d+)")


@dataclass(frozen=True)
class Found:
    """A filesystem of the source disk other than the root: on a partition or a logical volume."""

    where: str  # "partition 1", "logical volume rhel/home"
    offset: int
    length: int
    fs_type: str
    uuid: str
    label: str
    partition: int | None = None
    volume: lvm.LogicalVolume | None = None

    def named_by(self, device: str) -> bool:
        """Whether an fstab device field names this filesystem."""
        if device == f"UUID={self.uuid}" or device.lower() == f"uuid={self.uuid}".lower():
            return bool(self.uuid)
        if device.startswith("LABEL="):
            return bool(self.label) and device.removeprefix("LABEL=") == self.label
        if self.volume is not None:
            vg, lv = self.volume.vg, self.volume.name
            return device in (self.volume.dm_name, f"/dev/{vg}/{lv}", f"/dev/disk/by-id/dm-name-{vg}-{lv}")
        m = _PARTITION_DEVICE.fullmatch(device)
        return m is not None and self.partition == int(m.group(1))


def to_merge(fstab: str, others: list[Found]) -> list[tuple[str, Found]]:
    """(mount point, filesystem) for every fstab entry that mounts one of ``others``, parents first."""
    found = []
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) < 3 or fields[0].startswith("#") or not fields[1].startswith("/") or fields[1] == "/":
            continue
        if fields[2] in ("swap", "vfat", "nfs", "nfs4", "cifs") or "noauto" in fields[3:4]:
            continue
        match = next((f for f in others if f.named_by(fields[0])), None)
        if match is not None and match.fs_type in filesystems.TYPES:
            found.append((posixpath.normpath(fields[1]), match))
    return sorted(found, key=lambda m: m[0].count("/"))


def _copy_out(disk: Path, found: Found, dest: Path) -> None:
    sparse.create_sparse(dest, found.length)
    if found.volume is not None:
        lvm.copy_volume(disk, found.volume, dest, desc=f"copy {found.where}")
    else:
        sparse.copy_range(
            disk, dest, src_offset=found.offset, length=found.length, desc=f"copy {found.where}"
        )


def merge(root_image: Path, root_fs: str, subvolume: str, disk: Path, entries: list[tuple[str, Found]],
          scratch: Path) -> list[str]:  # fmt: skip
    """Copy each entry's files into the root (our partitionless copy ``root_image``) at its mount
    point; return one line per merged filesystem for the record."""
    if not entries:
        return []
    tools.require_tools("rsync", reason="merge filesystems into the root", hint="apt install rsync")
    need = sum(filesystems.of(f.fs_type).info(disk, f.offset).used_bytes for _, f in entries)
    fs = filesystems.of(root_fs)
    size = root_image.stat().st_size
    want = size + int(need * _SLACK) + _MARGIN
    os.truncate(root_image, want)
    fs.grow(root_image, 0, want)
    done = []
    root_options = [*fs.mount_options(), *([f"subvol={subvolume}"] if subvolume else [])]
    with (
        tempfile.TemporaryDirectory(prefix="merge-", dir=scratch) as tmp,
        mounts.mounted(root_image, readonly=False, fstype=root_fs, extra=root_options) as root,
        Guest(root) as guest,
    ):
        for mountpoint, found in entries:
            copy = Path(tmp) / "fs.raw"
            _copy_out(disk, found, copy)
            other = filesystems.of(found.fs_type)
            other.tidy(copy)
            guest.makedirs(mountpoint)
            real = guest.realpath(mountpoint)
            st = guest.lstat(real)
            if real == "/" or st is None or not stat.S_ISDIR(st.st_mode):
                raise SourceError(f"fstab mounts {found.where} on {mountpoint}, which is not a directory")
            read_only = [*other.mount_options(), *other.READ_ONLY_OPTIONS]
            with mounts.mounted(copy, readonly=True, fstype=found.fs_type, extra=read_only) as src:
                result = tools.run(
                    [
                        "rsync",
                        "-aHAXS",
                        "--numeric-ids",
                        "--stats",
                        f"{src}/",
                        f"{root / real.lstrip('/')}/",
                    ],
                    timeout=24 * 3600,
                )
            copy.unlink()
            moved = next((line.split(":")[1].split()[0] for line in result.stdout.splitlines()
                          if line.startswith("Total transferred file size:")), "0")  # fmt: skip
            done.append(
                f"{mountpoint}: {found.where} ({found.fs_type}, {human_bytes(int(moved.replace(',', '')))})"
            )
    fs.tidy(root_image)
    return done
