"""Stage 30-bootable, part 1: the partition layout, its arithmetic, and the filesystem placed in it.

A BIOS disk is the original's: MBR, partition 1. A UEFI or hybrid disk (``--firmware``) is GPT,
laid out as Ubuntu's and Debian's cloud images are: the root stays partition 1 (found by
UUID either way), a BIOS boot partition (14, hybrid only: GRUB's core image, which has no gap
before partition 1 on GPT) and an EFI system partition (15, FAT) come first on the disk, and the
backup GPT takes the disk's last 33 sectors. The arithmetic shows where each goes.

The original procedure made a new filesystem in the partition and rsync'ed the files across,
working out the offset and block count from ``fdisk -l``. We keep its arithmetic, shown as a
table, but by default place the instance's *own* filesystem: a sparse block copy into the
partition, e2fsck, and resize2fs to fill it. That keeps the UUID, features, xattrs and hard
links, needs no mount, and is several times faster. The original path (mkfs + mount + rsync)
stays available for when the filesystem itself must change.
"""

from __future__ import annotations

import dataclasses
import math
import os
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaging import sparse, tools
from imaging.config import FIRMWARE_PLATFORMS, Firmware, Layout, Placement, parse_disk_size
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

# GPT: 128 entries of 128 bytes after the header at LBA 1; the backup copy at the disk's end.
GPT_ENTRY_SECTORS = 32
GPT_BACKUP_SECTORS = GPT_ENTRY_SECTORS + 1
BIOS_BOOT_NUMBER, ESP_NUMBER = 14, 15
BIOS_BOOT_BYTES = MIB  # GRUB's core image for i386-pc with the filesystem modules: ~60 KiB
# The ESP: FAT32 (which needs at least 65525 clusters) of the size Debian's and Ubuntu's cloud
# images give it, room for the signed shim, GRUB and MokManager several times over.
ESP_BYTES = 128 * MIB
GPT_TYPES = {
    "root": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",  # Linux filesystem data
    "bios": "21686148-6449-6E6F-744E-656564454649",  # BIOS boot partition
    "esp": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",  # EFI system partition
}

