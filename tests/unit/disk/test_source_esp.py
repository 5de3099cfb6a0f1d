"""The source's EFI system partition (disk/source_esp.py) and its GPT's two headers (images.gpt_problems),
through 00-acquire: small disks made here by sfdisk, mkfs.vfat and mkfs.ext4 at their partitions'
offsets, files put into the FAT and read back by mtools. No root, no mounts, no boots."""

from __future__ import annotations

import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from imaging.clouds import acquire
from imaging.disk import images, source_esp
from imaging.errors import SourceError
from imaging.run import summary
from imaging.workspace import Workspace

MIB = 1 << 20
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
ESP_ID = "12AB34CD"  # mkfs.vfat's volume id; blkid says 12AB-34CD
MTOOLS = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def sh(*argv: str | Path, input: str | None = None) -> str:
    proc = subprocess.run([str(a) for a in argv], input=input, capture_output=True, text=True, env=MTOOLS,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    return proc.stdout


def fat(disk: Path, start: int, sectors: int, *, label: str = "ESP", fat32: bool = False) -> None:
    """A FAT at sector ``start`` holding EFI/BOOT/BOOTX64.EFI."""
    bits = ["-F", "32", "-s", "1"] if fat32 else []
    sh("mkfs.vfat", *bits, "-n", label, "-i", ESP_ID, "--offset", str(start), disk, str(sectors // 2))
    image = f"{disk}@@{start * 512}"
    loader = disk.with_name("BOOTX64.EFI")
    loader.write_bytes(b"MZ not really a loader\n")
    sh("mmd", "-i", image, "::/EFI", "::/EFI/BOOT")
    sh("mcopy", "-i", image, loader, "::/EFI/BOOT/BOOTX64.EFI")


def ext4(disk: Path, start: int, sectors: int, *, root: bool = True) -> None:
    """An ext4 at sector ``start``; the root one holds /etc/fstab (how 00-acquire tells it)."""
    tree = disk.with_name(f"tree-{start}")
    (tree / "etc").mkdir(parents=True)
    if root:
        (tree / "etc" / "fstab").write_text("LABEL=root / ext4 defaults 0 1\n")
    sh("mkfs.ext4", "-q", "-L", "root" if root else "other", "-E", f"offset={start * 512}", "-d", tree, disk,
       f"{sectors // 2}k")  # fmt: skip


def gpt_disk(path: Path, *parts: tuple[int, int, str], size: int = 64 * MIB, label: str = "gpt") -> Path:
    """A disk of ``size`` with partitions (start, sectors, type) in this order."""
    with open(path, "wb") as f:
        f.truncate(size)
    lines = [f"start={start}, size={sectors}, type={kind}" for start, sectors, kind in parts]
    sh("sfdisk", "-q", path, input=f"label: {label}\n" + "\n".join(lines) + "\n")
    return path


def uefi_disk(tmp_path: Path, *, fat32: bool = False) -> Path:
    """Partition 1 the ESP (16 MiB, or 34 MiB for FAT32's clusters), 2 the root (ext4)."""
    esp_sectors = 69632 if fat32 else 32768
    disk = gpt_disk(
        tmp_path / "uefi.img", (2048, esp_sectors, source_esp.GPT_TYPE), (2048 + esp_sectors, 40960, LINUX)
    )
    fat(disk, 2048, esp_sectors, fat32=fat32)
    ext4(disk, 2048 + esp_sectors, 40960)
    return disk


def acquired(tmp_path: Path, disk: Path) -> tuple[Workspace, acquire.Instance]:
    ws = Workspace.open(tmp_path / "run")
    return ws, acquire.acquire(acquire.inspect(str(disk)), ws, hash_source=False)


def refused(disk: Path) -> str:
    with pytest.raises(SourceError) as e:
        acquire.inspect(str(disk))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_the_esp_is_copied_beside_the_root_with_its_files(tmp_path: Path) -> None:
    ws, instance = acquired(tmp_path, uefi_disk(tmp_path))
    assert instance.partition == 2 and instance.label == "root"
    assert instance.esp == {"partition": 1, "bytes": 16 * MIB, "uuid": "12AB-34CD", "label": "ESP",
                            "path": "work/esp.raw", "files": 1}  # fmt: skip
    assert instance.warnings == []
    assert ws.esp == ws.root / "work" / "esp.raw" and ws.esp.stat().st_size == 16 * MIB
    assert sh("mtype", "-i", ws.esp, "::/EFI/BOOT/BOOTX64.EFI") == "MZ not really a loader\n"
    assert images.probe(ws.esp).uuid == "12AB-34CD"
    assert not list(ws.work.glob(".*.part"))
    table = acquire.esp_table(instance.to_dict())  # as 30-bootable reads it, from the result's JSON
    assert table.columns == ["partition", "size", "volume id", "label", "files"]
    assert table.rows == [[1, "16.0 MiB", "12AB-34CD", "ESP", 1]]
    assert str(acquire.warning_list(instance)) == "(none)"


def test_an_mbr_partition_of_type_ef_is_an_esp(tmp_path: Path) -> None:
    disk = gpt_disk(tmp_path / "mbr.img", (2048, 32768, "ef"), (34816, 40960, "83"), label="dos")
    fat(disk, 2048, 32768)
    ext4(disk, 34816, 40960)
    ws, instance = acquired(tmp_path, disk)
    assert (instance.esp["partition"], instance.esp["uuid"], instance.esp["files"]) == (1, "12AB-34CD", 1)
    assert instance.warnings == []  # no GPT to check
    assert sh("mdir", "-i", ws.esp, "-b", "::/EFI/BOOT") == "::/EFI/BOOT/BOOTX64.EFI\n"


def test_an_esp_holding_ext4_is_refused(tmp_path: Path) -> None:
    disk = gpt_disk(tmp_path / "d.img", (2048, 32768, source_esp.GPT_TYPE), (34816, 40960, LINUX))
    ext4(disk, 2048, 32768, root=False)
    ext4(disk, 34816, 40960)
    assert refused(disk) == f"{disk}: the EFI system partition (partition 1) holds ext4, not FAT"


def test_an_empty_esp_is_refused(tmp_path: Path) -> None:
    disk = gpt_disk(tmp_path / "d.img", (2048, 32768, source_esp.GPT_TYPE), (34816, 40960, LINUX))
    ext4(disk, 34816, 40960)
    assert refused(disk).endswith("(partition 1) holds no filesystem blkid knows, not FAT")


def test_two_esps_are_refused_naming_both(tmp_path: Path) -> None:
    disk = gpt_disk(tmp_path / "d.img", (2048, 16384, source_esp.GPT_TYPE), (18432, 40960, LINUX),
                    (59392, 16384, source_esp.GPT_TYPE))  # fmt: skip
    fat(disk, 2048, 16384)
    fat(disk, 59392, 16384)
    ext4(disk, 18432, 40960)
    assert refused(disk) == (
        f"{disk}: partitions 1 and 3 are both EFI system partitions: cannot tell which one the firmware boots from"
    )


def test_a_source_without_partitions_has_no_esp(tmp_path: Path) -> None:
    image = tmp_path / "root.img"
    with open(image, "wb") as f:
        f.truncate(20 * MIB)
    ext4(image, 0, 40960)
    ws = Workspace.open(tmp_path / "run")
    ws.esp.write_bytes(b"an earlier attempt's")
    instance = acquire.acquire(acquire.inspect(str(image)), ws, hash_source=False)
    assert instance.source_layout == "filesystem" and instance.esp == {} and instance.warnings == []
    assert not ws.esp.exists()  # what is in work/ is what the record says
    assert acquire.esp_table(instance).rows == []


def test_a_gpt_without_an_esp(tmp_path: Path) -> None:
    disk = gpt_disk(tmp_path / "d.img", (2048, 40960, LINUX))
    ext4(disk, 2048, 40960)
    ws, instance = acquired(tmp_path, disk)
    assert instance.esp == {} and instance.warnings == [] and not ws.esp.exists()


def test_a_zeroed_backup_gpt_header_is_a_warning_in_the_record(tmp_path: Path) -> None:
    disk = uefi_disk(tmp_path)
    last = disk.stat().st_size // 512 - 1
    with open(disk, "r+b") as f:
        os.pwrite(f.fileno(), bytes(512), last * 512)
    digest = sh("sha256sum", disk)
    _, instance = acquired(tmp_path, disk)
    assert instance.warnings == [
        f"the GPT's backup header at the last sector (LBA {last}) is missing: only the primary is sound"
    ]
    assert instance.esp["partition"] == 1  # the table was read all the same
    assert sh("sha256sum", disk) == digest  # read, never repaired
    text = summary.completed("00-acquire", instance.to_dict())
    assert f"**Warning**: the GPT's backup header at the last sector (LBA {last}) is missing" in text
    assert "EFI system partition: partition 1, FAT <code>12AB-34CD</code>" in text


def damage(disk: Path, offset: int) -> None:
    with open(disk, "r+b") as f:
        byte = os.pread(f.fileno(), 1, offset)
        os.pwrite(f.fileno(), bytes([byte[0] ^ 0xFF]), offset)


def test_gpt_problems(tmp_path: Path) -> None:
    disk = gpt_disk(tmp_path / "d.img", (2048, 8192, LINUX), size=8 * MIB)
    last = 8 * MIB // 512 - 1
    assert images.gpt_problems(disk) == []
    copy = tmp_path / "copy.img"

    def problems(change: int | None = None, size: int | None = None) -> list[str]:
        copy.write_bytes(disk.read_bytes())
        if change is not None:
            damage(copy, change)
        if size is not None:
            os.truncate(copy, size)
        return images.gpt_problems(copy)

    # Header CRC32 at byte 16, the entries at LBA 2 (primary) and last - 32 (backup).
    assert problems(512 + 16) == [f"the GPT's primary header fails its checksum: the backup at the last sector "
                                  f"(LBA {last}) was read"]  # fmt: skip
    assert problems(1024 + 5) == [f"the GPT's primary header has partition entries that fail their checksum: "
                                  f"the backup at the last sector (LBA {last}) was read"]  # fmt: skip
    assert problems(last * 512 + 16) == [f"the GPT's backup header at the last sector (LBA {last}) fails its "
                                         "checksum: only the primary is sound"]  # fmt: skip
    assert problems((last - 32) * 512 + 40) == [f"the GPT's backup header at the last sector (LBA {last}) has "
                                                "partition entries that fail their checksum: only the primary "
                                                "is sound"]  # fmt: skip
    assert problems(size=12 * MIB) == [f"the GPT's backup header is not at the last sector (LBA {12 * MIB // 512 - 1}) "
                                       f"but at LBA {last}: the disk grew after partitioning?"]  # fmt: skip
    assert problems(size=6 * MIB) == [f"the GPT's backup header is not at the last sector (LBA {6 * MIB // 512 - 1}) "
                                      f"but at LBA {last}: the image ends before it: cut short?"]  # fmt: skip
    both = problems(512 + 16)
    damage(copy, last * 512 + 16)
    assert both and images.gpt_problems(copy) == [f"the GPT's primary header fails its checksum: there is no "
                                                  f"sound backup at the last sector (LBA {last}) either"]  # fmt: skip


def test_a_bad_primary_gpt_header_is_a_warning_and_the_backup_is_read(tmp_path: Path) -> None:
    disk = uefi_disk(tmp_path)
    with open(disk, "r+b") as f:
        os.pwrite(f.fileno(), bytes(512), 512)
    _, instance = acquired(tmp_path, disk)
    last = disk.stat().st_size // 512 - 1
    assert instance.warnings == [
        f"the GPT's primary header is missing: the backup at the last sector (LBA {last}) was read"
    ]
    assert (instance.partition, instance.esp["partition"]) == (2, 1)


def test_hostile_gpt_entry_counts_are_not_read(tmp_path: Path) -> None:
    disk = gpt_disk(tmp_path / "d.img", (2048, 8192, LINUX), size=8 * MIB)
    with open(disk, "r+b") as f:
        header = bytearray(os.pread(f.fileno(), 92, 512))
        struct.pack_into("<I", header, 80, 1 << 30)  # a billion entries
        struct.pack_into("<I", header, 16, 0)
        struct.pack_into("<I", header, 16, zlib.crc32(bytes(header)))
        os.pwrite(f.fileno(), bytes(header), 512)
    assert images.gpt_problems(disk)[0].startswith(
        "the GPT's primary header has 1073741824 entries of 128 bytes at LBA 2: out of bounds"
    )


def test_an_esp_not_cleanly_unmounted_is_taken_with_a_warning(tmp_path: Path) -> None:
    disk = uefi_disk(tmp_path, fat32=True)
    with open(disk, "r+b") as f:  # what Linux sets while a FAT32 is mounted read-write
        os.pwrite(f.fileno(), b"\x01", 2048 * 512 + 0x41)
    ws, instance = acquired(tmp_path, disk)
    assert instance.warnings == [
        "the EFI system partition (partition 1) was not cleanly unmounted (copied from a running "
        "instance?): its dirty bit is cleared on our copy before the check"
    ]
    assert instance.esp["files"] == 1
    assert subprocess.run(["fsck.vfat", "-n", ws.esp], capture_output=True).returncode == 0
    with open(disk, "rb") as f:
        assert os.pread(f.fileno(), 1, 2048 * 512 + 0x41) == b"\x01"  # the source as it was


def test_a_damaged_fat_is_refused_in_one_line(tmp_path: Path) -> None:
    disk = uefi_disk(tmp_path)
    with open(disk, "r+b") as f:
        # mkfs.vfat's FAT16 here: its reserved sectors, then two FATs. Clusters 3.. all point at
        # 3 in both: a loop, and the loader's chain shared with the directories'.
        reserved, _, _, _, _, per_fat = struct.unpack_from(
            "<HBHHBH", os.pread(f.fileno(), 11, 2048 * 512 + 14)
        )
        for n in range(2):
            os.pwrite(f.fileno(), b"\x03\x00" * 8, (2048 + reserved + n * per_fat) * 512 + 6)
    ws = Workspace.open(tmp_path / "run")
    with pytest.raises(SourceError) as e:
        acquire.acquire(acquire.inspect(str(disk)), ws, hash_source=False)
    message = str(e.value)
    assert message.startswith("the EFI system partition (partition 1) fails its check: fsck.vfat -n: /EFI")
    assert "\n" not in message
    assert not ws.esp.exists() and not ws.instance.exists() and not list(ws.work.glob(".*.part"))


def test_is_esp() -> None:
    part = images.Partition(1, 2048, 2048, "c12a7328-f81f-11d2-ba4b-00a0c93ec93b", False)
    assert source_esp.is_esp(part, "gpt") and not source_esp.is_esp(part, "dos")
    assert source_esp.is_esp(images.Partition(1, 2048, 2048, "ef", False), "dos")
    assert not source_esp.is_esp(images.Partition(1, 2048, 2048, "83", False), "dos")


def test_count_files_of_an_empty_fat(tmp_path: Path) -> None:
    image = tmp_path / "empty.img"
    sh("mkfs.vfat", "-C", image, "4096")
    assert source_esp.count_files(image) == 0
