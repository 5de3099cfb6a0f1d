"""Placing the instance's filesystem in partition 1: ours against the original procedure.

ours      sparse block copy into the partition + e2fsck -fy + resize2fs to fill it (no mount)
original  mkfs.ext3 in the partition + mount both + rsync --inplace -a + umount (the readme's step 2)
copy      our sparse copy against ``cp --sparse=always`` of the same image
by filesystem  the same real files (1.2 GB of this host's /usr) in ext4, XFS and btrfs made by the
          host's own mkfs, each placed the same way with its own tools (copy + check + grow):
          XFS and btrfs against ext4, whose placement is the reference
LVM       the root volume of a volume group read out of a 20 GiB and a 200 GiB disk holding the
          same data: what it costs against the disk's size, and against cp of the bare filesystem

Same instance (~1 GiB of files in a 2 GiB ext3), same 3 GiB partition, page cache warm for all;
every placement ends with the disk file fsync'ed (umount flushes the original's, so we flush ours).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import WORK, ext3_with_files, filesystem_of, lvm_disk, real_tree, run, timed  # noqa: E402
from imaging import sparse  # noqa: E402
from imaging.disk import bootable, ext, filesystems, images, lvm  # noqa: E402

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
    return rows + by_filesystem() + volumes()


def _place(kind: str, image: Path, target: Path) -> float:
    """Median time to place ``image`` (a ``kind`` filesystem) into a fresh disk, by its own tools."""
    fs = filesystems.of(kind)
    info = fs.info(image)
    layout = bootable.plan_layout(info.size_bytes, info.block_size, disk_size="+1G")

    def fresh_disk() -> None:
        target.unlink(missing_ok=True)
        sparse.create_sparse(target, layout.disk_bytes)

    def place() -> None:
        sparse.copy_range(image, target, dst_offset=layout.offset_bytes, desc=None)
        fs.check(target, layout.offset_bytes, layout.partition_bytes, repair=True)
        fs.grow(target, layout.offset_bytes, layout.partition_bytes)
        fsync(target)

    sparse.sha256(image, desc=None)  # warm the page cache
    return timed(place, setup=fresh_disk)


def by_filesystem() -> list[tuple[str, str, str]]:
    """Placement of the same real files in each filesystem, by its own tools, against ext4's."""
    tree = real_tree(WORK / "real-usr.tree")
    target = WORK / "disk.raw"
    rows, base = [], 0.0
    for kind in ("ext4", "xfs", "btrfs"):
        image = filesystem_of(tree, WORK / f"real-usr.{kind}", kind)
        t = _place(kind, image, target)
        base = base or t
        check, grow = filesystems.of(kind).TOOLS
        data = f"{sparse.data_bytes(image) / (1 << 20):.0f} MiB of data"
        rows.append((f"place {kind}: copy + {check} + {grow}", f"{t:.2f} s",
                     f"{data}; {t / base:.2f}x ext4's" if kind != "ext4" else f"{data}; the reference"))  # fmt: skip
    target.unlink(missing_ok=True)
    return rows


def _read_volume(disk: Path, out: Path) -> float:
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    (vg,) = lvm.read_volume_groups(disk, images.read_partition_table(disk))
    lvm.copy_volume(disk, next(lv for lv in vg.lvs if lv.name == "root"), out, desc=None)
    return time.perf_counter() - t0


def volumes(repeat: int = 9) -> list[tuple[str, str, str]]:
    """A root volume read out of its volume group: cost follows the data, not the disk. The two
    disks alternate (the copy's own writeback varies more from run to run than they differ)."""
    fs = filesystem_of(real_tree(WORK / "real-usr.tree"), WORK / "real-usr.ext4", "ext4")
    out = WORK / "volume.raw"
    disks = {size: lvm_disk(WORK / f"lvm-{size}g.img", size << 30, fs) for size in (20, 200)}
    times: dict[int, list[float]] = {size: [] for size in disks}
    for disk in disks.values():
        _read_volume(disk, out)  # warm the page cache
    for _ in range(repeat):
        for size, disk in disks.items():
            times[size].append(_read_volume(disk, out))
    median = {size: statistics.median(t) for size, t in times.items()}
    rows = [(f"LVM: root volume out of a {size} GiB disk", f"{median[size]:.2f} s",
             f"median of {repeat}, alternating; {sparse.data_bytes(disks[size]) / (1 << 20):.0f} MiB of data on the disk")
            for size in disks]  # fmt: skip

    def cp() -> None:
        out.unlink(missing_ok=True)
        run("cp", "--sparse=always", fs, out)

    t_cp = timed(cp, repeat=repeat)
    out.unlink(missing_ok=True)
    rows.append(("cp --sparse=always of the bare filesystem", f"{t_cp:.2f} s",
                 f"200 GiB disk / 20 GiB disk: {median[200] / median[20]:.2f}x; ours / cp: {median[20] / t_cp:.2f}x"))  # fmt: skip
    return rows


if __name__ == "__main__":
    for row in main():
        print(" | ".join(row))
