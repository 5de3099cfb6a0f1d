"""Stage 30-bootable, part 1: the partition layout, its arithmetic, and the filesystem placed in it.

The original procedure made a new filesystem in the partition and rsync'ed the files across,
working out the offset and block count from ``fdisk -l``. We keep its arithmetic, shown as a
table, but by default place the instance's *own* filesystem: a sparse block copy into the
partition, e2fsck, and resize2fs to fill it. That keeps the UUID, features, xattrs and hard
links, needs no mount, and is several times faster. The original path (mkfs + mount + rsync)
stays available for when the filesystem itself must change.
"""

from __future__ import annotations

import math
import os
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from imaging import sparse, tools
from imaging.config import Layout, Placement, parse_disk_size
from imaging.disk import ext, filesystems, images, mounts
from imaging.errors import ParameterError
from imaging.records import Record, human_bytes
from imaging.tables import Table
from imaging.workspace import Workspace

SECTOR = 512
MIB = 1 << 20
HEADS = 255
SECTORS_PER_TRACK = 63
CYLINDER = HEADS * SECTORS_PER_TRACK  # 16065 sectors, the unit legacy partitions ended on
# An MBR partition table counts sectors in 32 bits: sfdisk refuses a disk of more sectors.
MBR_MAX_SECTORS = 2**32 - 1

_TYPE_NAMES = {
    "83": "Linux",
    "82": "Linux swap / Solaris",
    "8e": "Linux LVM",
    "5": "Extended",
    "7": "HPFS/NTFS/exFAT",
}


