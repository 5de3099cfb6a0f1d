"""ext2/3/4 through e2fsprogs, on plain files or on a partition inside a disk file (``?offset=``).

Nothing here mounts anything: e2fsck, resize2fs, dumpe2fs and debugfs all read the image through
libext2fs in user space, so a hostile filesystem never reaches the host kernel's parser.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from imaging import tools
from imaging.disk.common import FsInfo
from imaging.errors import SourceError

TYPES: tuple[str, ...] = ("ext2", "ext3", "ext4")
GRUB_MODULE = "ext2"  # GRUB's one driver reads all three
KERNEL_MODULE = "ext4"  # serves ext2 and ext3 too
TOOLS: tuple[str, str] = ("e2fsck -f", "resize2fs")  # check, grow
# None: ext is only mounted once e2fsck has replayed its journal on our copy (noload, the way to
# skip a replay, is refused for ext2), and a read-only loop device could not be written anyway.
READ_ONLY_OPTIONS: list[str] = []


def device(path: Path, offset: int = 0) -> str:
    """How e2fsprogs names a filesystem that starts ``offset`` bytes into ``path``."""
    base = os.fspath(path.resolve())
    return f"{base}?offset={offset}" if offset else base


@dataclass(frozen=True)
class ExtInfo:
    uuid: str
    label: str
    block_size: int
    block_count: int
    free_blocks: int
    inode_count: int
    free_inodes: int
    features: tuple[str, ...]
    state: str

    @property
    def size_bytes(self) -> int:
        return self.block_size * self.block_count

    @property
    def used_bytes(self) -> int:
        return self.block_size * (self.block_count - self.free_blocks)

    @property
    def fs_type(self) -> str:
        ext4_only = {
            "extent",
            "extents",
            "flex_bg",
            "huge_file",
            "64bit",
            "metadata_csum",
            "dir_nlink",
            "extra_isize",
        }
        if ext4_only & set(self.features):
            return "ext4"
        return "ext3" if "has_journal" in self.features else "ext2"

    @classmethod
    def parse(cls, text: str) -> ExtInfo:
        fields: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and key and not key.startswith(" "):
                fields.setdefault(key.strip(), value.strip())
        try:
            return cls(
                uuid=fields["Filesystem UUID"],
                label=""
                if fields.get("Filesystem volume name") == "<none>"
                else fields.get("Filesystem volume name", ""),
                block_size=int(fields["Block size"]),
                block_count=int(fields["Block count"]),
                free_blocks=int(fields["Free blocks"]),
                inode_count=int(fields["Inode count"]),
                free_inodes=int(fields["Free inodes"]),
                features=tuple(fields.get("Filesystem features", "").split()),
                state=fields.get("Filesystem state", ""),
            )
        except (KeyError, ValueError) as e:
            raise SourceError(f"dumpe2fs output lacks {e}: not an ext2/3/4 superblock") from None


def read_superblock(dev: str) -> ExtInfo:
    result = tools.run(["dumpe2fs", "-h", dev], ok_codes=range(256), timeout=120)
    if result.exit_code != 0:
        raise SourceError(f"dumpe2fs cannot read the superblock: {result.stderr_tail(1)}")
    return ExtInfo.parse(result.stdout)


# e2fsck's exit status is a bit mask (e2fsck(8)).
_FSCK_MEANING = {
    0: "clean",
    1: "errors corrected",
    2: "errors corrected, reboot needed",
    4: "errors left uncorrected",
    8: "operational error",
    16: "usage error",
    32: "cancelled",
    128: "shared library error",
}


@dataclass(frozen=True)
class FsckVerdict:
    exit_code: int
    summary: str  # e2fsck's own last word, e.g. "root: 78/65536 files (2.6% non-contiguous), ..."

    @property
    def meaning(self) -> str:
        if self.exit_code == 0:
            return "clean"
        return ", ".join(m for bit, m in _FSCK_MEANING.items() if bit and self.exit_code & bit)

    @property
    def ok(self) -> bool:
        return self.exit_code < 4

    def __str__(self) -> str:
        return f"{self.meaning} (exit {self.exit_code}): {self.summary}"


def _summary(result: tools.CommandResult) -> str:
    lines = [
        line.strip().removeprefix("e2fsck: ") for line in (result.stdout + "\n" + result.stderr).splitlines()
    ]
    lines = [x for x in lines if x and not x.startswith(("e2fsck 1.", "Pass ", "*****"))]
    # A clean or repaired check ends with its one-line summary; a failure needs the line before too.
    return "; ".join(lines[-2:] if result.exit_code >= 4 else lines[-1:])


def fsck(dev: str, *, repair: bool, check: bool = True, discard: bool = False) -> FsckVerdict:
    """Full check; with ``repair`` answer yes to every fix (the copy is ours, never the source).
    Without ``repair`` the filesystem is opened read-only. ``check`` raises on a bad verdict.
    ``discard`` punches holes where blocks are free: what deleted files left behind (a cloud
    instance's disk is full of it, and so is a copy that installed packages) is no data to copy,
    convert or deflate in any later stage, and it does not travel in the artifact."""
    options = ["-E", "discard"] if discard and repair else []
    result = tools.run(
        ["e2fsck", "-f", "-y" if repair else "-n", *options, dev], ok_codes=range(256), timeout=3600
    )
    verdict = FsckVerdict(result.exit_code, _summary(result))
    if check and not verdict.ok:
        raise SourceError(f"e2fsck: the filesystem is corrupt beyond repair: {verdict}")
    return verdict


def resize_in_disk(disk: Path, offset: int, blocks: int, block_size: int, old_blocks: int) -> bool:
    """Grow the filesystem at ``offset`` inside ``disk`` to ``blocks``; return whether it grew.

    resize2fs ignores the ``?offset=`` when it fits the *file* to the new size: a file longer than
    blocks x block_size is truncated there (cutting off the partition's tail), a shorter one gets
    a byte written inside the partition. When the file is exactly that long, neither happens; so
    we set that length for the duration (writes past it just extend the file) and restore it
    after. This needs the growth to be at least ``offset``, or the cut would reach the data;
    smaller growths are skipped (the filesystem then ends a little before its partition).
    """
    new_file_size = blocks * block_size
    if blocks <= old_blocks or new_file_size < offset + old_blocks * block_size:
        return False
    size = disk.stat().st_size
    os.truncate(disk, new_file_size)
    try:
        tools.run(["resize2fs", device(disk, offset), str(blocks)], timeout=3600)
    finally:
        os.truncate(disk, size)
    return True


# -- the filesystem interface (imaging.disk.filesystems) -----------------------------------------


def info(image: Path, offset: int = 0) -> FsInfo:
    fs = read_superblock(device(image, offset))
    return FsInfo(fs.fs_type, fs.uuid, fs.label, fs.block_size, fs.block_count, fs.used_bytes)


def check(image: Path, offset: int = 0, size: int | None = None, *, repair: bool = False) -> FsckVerdict:
    """e2fsck -f: read-only (-n), or answering yes to every fix on a copy that is ours."""
    return fsck(device(image, offset), repair=repair)


def tidy(image: Path) -> FsckVerdict:
    """Our partitionless copy: journal replayed, repaired, free blocks punched out as holes."""
    return fsck(device(image), repair=True, discard=True)


def grow(image: Path, offset: int, size: int) -> bool:
    """Grow the filesystem at ``offset`` to fill ``size`` bytes. Partitionless (offset 0), the
    file is cut to whole blocks and checked first; in a disk, the caller checked it just before
    (placement), as resize2fs requires."""
    fs = read_superblock(device(image, offset))
    blocks = size // fs.block_size
    if blocks <= fs.block_count:
        return False
    if offset == 0:
        os.truncate(image, blocks * fs.block_size)
        fsck(device(image), repair=True)  # resize2fs wants a checked filesystem
        tools.run(["resize2fs", image, str(blocks)], timeout=3600)
        return True
    return resize_in_disk(image, offset, blocks, fs.block_size, fs.block_count)


def mount_options() -> list[str]:
    return []
