"""Before a run exists: the bootable disk's size from the source's superblock, and the refusal of
a format (or an MBR) that cannot hold it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from imaging.clouds import acquire
from imaging.errors import ParameterError
from imaging.run import preflight
from imaging.run.request import Request

GiB = 1 << 30


def big_instance(path: Path, size: str = "2045G") -> Path:
    """A sparse ext4 filesystem of ``size`` (no journal: mke2fs writes 29 MB for 2045 GiB)."""
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard",
                    path, size], check=True)  # fmt: skip
    return path


def request(source: Path, **kw: str) -> Request:
    return Request.create(source=str(source), name="big", **kw)


def test_the_disk_size_comes_from_the_superblock(tmp_path: Path) -> None:
    image = big_instance(tmp_path / "big.img")
    src = acquire.inspect(str(image))
    assert (src.fs_bytes, src.fs_block_size) == (2045 * GiB, 4096)
    # The defaults: hybrid GPT (1 MiB before the BIOS boot partition, its 1 MiB, the ESP's 128,
    # the filesystem, 1 MiB for the backup GPT), 1 GiB of room (--disk-size +1G).
    assert preflight.bootable_disk_bytes(request(image), src) == 2046 * GiB + (131 << 20)
    assert preflight.bootable_disk_bytes(request(image, disk_size="auto"), src) == 2045 * GiB + (131 << 20)
    # BIOS: the original's MBR, the filesystem 1 MiB in.
    assert preflight.bootable_disk_bytes(request(image, firmware="bios"), src) == 2046 * GiB + (1 << 20)


@pytest.mark.parametrize(
    ("fmt", "options", "message"),
    [
        ("vhd", {}, "the bootable disk is 2046.0 GiB (2,196,876,820,480 bytes), over what vhd holds: 2040 GiB"),
        ("ova", {}, "over what ova (its streamOptimized VMDK) holds: 2031.9 GiB"),
        ("vmdk", {}, "over what vmdk (streamOptimized) holds"),
        ("qcow2", {"disk_size": "+3G"}, "over what its MBR partition table addresses: 2,199,023,255,040 bytes"),
        ("qcow2", {"disk_size": "3T"}, "the bootable disk would be 3.0 TiB (3,298,534,883,328 bytes), over what its MBR"),
        ("qcow2", {"disk_size": "1T"}, "disk size 1T is smaller than the 2.0 TiB the filesystem needs"),
    ],
)  # fmt: skip
def test_refused_before_the_run(tmp_path: Path, fmt: str, options: dict[str, str], message: str) -> None:
    image = big_instance(tmp_path / "big.img")
    with pytest.raises(ParameterError) as e:
        preflight.check_export(
            request(image, format=fmt, firmware="bios", **options), acquire.inspect(str(image))
        )
    assert message in str(e.value) and "\n" not in str(e.value)


def test_what_fits(tmp_path: Path) -> None:
    image = big_instance(tmp_path / "big.img")
    src = acquire.inspect(str(image))
    for fmt in ("qcow2", "raw", "vdi", "vhdx"):
        preflight.check_export(request(image, format=fmt), src)
    preflight.check_export(request(image, format="vmdk", vmdk_subformat="monolithicSparse"), src)
    # A GPT disk is not bound by the MBR's 2 TiB.
    preflight.check_export(request(image, format="qcow2", disk_size="3T"), src)
    preflight.check_export(request(image, format="qcow2", disk_size="3T", firmware="uefi"), src)


def test_a_qcow2_source_is_told_only_by_an_absolute_size(tmp_path: Path) -> None:
    # Its filesystem is read once 00-acquire has converted it: only a --disk-size says the size
    # before that (30-bootable and 40-export check the rest on the disk they have).
    image = big_instance(tmp_path / "big.img", "2100G")
    qcow2 = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", image, qcow2], check=True)
    src = acquire.inspect(str(qcow2))
    assert src.fs_bytes == 0 and preflight.bootable_disk_bytes(request(qcow2, format="vhd"), src) is None
    preflight.check_export(request(qcow2, format="vhd"), src)
    with pytest.raises(ParameterError, match="over what vhd holds"):
        preflight.check_export(request(qcow2, format="vhd", disk_size="2041G"), src)
