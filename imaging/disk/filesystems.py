"""The filesystems a root can be on: one module each behind one interface, and the table of them.

A filesystem module (``ext``, ``xfs``, ``btrfs``) names the ``TYPES`` blkid reports for it, the
GRUB module that reads it and the kernel module that mounts it, and has the same six
operations: ``info`` (its superblock), ``check`` (read-only unless told to repair our own copy),
``tidy`` (our partitionless copy made consistent, its free space punched out as holes),
``grow`` (to fill a partition), ``mount_options``, and reading and writing files through
:func:`files`. Adding a filesystem is a module and a line in :data:`FILESYSTEMS`.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from imaging.disk import btrfs, debugfs, ext, mounts, xfs
from imaging.disk.common import FsInfo, Verdict
from imaging.disk.files import Guest
from imaging.errors import SourceError
from imaging.tables import Table

__all__ = ["FsInfo", "Verdict", "FILESYSTEMS", "TYPES", "of", "files", "Filesystem"]


class Filesystem(Protocol):
    TYPES: tuple[str, ...]
    GRUB_MODULE: str
    KERNEL_MODULE: str
    READ_ONLY_OPTIONS: list[str]
    TOOLS: tuple[str, str]

    def info(self, image: Path, offset: int = 0) -> FsInfo: ...

    def check(
        self, image: Path, offset: int = 0, size: int | None = None, *, repair: bool = False
    ) -> Verdict: ...

    def tidy(self, image: Path) -> Verdict: ...

    def grow(self, image: Path, offset: int, size: int) -> bool: ...

    def mount_options(self) -> list[str]: ...


# Spelled out, so that mypy holds each module to the interface.
FILESYSTEMS: dict[str, Filesystem] = {"ext2": ext, "ext3": ext, "ext4": ext, "xfs": xfs, "btrfs": btrfs}
TYPES = tuple(FILESYSTEMS)


def of(fs_type: str) -> Filesystem:
    """The module for ``fs_type``, or one line naming what can be placed."""
    try:
        return FILESYSTEMS[fs_type]
    except KeyError:
        raise SourceError(
            f"a {fs_type} filesystem cannot be placed (supported: {', '.join(TYPES)})"
        ) from None


def table(instance: dict[str, object]) -> Table:
    """The instance's filesystem and what each step of placing it runs, for 30-bootable."""
    fs_type = str(instance["fs_type"])
    fs = of(fs_type)
    rows = [
        ("type", fs_type, "blkid, then the superblock"),
        ("UUID", str(instance["uuid"]), "kept: fstab and the boot menu find the root by it"),
        ("label", str(instance.get("label") or "(none)"), "kept"),
        ("block size", f"{instance['block_size']:,} bytes", "the unit of the arithmetic"),
        ("check", fs.TOOLS[0], "on our copy, read-only where the tool cannot repair safely"),
        ("grow", fs.TOOLS[1], "to fill partition 1; the filesystem never shrinks"),
        ("GRUB reads it with", fs.GRUB_MODULE, "built into GRUB's core image"),
        ("the initrd mounts it with", fs.KERNEL_MODULE, "added to the initrd's modules (20-migrate)"),
    ]
    if fs_type in btrfs.TYPES:
        sub = str(instance.get("subvolume") or "")
        dropped = ", ".join(instance.get("snapshots_dropped") or []) or "(none)"  # type: ignore[arg-type]
        rows += [("root subvolume", sub or "(the top level)", "GRUB reads paths from the top level"),
                 ("snapshots dropped", dropped, "they predate cleaning (--snapshots keep keeps them)")]  # fmt: skip
    return Table(rows, ["quantity", "value", "why"], index="quantity")


class MountedFiles(Guest):
    """A mounted guest with the few calls the bootloader makes of :class:`debugfs.ExtGuest`."""

    def __enter__(self) -> MountedFiles:
        return self

    def entries(self, path: str) -> list[debugfs.Entry]:
        found = []
        for name in self.listdir(path):
            st = self.lstat(f"{path.rstrip('/')}/{name}")
            if st is not None:
                found.append(debugfs.Entry(name, st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size))
        return found

    def install_files(self, files: dict[str, bytes], directories: list[str]) -> None:
        for d in directories:
            self.makedirs(d)
        for path, data in sorted(files.items()):
            self.write_bytes(path, data)
            with self._fd(path, os.O_PATH) as fd:
                # Root's, as a package would leave them (write_bytes keeps an old file's owner).
                os.chown(f"/proc/self/fd/{fd}", 0, 0)
                os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(0o644))


@contextlib.contextmanager
def files(
    image: Path,
    fs_type: str,
    *,
    offset: int = 0,
    size: int | None = None,
    subvolume: str = "",
    options: Sequence[str] = (),
    writable: bool,
) -> Iterator[debugfs.ExtGuest | MountedFiles]:
    """The guest's files in the filesystem at ``offset``: ext through debugfs (no mount), the
    others mounted (read-only unless ``writable``), ``subvolume`` being btrfs's root and
    ``options`` the guest's own for writing (btrfs compression)."""
    if fs_type in ext.TYPES:
        yield debugfs.ExtGuest(image, offset)
        return
    fs = of(fs_type)
    extra = [*fs.mount_options(), *([f"subvol={subvolume}"] if subvolume else [])]
    extra += [*options] if writable else ["noexec", *fs.READ_ONLY_OPTIONS]
    with (
        mounts.mounted(
            image, offset=offset, size=size, readonly=not writable, fstype=fs_type, extra=extra
        ) as root,
        MountedFiles(root) as guest,
    ):
        yield guest


def exists(image: Path, fs_type: str, path: str, *, offset: int = 0, size: int | None = None) -> bool:
    """Whether the guest has ``path`` (a root has /etc/fstab), read in user space: a source is
    never mounted. ext through debugfs, XFS through ``xfs_db``; btrfs has no such reader, so a
    btrfs answers yes and the root subvolume is then looked for on our copy (btrfs.find_root)."""
    if fs_type in ext.TYPES:
        return debugfs.ExtGuest(image, offset).exists(path)
    if fs_type in xfs.TYPES:
        return xfs.exists(image, path, offset=offset, size=size)
    return True