_TYPE_NAMES = {
    GPT_TYPES["root"]: "Linux filesystem",
    GPT_TYPES["bios"]: "BIOS boot",
    GPT_TYPES["esp"]: "EFI System",
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
    firmware: str = "bios"
    scheme: str = "dos"  # the partition table: dos (MBR) or gpt
    bios_boot_start: int = 0  # hybrid: partition 14
    bios_boot_sectors: int = 0
    esp_start: int = 0  # uefi and hybrid: partition 15
    esp_sectors: int = 0

    @property
    def grows(self) -> bool:
        return self.block_count > self.fs_block_count

    @property
    def platforms(self) -> tuple[str, ...]:
        return FIRMWARE_PLATFORMS[Firmware(self.firmware)]

    def arithmetic(self) -> Table:
        """The numbers of the original procedure's step 2, each with how it is worked out."""
        if self.scheme == "gpt":
            return self._gpt_arithmetic()
        s, e = self.start_sector, self.end_sector
        rows = [
            ("disk", "disk size / sector size", f"{self.disk_bytes:,} B / {SECTOR}", f"{self.disk_sectors:,} sectors"),
            ("geometry", "heads x sectors/track, cylinders", f"{HEADS} x {SECTORS_PER_TRACK}",
             f"{self.cylinders:,} cylinders"),
            ("start", "first sector of partition 1",
             "1 MiB / 512 (aligned)" if self.layout == "aligned" else "track 0 holds the MBR (legacy)", f"{s:,}"),
            ("end", "last sector of partition 1",
             "last sector of the disk" if self.layout == "aligned" else "last whole cylinder x 16065 - 1", f"{e:,}"),
        ]  # fmt: skip
        return Table(
            [*rows, *self._partition_rows()], ["quantity", "meaning", "formula", "value"], index="quantity"
        )

    def _partition_rows(self) -> list[tuple[str, str, str, str]]:
        """Partition 1's offset and size and the filesystem's blocks in it: MBR and GPT alike."""
        s, e, bs = self.start_sector, self.end_sector, self.block_size
        return [
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

    def _gpt_arithmetic(self) -> Table:
        s, e, n = self.start_sector, self.end_sector, self.disk_sectors
        rows = [
            ("disk", "disk size / sector size", f"{self.disk_bytes:,} B / {SECTOR}", f"{n:,} sectors"),
            ("protective MBR", "LBA 0: one partition of type ee over the disk; GRUB's boot code for BIOS", "", "0"),
            ("GPT header", "LBA 1", "", "1"),
            ("GPT entries", f"128 entries x 128 B = {GPT_ENTRY_SECTORS} sectors", "2 .. 2 + 32 - 1", "2 .. 33"),
        ]  # fmt: skip
        if self.bios_boot_sectors:
            b, bn = self.bios_boot_start, self.bios_boot_sectors
            rows.append((f"BIOS boot ({BIOS_BOOT_NUMBER})", "GRUB's core image for BIOS: 1 MiB at 1 MiB",
                         f"{b:,} .. {b:,} + {bn:,} - 1", f"{b:,} .. {b + bn - 1:,}"))  # fmt: skip
        if self.esp_sectors:
            a, an = self.esp_start, self.esp_sectors
            rows.append((f"EFI system ({ESP_NUMBER})", f"FAT, {human_bytes(an * SECTOR)}, after the partition before it",
                         f"{a:,} .. {a:,} + {an:,} - 1", f"{a:,} .. {a + an - 1:,}"))  # fmt: skip
        rows += [
            ("start", "first sector of partition 1 (the root)", "the next MiB after the ESP", f"{s:,}"),
            ("end", "last usable sector: before the backup GPT", f"{n:,} - {GPT_BACKUP_SECTORS} - 1", f"{e:,}"),
            ("backup GPT", "entries, then the header in the disk's last sector",
             f"{n:,} - {GPT_BACKUP_SECTORS} .. {n:,} - 1", f"{n - GPT_BACKUP_SECTORS:,} .. {n - 1:,}"),
        ]  # fmt: skip
        return Table(
            [*rows, *self._partition_rows()], ["quantity", "meaning", "formula", "value"], index="quantity"
        )


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def plan_layout(
    fs_bytes: int,
    block_size: int,
    *,
    layout: Layout | str = Layout.aligned,
    disk_size: str = "auto",
    firmware: Firmware | str = Firmware.bios,
    esp_bytes: int = ESP_BYTES,
    multiple: int = MIB,
) -> DiskLayout:
    """Where partition 1 goes and how big everything is, for a filesystem of ``fs_bytes``.
    ``multiple``: what a GPT disk's size is rounded up to, so that the format's writer, which
    pads to it (a GiB for GCE), keeps the backup GPT in the disk's last sector."""
    layout, firmware = Layout(layout), Firmware(firmware)
    kind, amount = parse_disk_size(disk_size)
    if firmware is not Firmware.bios:
        if layout is Layout.legacy:
            raise ParameterError(
                f"firmware {firmware.value} needs a GPT disk; layout legacy is MBR for BIOS only"
            )
        return _plan_gpt(
            fs_bytes, block_size, kind, amount, disk_size, firmware, esp_bytes, math.lcm(MIB, multiple)
        )
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
            "for BIOS with an MBR, as in the original procedure (--firmware uefi or hybrid lays out GPT)"
        )
    return _layout(layout, fs_bytes, block_size, disk_sectors, start, end)


def _layout(layout: Layout, fs_bytes: int, block_size: int, disk_sectors: int, start: int, end: int,
            **gpt: Any) -> DiskLayout:  # fmt: skip
    """The layout with partition 1 from ``start`` to ``end``: its offset, size and blocks."""
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
        **gpt,
    )