@dataclass(frozen=True)
class DiskLayout(Record):
    layout: str
    sector_size: int
    disk_bytes: int
    disk_sectors: int
    cylinders: int
    start_sector: int
    end_sector: int
    partition_sectors: int
    offset_bytes: int
    partition_bytes: int
    block_size: int
    block_count: int
    fs_block_count: int

    @property
    def grows(self) -> bool:
        return self.block_count > self.fs_block_count

    def arithmetic(self) -> Table:
        """The numbers of the original procedure's step 2, each with how it is worked out."""
        s, e, bs = self.start_sector, self.end_sector, self.block_size
        rows = [
            ("disk", "disk size / sector size", f"{self.disk_bytes:,} B / {SECTOR}", f"{self.disk_sectors:,} sectors"),
            ("geometry", "heads x sectors/track, cylinders", f"{HEADS} x {SECTORS_PER_TRACK}",
             f"{self.cylinders:,} cylinders"),
            ("start", "first sector of partition 1",
             "1 MiB / 512 (aligned)" if self.layout == "aligned" else "track 0 holds the MBR (legacy)", f"{s:,}"),
            ("end", "last sector of partition 1",
             "last sector of the disk" if self.layout == "aligned" else "last whole cylinder x 16065 - 1", f"{e:,}"),
            ("offset", "sector_size x start", f"{SECTOR} x {s:,}", f"{self.offset_bytes:,} bytes"),
            ("partition size", "(end - start + 1) x sector_size", f"({e:,} - {s:,} + 1) x {SECTOR}",
             f"{self.partition_bytes:,} bytes ({human_bytes(self.partition_bytes)})"),
            ("block size", "the instance's filesystem", "", f"{bs:,} bytes"),
            ("block_total", "(end - start + 1) x sector_size / block_size", f"({e:,} - {s:,} + 1) x {SECTOR} / {bs}",
             f"{self.block_count:,} blocks"),
            ("filesystem now", "blocks in the instance's filesystem", "", f"{self.fs_block_count:,} blocks"),
            ("growth", "block_total - filesystem now", "",
             f"{self.block_count - self.fs_block_count:,} blocks "
             f"({human_bytes((self.block_count - self.fs_block_count) * bs)})"),
        ]  # fmt: skip
        return Table(rows, ["quantity", "meaning", "formula", "value"], index="quantity")


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def plan_layout(
    fs_bytes: int, block_size: int, *, layout: Layout | str = Layout.aligned, disk_size: str = "auto"
) -> DiskLayout:
    """Where partition 1 goes and how big everything is, for a filesystem of ``fs_bytes``."""
    layout = Layout(layout)
    kind, amount = parse_disk_size(disk_size)
    if layout is Layout.aligned:
        start = MIB // SECTOR
        needed = start * SECTOR + _round_up(fs_bytes, MIB)
        want = {
            "auto": needed,
            "extra": needed + _round_up(amount, MIB),
            "absolute": _round_up(amount, MIB),
        }[kind]
        if want < needed:
            raise ParameterError(
                f"disk size {disk_size} is smaller than the {human_bytes(needed)} the filesystem needs"
            )
        disk_sectors = want // SECTOR
        end = disk_sectors - 1
    else:
        start = SECTORS_PER_TRACK
        needed_cyl = math.ceil((start + _round_up(fs_bytes, SECTOR) // SECTOR) / CYLINDER)
        if kind == "absolute":
            disk_sectors = amount // SECTOR
            if disk_sectors // CYLINDER < needed_cyl:
                raise ParameterError(
                    f"disk size {disk_size} is smaller than the {human_bytes(needed_cyl * CYLINDER * SECTOR)} "
                    "the filesystem needs in whole cylinders"
                )
        else:
            extra = math.ceil(amount / (CYLINDER * SECTOR)) if kind == "extra" else 0
            disk_sectors = (needed_cyl + extra) * CYLINDER
        end = (disk_sectors // CYLINDER) * CYLINDER - 1
    if disk_sectors > MBR_MAX_SECTORS:
        size = disk_sectors * SECTOR
        raise ParameterError(
            f"the bootable disk would be {human_bytes(size)} ({size:,} bytes), over what its MBR partition "
            f"table addresses: {MBR_MAX_SECTORS * SECTOR:,} bytes (2**32 - 1 sectors); disks are laid out "
            "with MBR only (BIOS boot, as in the original procedure), not GPT"
        )
    part_sectors = end - start + 1
    return DiskLayout(
        layout=layout.value,
        sector_size=SECTOR,
        disk_bytes=disk_sectors * SECTOR,
        disk_sectors=disk_sectors,
        cylinders=disk_sectors // CYLINDER,  # whole cylinders, as fdisk counts them
        start_sector=start,
        end_sector=end,
        partition_sectors=part_sectors,
        offset_bytes=start * SECTOR,
        partition_bytes=part_sectors * SECTOR,
        block_size=block_size,
        block_count=part_sectors * SECTOR // block_size,
        fs_block_count=fs_bytes // block_size,
    )


def disk_id(fs_uuid: str) -> str:
    """A disk identifier derived from the filesystem's UUID: the same instance gives the same MBR."""
    return f"0x{uuidlib.UUID(fs_uuid).bytes[:4].hex()}"


def write_partition_table(disk: Path, layout: DiskLayout, label_id: str) -> None:
    """One bootable Linux partition, MBR, exactly where the layout says."""
    script = (
        "label: dos\n"
        f"label-id: {label_id}\n"
        "unit: sectors\n\n"
        f"start={layout.start_sector}, size={layout.partition_sectors}, type=83, bootable\n"
    )
    tools.run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", disk], input=script, timeout=120)


@dataclass(frozen=True)
class Placed(Record):
    """How the filesystem got into partition 1."""

    placement: str
    fs_type: str
    uuid: str
    copied_bytes: int
    copy_seconds: float
    fsck: str
    grown: bool
    block_count: int
    seconds: float


def instance_now(ws: Workspace) -> dict[str, object]:
    """What 00-acquire recorded of the instance, with its filesystem's size as it is now (20-migrate
    grows it to install packages)."""
    instance = ws.result("00-acquire")
    fs = filesystems.of(str(instance["fs_type"])).info(ws.instance)
    return {
        **instance,
        "size_bytes": fs.size_bytes,
        "block_size": fs.block_size,
        "block_count": fs.block_count,
    }


def place_filesystem(
    ws: Workspace,
    instance: dict[str, object],
    layout: DiskLayout,
    placement: Placement | str = Placement.copy,
    fs_type: str = "keep",
) -> Placed:
    """Build ``work/disk.raw`` (as its in-progress name): partition table + the instance's filesystem.

    Placement copy: a sparse copy into the partition, the filesystem's own check (on our copy;
    e2fsck may repair it, xfs_repair and btrfs check only read) and its own way to grow into the
    partition. The disk stays under its ``.part`` name until :func:`finish_disk` renames it; the
    bootloader goes in between.
    """
    placement = Placement(placement)
    tools.require_tools("sfdisk", reason="partition the disk", hint="apt install fdisk")
    import time

    t0 = time.monotonic()
    kind = str(instance["fs_type"])
    fs = filesystems.of(kind)
    part = sparse.part_path(ws.disk)
    part.unlink(missing_ok=True)
    sparse.create_sparse(part, layout.disk_bytes)
    write_partition_table(part, layout, disk_id(str(instance["uuid"])))
    offset, size = layout.offset_bytes, layout.partition_bytes
    if placement is Placement.copy:
        if fs_type not in ("keep", kind):
            raise ParameterError(
                f"fs_type {fs_type} needs placement mkfs (copy keeps the instance's {kind})"
            )
        stats = sparse.copy_range(ws.instance, part, dst_offset=offset, desc="place filesystem")
        verdict = fs.check(part, offset, size, repair=True)
        grown = fs.grow(part, offset, size)
        copied, copy_seconds = stats.bytes, stats.seconds
    else:
        if kind not in ext.TYPES:
            raise ParameterError(
                f"placement mkfs makes ext filesystems; the instance's {kind} is placed by copy"
            )
        kind = kind if fs_type == "keep" else fs_type
        copied, copy_seconds = mounts.copy_files_to_new_fs(ws.instance, part, offset, layout.block_count,
                                                           layout.block_size, kind, str(instance["uuid"]),
                                                           str(instance.get("label", "")))  # fmt: skip
        fs = filesystems.of(kind)
        verdict = fs.check(part, offset, size, repair=True)
        grown = False
    return Placed(
        placement=placement.value,
        fs_type=kind,
        uuid=str(instance["uuid"]),
        copied_bytes=copied,
        copy_seconds=round(copy_seconds, 3),
        fsck=str(verdict),
        grown=grown,
        block_count=fs.info(part, offset).block_count,
        seconds=round(time.monotonic() - t0, 3),
    )


def partition_table(disk: Path) -> Table:
    """``fdisk -l`` of a disk image as a table (read from sfdisk's JSON, not scraped)."""
    table = images.read_partition_table(disk)
    rows = []
    for p in table.partitions if table else ():
        rows.append(
            {
                "Device": f"{disk.name}{p.number}",
                "Boot": "*" if p.bootable else "",
                "Start": p.start,
                "End": p.end,
                "Sectors": p.size,
                "Size": human_bytes(p.size * table.sector_size),  # type: ignore[union-attr]
                "Id": p.type,
                "Type": _TYPE_NAMES.get(p.type.lower(), p.type),
            }
        )
    return (
        Table.from_dicts(rows)
        if rows
        else Table([], ["Device", "Boot", "Start", "End", "Sectors", "Size", "Id", "Type"])
    )


@dataclass(frozen=True)
class Disk(Record):
    path: str
    disk_bytes: int
    data_bytes: int
    label: str
    disk_id: str
    start_sector: int
    offset_bytes: int
    fs_type: str
    uuid: str
    block_size: int
    block_count: int
    fsck: str


def finish_disk(ws: Workspace, layout: DiskLayout) -> Disk:
    """Check the finished disk (read-only), then give it its final name ``work/disk.raw``."""
    part = sparse.part_path(ws.disk)
    if not part.exists():
        raise ParameterError("there is no disk being built: run place_filesystem first")
    fs = filesystems.of(str(images.probe(part, layout.offset_bytes, layout.partition_bytes).type))
    verdict = fs.check(part, layout.offset_bytes, layout.partition_bytes)
    found = fs.info(part, layout.offset_bytes)
    table = images.read_partition_table(part)
    assert table is not None
    os.replace(part, ws.disk)
    return Disk(
        path=str(ws.disk),
        disk_bytes=ws.disk.stat().st_size,
        data_bytes=sparse.data_bytes(ws.disk),
        label=table.label,
        disk_id=table.id,
        start_sector=layout.start_sector,
        offset_bytes=layout.offset_bytes,
        fs_type=found.fs_type,
        uuid=found.uuid,
        block_size=found.block_size,
        block_count=found.block_count,
        fsck=str(verdict),
    )
