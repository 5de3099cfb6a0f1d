"""Placing the instance's filesystem in partition 1: ours against the original procedure.

ours      sparse block copy into the partition + e2fsck -fy + resize2fs to fill it (no mount)
original  mkfs.ext3 in the partition + mount both + rsync --inplace -a + umount (the readme's step 2)
copy      our sparse copy against ``cp --sparse=always`` of the same image

Same instance (~1 GiB of files in a 2 GiB ext3), same 3 GiB partition, page cache warm for all;
every placement ends with the disk file fsync'ed (umount flushes the original's, so we flush ours).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import WORK, ext3_with_files, run, timed  # noqa: E402
from imaging import sparse  # noqa: E402
from imaging.disk import bootable, ext

GIB = 1 << 30


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> list[tuple[str, str, str]]:
    WORK.mkdir(parents=True, exist_ok=True)
    instance = ext3_with_files(WORK / "files-1g.img", "2G", GIB)
    info = ext.read_superblock(ext.device(instance))
    layout = bootable.plan_layout(info.size_bytes, info.block_size, disk_size="+1G")
    target = WORK / "disk.raw"
    offset = layout.offset_bytes

    def fresh_disk() -> None:
        target.unlink(missing_ok=True)
        sparse.create_sparse(target, layout.disk_bytes)

    def ours() -> None:
        sparse.copy_range(instance, target, dst_offset=offset, desc=None)
        ext.fsck(ext.device(target, offset), repair=True)
        ext.resize_in_disk(target, offset, layout.block_count, layout.block_size, layout.fs_block_count)
        fsync(target)

    def original() -> None:
        run(
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext3",
            "-b",
            "4096",
            "-E",
            f"offset={offset}",
            target,
            layout.block_count,
        )
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            run("mount", "-o", "loop,ro", instance, a)
            run("mount", "-o", f"loop,offset={offset}", target, b)
            try:
                run("rsync", "--inplace", "-a", f"{a}/", f"{b}/")
            finally:
                run("umount", b)
                run("umount", a)
        fsync(target)

    copy_out = WORK / "copy.img"

    def our_copy() -> None:
        copy_out.unlink(missing_ok=True)
        sparse.create_sparse(copy_out, instance.stat().st_size)
        sparse.copy_range(instance, copy_out, desc=None)

    def cp_copy() -> None:
        copy_out.unlink(missing_ok=True)
        run("cp", "--sparse=always", instance, copy_out)

    sparse.sha256(instance, desc=None)  # warm the page cache
    t_ours = timed(ours, setup=fresh_disk)
    t_orig = timed(original, setup=fresh_disk)
    t_copy = timed(our_copy)
    t_cp = timed(cp_copy)
    for p in (target, copy_out):
        p.unlink(missing_ok=True)
    data = sparse.data_bytes(instance)
    rows = [
        ("place: copy + e2fsck + resize2fs (ours)", f"{t_ours:.2f} s", ""),
        (
            "place: mkfs + mount + rsync (original)",
            f"{t_orig:.2f} s",
            f"ours is {t_orig / t_ours:.1f}x faster",
        ),
        (
            f"copy {data / GIB:.2f} GiB of data (ours)",
            f"{t_copy:.2f} s",
            f"{data / t_copy / (1 << 20):.0f} MiB/s",
        ),
        ("cp --sparse=always", f"{t_cp:.2f} s", f"ours runs at {t_cp / t_copy:.2f}x cp's speed"),
    ]
    return rows


if __name__ == "__main__":
    for row in main():
        print(" | ".join(row))
