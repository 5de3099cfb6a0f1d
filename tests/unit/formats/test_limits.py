"""Each format's size limit: the number, the tool agreeing with it, the one-line refusal, and
nothing written when a disk is over it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from imaging.config import ImageFormat, VmdkSubformat
from imaging.errors import ParameterError
from imaging.formats import export, limits, vmdk
from imaging.workspace import Workspace

GiB, TiB, PiB = 1 << 30, 1 << 40, 1 << 50


def qemu_img(*args: object) -> subprocess.CompletedProcess[str]:
    assert shutil.which("qemu-img"), "qemu-img is needed: apt install qemu-utils"
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)


def test_the_numbers() -> None:
    by_label = {limit.label: limit.max_bytes for limit in limits.LIMITS.values()}
    assert by_label == {
        "qcow2": 2 * PiB,
        "vmdk (streamOptimized)": 33_291_798 * vmdk.GRAIN,
        "vmdk (monolithicSparse)": 33_550_328 * vmdk.GRAIN,
        "ova (its streamOptimized VMDK)": 33_291_798 * vmdk.GRAIN,
        "vdi": 0x1FFFFF8000000,
        "vhd": 2040 * GiB,
        "vhdx": 64 * TiB,
    }
    assert limits.limit_for(ImageFormat.raw) is None
    assert limits.limit_for(ImageFormat.qcow2) == limits.limit_for(
        ImageFormat.qcow2, VmdkSubformat.monolithic_sparse
    )
    shown = {limits.size_text(limit.max_bytes) for limit in limits.LIMITS.values()}
    assert shown == {"2 PiB", "2031.9 GiB", "2047.7 GiB", "511.9 TiB", "2040 GiB", "64 TiB"}


# (format, qemu-img -o options, largest size it creates); qemu-img refuses one sector more.
AT_THE_LIMIT = [
    ("vpc", "subformat=dynamic,force_size=on", 2040 * GiB),
    ("vhdx", "subformat=dynamic", 64 * TiB),
    ("qcow2", "cluster_size=65536", 2 * PiB),
]


@pytest.mark.parametrize(
    ("qemu_format", "options", "largest"), AT_THE_LIMIT, ids=[c[0] for c in AT_THE_LIMIT]
)
def test_qemu_img_agrees(tmp_path: Path, qemu_format: str, options: str, largest: int) -> None:
    fmt = {"vpc": ImageFormat.vhd}.get(qemu_format) or ImageFormat(qemu_format)
    limit = limits.limit_for(fmt)
    assert limit is not None and limit.max_bytes == largest
    image = tmp_path / "x"
    assert qemu_img("create", "-q", "-f", qemu_format, "-o", options, image, largest).returncode == 0
    image.unlink()
    over = qemu_img("create", "-q", "-f", qemu_format, "-o", options, image, largest + 512)
    assert over.returncode == 1 and "too large" in over.stderr


def test_qemu_img_states_the_vdi_limit(tmp_path: Path) -> None:
    # Creating a VDI at its limit writes a 2 GiB block map: qemu-img's own refusal names the number.
    over = qemu_img("create", "-q", "-f", "vdi", tmp_path / "x.vdi", 0x1FFFFF8000000 + (1 << 20))
    assert over.returncode == 1 and "max supported is 0x1fffff8000000" in over.stderr


def test_the_sparse_vmdk_layout_is_qemus(tmp_path: Path) -> None:
    # The monolithicSparse limit follows from where qemu-img puts the first grain: read it back.
    for size in (100 * GiB, 1500 * GiB):
        image = tmp_path / "m.vmdk"
        assert (
            qemu_img(
                "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse", image, size
            ).returncode
            == 0
        )
        header = vmdk.Header.parse(image.read_bytes()[:512])
        grains = size // vmdk.GRAIN
        tables = -(-grains // vmdk.GTES_PER_GT)
        first = 1 + vmdk.DESCRIPTOR_SECTORS + 2 * (-(-tables * 4 // 512) + 4 * tables)
        assert header.overhead == -(-first // 128) * 128
        image.unlink()


def test_a_grain_of_random_data_takes_129_sectors(tmp_path: Path) -> None:
    # The worst case the streamOptimized limit is built on, measured on data that does not compress.
    disk = tmp_path / "r.raw"
    disk.write_bytes(os.urandom(64 * vmdk.GRAIN))
    written = vmdk.write_stream_optimized(disk, tmp_path / "r.vmdk", desc=None)
    grains_end = (written.size_bytes - 512 * (1 + 4 + 1 + 1 + 1 + 1 + 1)) // 512  # GT, GD, footer, EOS
    assert (
        written.grains == 64
        and grains_end == vmdk.OVERHEAD + 64 * vmdk.WORST_GRAIN_SECTORS == 128 + 64 * 129
    )


def test_streamoptimized_limit_is_the_last_disk_that_fits() -> None:
    grains = vmdk.MAX_CAPACITY // vmdk.GRAIN
    tables = -(-grains // vmdk.GTES_PER_GT)
    last_table = vmdk.OVERHEAD + 129 * grains + 5 * tables - vmdk.GT_SECTORS  # its first sector
    assert last_table < 2**32 and vmdk.MAX_CAPACITY % vmdk.GRAIN == 0
    one_more = vmdk.OVERHEAD + 129 * (grains + 1) + 5 * (-(-(grains + 1) // vmdk.GTES_PER_GT))
    assert one_more > 2**32


@pytest.mark.parametrize(
    ("fmt", "subformat", "size", "message"),
    [
        ("vhd", "streamOptimized", 2040 * GiB + 512,
         "the disk is 2040.0 GiB (2,190,433,321,472 bytes), over what vhd holds: 2040 GiB (2,190,433,320,960 bytes; "
         "qemu's VHD driver, 0xff000000 sectors); raw has no size limit, qcow2 takes up to 2 PiB"),
        ("ova", "streamOptimized", 3 * TiB, "over what ova (its streamOptimized VMDK) holds: 2031.9 GiB"),
        ("vmdk", "streamOptimized", 2040 * GiB, "over what vmdk (streamOptimized) holds: 2031.9 GiB"),
        ("vmdk", "monolithicSparse", 2 * TiB, "over what vmdk (monolithicSparse) holds: 2047.7 GiB"),
        ("vdi", "streamOptimized", 512 * TiB, "over what vdi holds: 511.9 TiB"),
        ("vhdx", "streamOptimized", 65 * TiB, "over what vhdx holds: 64 TiB"),
        ("qcow2", "streamOptimized", 3 * PiB, "over what qcow2 holds: 2 PiB (2,251,799,813,685,248 bytes; "
         "qemu's largest L1 table, 32 MiB, with 64 KiB clusters); raw has no size limit"),
    ],
)  # fmt: skip
def test_over_the_limit_is_one_line(fmt: str, subformat: str, size: int, message: str) -> None:
    with pytest.raises(ParameterError) as e:
        limits.check_fits(size, fmt, subformat)
    assert message in str(e.value) and "\n" not in str(e.value)
    limit = limits.limit_for(ImageFormat(fmt), VmdkSubformat(subformat))
    assert limit is not None
    limits.check_fits(limit.max_bytes, fmt, subformat)  # the limit itself fits


def test_raw_has_no_limit() -> None:
    limits.check_fits(8 * 1 << 60, "raw")


def test_export_refuses_before_writing_anything(tmp_path: Path) -> None:
    disk = tmp_path / "big.raw"
    with open(disk, "wb") as f:
        f.truncate(2041 * GiB)  # sparse: nothing to read
    ws = Workspace.open(tmp_path / "run")
    found = export.InputDisk(str(disk), "raw", disk.stat().st_size, 0, "convert")
    out = tmp_path / "out"
    for fmt in ("vhd", "ova", "vmdk"):
        with pytest.raises(ParameterError, match=f"over what {fmt}"):
            export.export(ws, "big", fmt, out, disk=found)
    assert not out.exists() and list(ws.work.iterdir()) == []


def test_the_writer_refuses_a_disk_over_its_limit(tmp_path: Path) -> None:
    disk = tmp_path / "big.raw"
    with open(disk, "wb") as f:
        f.truncate(vmdk.MAX_CAPACITY + 512)
    with pytest.raises(ValueError, match="streamOptimized VMDK holds at most"):
        vmdk.write_stream_optimized(disk, tmp_path / "big.vmdk", desc=None)
    assert not (tmp_path / "big.vmdk").exists()


def test_room_for_the_artifact() -> None:
    # A disk's data, 1/128 more for grains that do not compress, room for metadata; one copy
    # for an OVA too (its disk is written in its place in the tar).
    assert export.space_needed(128 << 20) == (129 << 20) + (64 << 20)
