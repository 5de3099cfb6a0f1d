from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imaging.disk import bootable
from imaging.errors import ParameterError

GIB = 1 << 30


def test_original_procedure_numbers() -> None:
    # The original: a 10 GiB disk, partition 1 from sector 63 to 20964824 (last whole cylinder),
    # offset 512 x 63 = 32256, and 4 KiB blocks. It computed (end - start) x 512 / 4096 = 2620595,
    # one sector short; a partition holds end - start + 1 sectors.
    layout = bootable.plan_layout(9 * GIB, 4096, layout="legacy", disk_size="10G")
    assert layout.disk_sectors == 20971520
    assert layout.start_sector == 63
    assert layout.end_sector == 20964824
    assert layout.offset_bytes == 32256
    assert layout.cylinders == 1305
    assert layout.block_count == (20964824 - 63 + 1) * 512 // 4096 == 2620595
    table = layout.arithmetic()
    assert table.cell("offset", "value") == "32,256 bytes"
    assert table.cell("block_total", "value") == "2,620,595 blocks"


def test_aligned_auto_fits_the_filesystem_exactly() -> None:
    layout = bootable.plan_layout(512 << 20, 4096, layout="aligned", disk_size="auto")
    assert layout.start_sector == 2048
    assert layout.offset_bytes == 1 << 20
    assert layout.disk_bytes == (512 << 20) + (1 << 20)
    assert layout.end_sector == layout.disk_sectors - 1
    assert layout.block_count == layout.fs_block_count == (512 << 20) // 4096
    assert not layout.grows


def test_extra_room_grows_the_filesystem() -> None:
    layout = bootable.plan_layout(512 << 20, 4096, disk_size="+1G")
    assert layout.disk_bytes == (512 << 20) + (1 << 20) + GIB
    assert layout.block_count - layout.fs_block_count == GIB // 4096
    assert layout.grows


def test_filesystem_not_a_multiple_of_a_mebibyte_is_rounded_up() -> None:
    layout = bootable.plan_layout((100 << 20) + 4096, 4096)
    assert layout.partition_bytes == 101 << 20
    assert layout.partition_bytes >= (100 << 20) + 4096


@pytest.mark.parametrize("size", ["100M", "512M"])
def test_disk_too_small_is_refused(size: str) -> None:
    with pytest.raises(ParameterError, match="smaller than"):
        bootable.plan_layout(512 << 20, 4096, disk_size=size)


def test_legacy_too_small_is_refused() -> None:
    with pytest.raises(ParameterError, match="whole cylinders"):
        bootable.plan_layout(GIB, 4096, layout="legacy", disk_size="1G")


@pytest.mark.parametrize("bad", ["lots", "10X", "-1G", ""])
def test_bad_disk_size(bad: str) -> None:
    with pytest.raises(ParameterError, match="disk size"):
        bootable.plan_layout(GIB, 4096, disk_size=bad)


@given(
    fs_mib=st.integers(min_value=1, max_value=64 << 10),
    extra_mib=st.integers(min_value=0, max_value=4096),
    block=st.sampled_from([1024, 2048, 4096]),
    legacy=st.booleans(),
)
def test_partition_always_holds_the_filesystem(
    fs_mib: int, extra_mib: int, block: int, legacy: bool
) -> None:
    fs_bytes = fs_mib << 20
    layout = bootable.plan_layout(
        fs_bytes, block, layout="legacy" if legacy else "aligned", disk_size=f"+{extra_mib}M"
    )
    assert layout.start_sector * 512 == layout.offset_bytes
    assert layout.partition_sectors == layout.end_sector - layout.start_sector + 1
    assert layout.end_sector < layout.disk_sectors
    assert layout.block_count * block <= layout.partition_bytes
    assert layout.block_count >= layout.fs_block_count  # never shrinks the filesystem
    if legacy:
        assert (layout.end_sector + 1) % bootable.CYLINDER == 0
    else:
        assert layout.offset_bytes % (1 << 20) == 0 and layout.disk_bytes % (1 << 20) == 0


def test_disk_id_is_derived_from_the_filesystem_uuid() -> None:
    assert bootable.disk_id("31ef4e9d-d0cd-50d7-b697-b34b26b83c9c") == "0x31ef4e9d"