def _plan_gpt(fs_bytes: int, block_size: int, kind: str, amount: int, disk_size: str, firmware: Firmware,
              esp_bytes: int, multiple: int) -> DiskLayout:  # fmt: skip
    first = MIB // SECTOR
    bios_sectors = BIOS_BOOT_BYTES // SECTOR if firmware is Firmware.hybrid else 0
    esp_start = first + bios_sectors
    esp_sectors = _round_up(max(esp_bytes, ESP_BYTES), MIB) // SECTOR
    start = esp_start + esp_sectors
    # The root's whole MiBs, then one more MiB that holds the backup GPT (33 sectors) at the end.
    needed = start * SECTOR + _round_up(fs_bytes, MIB) + MIB
    extra = {"auto": needed, "extra": needed + _round_up(amount, MIB), "absolute": _round_up(amount, MIB)}
    want = extra[kind]
    if want < needed:
        raise ParameterError(
            f"disk size {disk_size} is smaller than the {human_bytes(needed)} the filesystem needs"
        )
    disk_sectors = _round_up(want, multiple) // SECTOR
    end = disk_sectors - GPT_BACKUP_SECTORS - 1
    return _layout(Layout.aligned, fs_bytes, block_size, disk_sectors, start, end, firmware=firmware.value,
                   scheme="gpt", bios_boot_start=first if bios_sectors else 0, bios_boot_sectors=bios_sectors,
                   esp_start=esp_start, esp_sectors=esp_sectors)  # fmt: skip


def firmware_of(ws: Workspace) -> dict[str, object]:
    """What 20-migrate decided the disk boots under (guest/firmware.py), BIOS if it did not run."""
    found = ws.result("20-migrate").get("firmware") if ws.has_result("20-migrate") else None
    return (
        dict(found)
        if found
        else {"asked": "bios", "firmware": "bios", "platforms": ["bios"], "secure_boot": False}
    )


def firmware_table(fw: dict[str, object]) -> Table:
    """The firmware decision as 20-migrate recorded it, for 30-bootable's notebook."""
    chain = " -> ".join(str(fw[k]) for k in ("shim", "grub") if fw.get(k)) or "(none)"
    platforms = fw.get("platforms")
    why = fw.get("why")
    rows = [
        ("asked", str(fw.get("asked", "")), "--firmware (auto: hybrid where the target and guest boot both)"),
        ("disk", str(fw.get("firmware", "")), "bios: MBR; uefi and hybrid: GPT with an ESP"),
        ("boots under", ", ".join(platforms if isinstance(platforms, list) else []), "50-verify boots each"),
        ("Secure Boot", "yes" if fw.get("secure_boot") else "no", "the guest's own signed chain, where it has one"),
        ("signed chain", chain, "read from the guest"),
        ("kernel under UEFI", str(fw.get("kernel_efi") or "-"), "signed" if fw.get("kernel_signed") else "not signed"),
        ("ESP volume id", str(fw.get("esp_uuid") or "-"), "what the guest's fstab mounts on /boot/efi"),
    ]  # fmt: skip
    rows += [("note", str(line), "") for line in (why if isinstance(why, list) else [])]
    return Table(rows, ["quantity", "value", "why"])


def esp_bytes(ws: Workspace) -> int:
    """The new ESP's size: the distributions' size, or the source ESP's when that is larger."""
    source = ws.result("00-acquire").get("esp") or {}
    return max(ESP_BYTES, _round_up(int(source.get("bytes") or 0), MIB))


def disk_id(fs_uuid: str, table: str = "dos") -> str:
    """A disk identifier derived from the filesystem's UUID: the same instance gives the same MBR
    (or GPT, whose partitions' GUIDs are derived the same way)."""
    if table == "gpt":
        return str(uuidlib.uuid5(uuidlib.UUID(fs_uuid), "imaging disk")).upper()
    return f"0x{uuidlib.UUID(fs_uuid).bytes[:4].hex()}"


