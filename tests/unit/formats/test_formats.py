"""Formats as data: what each --format means, and the request options that go with them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imaging import config, sparse
from imaging.config import ImageFormat, VmdkSubformat
from imaging.errors import ParameterError
from imaging.formats import export, identity
from imaging.run.request import Request


def test_every_format_knows_its_file_and_qemu_names() -> None:
    assert [f.value for f in ImageFormat] == ["raw", "qcow2", "vmdk", "vdi", "vhd", "vhdx", "ova", "gce"]
    assert {f.value: f.qemu_format for f in ImageFormat} == {
        "raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vdi": "vdi", "vhd": "vpc", "vhdx": "vhdx", "ova": "vmdk",
        "gce": "raw",
    }  # fmt: skip
    assert ImageFormat.vhd.extension == "vhd" and ImageFormat.ova.is_archive
    assert ImageFormat.gce.extension == "tar.gz" and ImageFormat.gce.is_archive


def test_qemu_options_per_format() -> None:
    def opts(fmt: str, sub: str = "monolithicSparse") -> list[str]:
        return export.qemu_options(ImageFormat(fmt), vmdk_subformat=VmdkSubformat(sub))

    assert opts("qcow2") == [] and opts("vdi") == []
    assert opts("vmdk") == ["-o", "subformat=monolithicSparse"]
    assert opts("vhd") == ["-o", "subformat=dynamic,force_size=on"]
    assert opts("vhdx") == ["-o", "subformat=dynamic"]


def test_what_we_write_ourselves() -> None:
    ours = export.ours_to_write
    assert ours(ImageFormat.vmdk, VmdkSubformat.stream_optimized, False)
    assert not ours(ImageFormat.vmdk, VmdkSubformat.monolithic_sparse, False)
    assert ours(ImageFormat.ova, VmdkSubformat.stream_optimized, False)
    assert ours(ImageFormat.qcow2, VmdkSubformat.stream_optimized, True)
    assert not ours(ImageFormat.qcow2, VmdkSubformat.stream_optimized, False)
    assert not ours(ImageFormat.vdi, VmdkSubformat.stream_optimized, False)
    assert not ours(ImageFormat.gce, VmdkSubformat.stream_optimized, False)  # GNU tar and pigz write it


def test_unknown_format_lists_the_known_ones() -> None:
    with pytest.raises(
        ParameterError, match=r"unknown format 'iso' \(known: raw, qcow2, vmdk, vdi, vhd, vhdx, ova, gce\)"
    ):
        config.check_format("iso")


def req(**kw: object) -> Request:
    return Request.create(source="/x.img", name="demo", **kw)


def test_request_defaults_for_the_format_options() -> None:
    r = req(format="ova")
    assert (r.vmdk_subformat, r.compress, r.ovf_version.value) == (
        VmdkSubformat.stream_optimized,
        False,
        "1.0",
    )
    assert r.notebook_parameters()["VMDK_SUBFORMAT"] == "streamOptimized"
    assert req(format="qcow2", compress=True).compress
    assert req(format="ova", ovf_version="2.0").ovf_version.value == "2.0"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"format": "vdi", "compress": True}, "compress applies to qcow2 only, not vdi"),
        ({"format": "ova", "vmdk_subformat": "monolithicSparse"}, "an OVA holds a streamOptimized VMDK"),
        ({"format": "ova", "ovf_version": "3.0"}, "ovf_version"),
        ({"format": "vmdk", "vmdk_subformat": "twoGbMaxExtentFlat"}, "vmdk_subformat"),
        ({"kind": "conv"}, "unknown pipeline 'conv'"),
    ],
)
def test_request_refuses(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        req(**fields)


def test_convert_pipelines_are_data() -> None:
    assert config.pipeline_stages("convert") == ["40-export"]
    assert config.pipeline_stages("convert-verify") == ["40-export", "50-verify"]


def test_crc32c_and_vhd_checksum() -> None:
    assert identity.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    footer = bytearray(512)
    footer[:8] = b"conectix"
    checksum = identity.vhd_checksum(footer)
    assert checksum == ~sum(b"conectix") & 0xFFFFFFFF
    footer[64:68] = b"\xff\xff\xff\xff"  # the checksum field itself does not count
    assert identity.vhd_checksum(footer) == checksum


def test_derived_identities_are_stable_and_distinct() -> None:
    a, b = identity.derived_uuid("seed", "vdi-image"), identity.derived_uuid("seed", "vdi-modification")
    assert a == identity.derived_uuid("seed", "vdi-image") and a != b
    assert identity.derived_uuid("other", "vdi-image") != a
    assert identity.derived_cid("seed") == identity.derived_cid("seed") != 0xFFFFFFFF


def test_the_fingerprint_follows_content_not_the_page_cache(tmp_path: Path) -> None:
    # An extent the filesystem preallocated reads as zeros, but SEEK_DATA calls it data while
    # its pages are cached and a hole once they are not: the same disk gave other identities.
    disk = tmp_path / "disk.raw"
    fd = os.open(disk, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 64 << 20)
        os.posix_fallocate(fd, 8 << 20, 16 << 20)  # unwritten, as mke2fs leaves its zeroed ranges
        os.pwrite(fd, b"superblock", 1024)
        os.pwrite(fd, b"x" * 12288, 30 << 20)
        os.fsync(fd)

        def state() -> tuple[list[tuple[int, int]], str]:
            return list(sparse.data_extents(fd)), identity.fingerprint(disk)

        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        cold = state()
        os.pread(fd, 16 << 20, 8 << 20)
        warm = state()
    finally:
        os.close(fd)
    assert cold[0] != warm[0], "this filesystem does not show the case (tmp_path on ext4 does)"
    assert cold[1] == warm[1]
    # What it samples still tells disks apart: a byte changed on the grid changes it.
    with open(disk, "r+b") as f:
        f.seek((30 << 20) + 1)
        f.write(b"y")
    assert identity.fingerprint(disk) != cold[1]


def test_the_run_disk_comes_with_the_firmware_30_bootable_made_it_boot_with(tmp_path: Path) -> None:
    from imaging.workspace import Workspace

    ws = Workspace.open(tmp_path / "run")
    with open(ws.disk, "wb") as f:
        f.truncate(4 << 20)
    ws.save_result("30-bootable", {"disk": {"size_bytes": 4 << 20}})  # a run from before UEFI
    assert (export.input_disk(ws).firmware, export.input_disk(ws).secure_boot) == ("bios", False)
    ws.save_result("30-bootable", {"disk": {"firmware": "uefi", "secure_boot": True}})
    found = export.input_disk(ws)
    assert (found.firmware, found.secure_boot, found.origin) == ("uefi", True, "30-bootable")
    assert export.bootable_firmware(ws) == (config.Firmware.uefi, True)