def test_the_mbr_addresses_at_most_2_tib(tmp_path: Path) -> None:
    # 2**32 - 1 sectors: the largest aligned disk (whole MiB) is 2 TiB - 1 MiB, and sfdisk takes it.
    largest = bootable.plan_layout(2048 * GIB - (2 << 20), 4096, disk_size="auto")
    assert largest.disk_bytes == 2048 * GIB - (1 << 20) and largest.disk_sectors < 2**32
    disk = tmp_path / "d.raw"
    with open(disk, "wb") as f:
        f.truncate(largest.disk_bytes)
    bootable.write_partition_table(disk, largest, "0x12345678")
    assert bootable.partition_table(disk).column("Sectors")[0] == largest.partition_sectors
    for fs_bytes, size in ((2048 * GIB - (1 << 20), "auto"), (GIB, "3T"), (GIB, "+2T")):
        with pytest.raises(ParameterError, match="over what its MBR partition table addresses"):
            bootable.plan_layout(fs_bytes, 4096, disk_size=size)
    with pytest.raises(ParameterError, match="MBR"):
        bootable.plan_layout(2048 * GIB, 4096, layout="legacy", disk_size="auto")


def test_a_hybrid_disk_is_gpt_with_a_bios_boot_partition_and_an_esp() -> None:
    layout = bootable.plan_layout(512 << 20, 4096, firmware="hybrid")
    assert (layout.scheme, layout.platforms) == ("gpt", ("bios", "uefi"))
    # 1 MiB, the BIOS boot partition's MiB, the ESP's 128, the root's 512, 1 MiB for the backup GPT.
    assert layout.bios_boot_start == 2048 and layout.bios_boot_sectors == 2048
    assert layout.esp_start == 4096 and layout.esp_sectors == 128 * 2048
    assert layout.start_sector == 4096 + 128 * 2048 and layout.disk_bytes == (1 + 1 + 128 + 512 + 1) << 20
    # The root ends on the last usable sector: the backup GPT (32 sectors of entries, then the
    # header) fills the disk's last 33.
    assert layout.end_sector == layout.disk_sectors - 33 - 1
    assert layout.block_count * 4096 <= layout.partition_bytes
    table = layout.arithmetic()
    assert (
        table.cell("backup GPT", "value") == f"{layout.disk_sectors - 33:,} .. {layout.disk_sectors - 1:,}"
    )
    assert table.cell("BIOS boot (14)", "value") == "2,048 .. 4,095"


def test_a_uefi_disk_has_no_bios_boot_partition_and_no_mbr_limit() -> None:
    layout = bootable.plan_layout(512 << 20, 4096, firmware="uefi", esp_bytes=300 << 20)
    assert layout.bios_boot_sectors == 0 and layout.esp_start == 2048
    assert layout.esp_sectors == 300 * 2048  # a source ESP larger than the default keeps its size
    assert bootable.plan_layout(3 << 40, 4096, firmware="uefi").disk_bytes > 2**32 * 512
    # A GCE disk is padded to whole GiB by its writer: the GPT disk is made that size.
    assert bootable.plan_layout(300 << 20, 4096, firmware="hybrid", multiple=GIB).disk_bytes == GIB


def test_legacy_is_mbr_for_bios_only() -> None:
    with pytest.raises(ParameterError, match="needs a GPT disk; layout legacy is MBR for BIOS only"):
        bootable.plan_layout(GIB, 4096, layout="legacy", firmware="hybrid")


def test_the_gpt_is_written_where_the_layout_says(tmp_path: Path) -> None:
    layout = bootable.plan_layout(64 << 20, 4096, firmware="hybrid")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"")
    os.truncate(disk, layout.disk_bytes)
    uuid = "0b6b0a36-4a4c-4b0c-8a5a-2f1e0c7e6d5a"
    bootable.write_partition_table(disk, layout, bootable.disk_id(uuid, "gpt"))
    rows = {r[0]: r for r in bootable.partition_table(disk).rows}
    assert list(rows["disk.raw1"][2:4]) == [layout.start_sector, layout.end_sector]
    assert rows["disk.raw14"][-1] == "BIOS boot" and rows["disk.raw15"][-1] == "EFI System"
    # The same filesystem gives the same disk, GUIDs included.
    assert bootable.disk_id(uuid, "gpt") == bootable.disk_id(uuid, "gpt") != bootable.disk_id(uuid)