def write_partition_table(disk: Path, layout: DiskLayout, label_id: str) -> None:
    """MBR: one bootable Linux partition; GPT: the root, the BIOS boot partition and the ESP;
    exactly where the layout says."""
    if layout.scheme == "gpt":
        _write_gpt(disk, layout, label_id)
        return
    script = (
        "label: dos\n"
        f"label-id: {label_id}\n"
        "unit: sectors\n\n"
        f"start={layout.start_sector}, size={layout.partition_sectors}, type=83, bootable\n"
    )
    tools.run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", disk], input=script, timeout=120)


def _write_gpt(disk: Path, layout: DiskLayout, label_id: str) -> None:
    base = uuidlib.UUID(label_id)
    rows = [(1, layout.start_sector, layout.partition_sectors, "root")]
    if layout.bios_boot_sectors:
        rows.append((BIOS_BOOT_NUMBER, layout.bios_boot_start, layout.bios_boot_sectors, "bios"))
    rows.append((ESP_NUMBER, layout.esp_start, layout.esp_sectors, "esp"))
    # sfdisk numbers a partition after the digits ending its line's device name.
    lines = [
        f"{disk.name}{n} : start={start}, size={size}, type={GPT_TYPES[kind]}, "
        f'uuid={str(uuidlib.uuid5(base, kind)).upper()}, name="{kind}"'
        for n, start, size, kind in rows
    ]
    script = (
        f"label: gpt\nlabel-id: {label_id}\nunit: sectors\nfirst-lba: 34\ntable-length: 128\n\n"
        + "\n".join(lines)
        + "\n"
    )
    tools.run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", disk], input=script, timeout=120)
    verified = tools.run(["sfdisk", "--verify", disk], ok_codes=range(256), timeout=60)
    if verified.exit_code != 0 or "No errors detected" not in verified.stdout:
        raise ParameterError(
            f"sfdisk does not verify the GPT it wrote: {verified.stderr_tail(1) or verified.stdout.strip()}"
        )


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
    # The instance's data placed, and room for the bootloader, the ESP and the filesystem's growth.
    sparse.check_space(ws.work, sparse.data_bytes(ws.instance) + (32 << 20), "build the bootable disk")
    sparse.create_sparse(part, layout.disk_bytes)
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
    # After the filesystem is grown: resize2fs sets the file's length for a while (ext.py), which
    # would cut off a backup GPT at the disk's end.
    write_partition_table(part, layout, disk_id(str(instance["uuid"]), layout.scheme))
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
                "Type": _TYPE_NAMES.get(p.type.upper(), _TYPE_NAMES.get(p.type.lower(), p.type)),
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
    firmware: str = "bios"
    platforms: list[str] = dataclasses.field(default_factory=lambda: ["bios"])
    secure_boot: bool = False


def finish_disk(ws: Workspace, layout: DiskLayout, secure_boot: bool = False) -> Disk:
    """Check the finished disk (read-only), then give it its final name ``work/disk.raw``."""
    part = sparse.part_path(ws.disk)
    if not part.exists():
        raise ParameterError("there is no disk being built: run place_filesystem first")
    fs = filesystems.of(str(images.probe(part, layout.offset_bytes, layout.partition_bytes).type))
    verdict = fs.check(part, layout.offset_bytes, layout.partition_bytes)
    found = fs.info(part, layout.offset_bytes)
    table = images.read_partition_table(part)
    assert table is not None
    if layout.scheme == "gpt":
        verified = tools.run(["sfdisk", "--verify", part], ok_codes=range(256), timeout=60)
        if verified.exit_code != 0 or "No errors detected" not in verified.stdout:
            raise ParameterError(
                f"the disk's GPT does not verify: {verified.stdout.strip().splitlines()[-1:]}"
            )
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
        firmware=layout.firmware,
        platforms=list(layout.platforms),
        secure_boot=secure_boot and "uefi" in layout.platforms,
    )
