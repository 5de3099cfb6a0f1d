"""The streamOptimized VMDK writer's structures, read back byte by byte (no qemu needed)."""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

import pytest

from imaging.formats import vmdk

MIB = 1 << 20


def make_disk(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return path


def markers(path: Path) -> list[tuple[int, int, int, int]]:
    """Walk the stream after the header: (sector, val, size, type) of every marker; type -1 for
    grain markers (whose size is not 0)."""
    found = []
    data = path.read_bytes()
    pos = vmdk.OVERHEAD * vmdk.SECTOR
    while pos < len(data):
        val, size = struct.unpack_from("<QI", data, pos)
        if size:  # a grain: marker + compressed data, padded to a sector
            found.append((pos // 512, val, size, -1))
            pos += -(-(12 + size) // 512) * 512
            continue
        (kind,) = struct.unpack_from("<I", data, pos + 12)
        found.append((pos // 512, val, 0, kind))
        pos += 512 + val * 512
    return found


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    rng = random.Random(7)
    return make_disk(tmp_path / "disk.raw", 100 * MIB + 4096, {
        0: b"boot" * 128,                      # grain 0
        70 * MIB + 5: rng.randbytes(200_000),  # grains 1120..1123, in the third grain table
        100 * MIB: b"tail",                    # the partial last grain
        50 * MIB: bytes(65536),                # written zeros: not stored
    })  # fmt: skip


def test_header_fields_and_footer(disk: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.vmdk"
    result = vmdk.write_stream_optimized(disk, out, desc=None)
    header, footer, text = vmdk.read_layout(out)
    assert out.read_bytes()[:4] == b"KDMV"
    assert (header.magic, header.version, header.grain_size, header.gtes_per_gt) == (vmdk.MAGIC, 3, 128, 512)
    assert header.flags == 0x30001  # newline check, compressed grains, markers
    assert header.capacity == -(-(100 * MIB + 4096) // 512)
    assert header.gd_offset == vmdk.GD_AT_END and header.compression == 1
    assert header.newline_check == b"\n \r\n" and header.overhead == 128 and header.rgd_offset == 0
    assert (header.descriptor_offset, header.descriptor_size) == (1, 20)
    # The footer is the header with the real grain directory offset.
    assert footer == vmdk.Header(**{**header.__dict__, "gd_offset": footer.gd_offset})
    assert 128 < footer.gd_offset < out.stat().st_size // 512
    assert 'createType="streamOptimized"' in text and 'RW 204808 SPARSE "d.vmdk"' in text
    assert f"CID={result.cid}" in text and "parentCID=ffffffff" in text
    assert result.grains == 6 and result.size_bytes == out.stat().st_size


def test_markers_grains_tables_directory(disk: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.vmdk"
    vmdk.write_stream_optimized(disk, out, desc=None)
    found = markers(out)
    grains = [m for m in found if m[3] == -1]
    # Grains in LBA order, all-zero grains left out; LBAs count sectors.
    assert [g[1] // 128 for g in grains] == [0, 1120, 1121, 1122, 1123, 1600]
    meta = [(val, kind) for _, val, _, kind in found if kind != -1]
    # Three grain tables (grains 0-511, 1024-1535, 1536-2047: none for 512-1023), GD, footer, EOS.
    assert meta == [(4, 1), (4, 1), (4, 1), (1, 2), (1, 3), (0, 0)]
    data = out.read_bytes()
    eos = found[-1][0] * 512
    assert eos == len(data) - 512 and data[eos:] == bytes(512)
    _, footer, _ = vmdk.read_layout(out)
    directory = struct.unpack_from("<4I", data, footer.gd_offset * 512)
    gt_sectors = [s + 1 for s, _, _, kind in found if kind == 1]  # each table follows its marker
    assert directory == (gt_sectors[0], 0, gt_sectors[1], gt_sectors[2])
    table = struct.unpack_from("<512I", data, directory[2] * 512)
    assert [table[i] for i in range(96, 100)] == [g[0] for g in grains[1:5]]
    assert sum(1 for e in table if e) == 4
    # Each grain decompresses (zlib) to a whole grain holding the disk's bytes.
    raw = disk.read_bytes()
    for sector, lba, size, _ in grains:
        payload = data[sector * 512 + 12 : sector * 512 + 12 + size]
        assert zlib.decompress(payload) == raw[lba * 512 : lba * 512 + 65536].ljust(65536, b"\0")


def test_same_disk_same_bytes_other_disk_other_cid(disk: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "d.vmdk", tmp_path / "b" / "d.vmdk"
    a.parent.mkdir()
    b.parent.mkdir()
    ra = vmdk.write_stream_optimized(disk, a, desc=None, workers=1)
    rb = vmdk.write_stream_optimized(disk, b, desc=None, workers=3)
    assert a.read_bytes() == b.read_bytes() and ra.cid == rb.cid
    with open(disk, "r+b") as f:
        f.seek(3)
        f.write(b"X")
    rc = vmdk.write_stream_optimized(disk, tmp_path / "c.vmdk", desc=None)
    assert rc.cid != ra.cid


def test_empty_and_unaligned_disks(tmp_path: Path) -> None:
    empty = make_disk(tmp_path / "empty.raw", 3 * MIB, {})
    result = vmdk.write_stream_optimized(empty, tmp_path / "e.vmdk", desc=None)
    assert result.grains == 0
    assert [m[3] for m in markers(tmp_path / "e.vmdk")] == [2, 3, 0]  # GD, footer, EOS only
    odd = make_disk(tmp_path / "odd.raw", 1000, {0: b"x" * 1000})
    header, _, _ = vmdk.read_layout(_write(odd, tmp_path / "o.vmdk"))
    assert header.capacity == 2  # sectors, rounded up


def _write(src: Path, out: Path) -> Path:
    vmdk.write_stream_optimized(src, out, desc=None)
    return out


def test_memory_is_bounded_by_chunks(tmp_path: Path) -> None:
    # grain_runs never yields more than CHUNK_GRAINS grains per chunk, whatever the extent.
    big = make_disk(tmp_path / "big.raw", 40 * MIB, {0: os.urandom(20 * MIB)})
    fd = os.open(big, os.O_RDONLY)
    try:
        runs = list(vmdk.grain_runs(fd, 40 * MIB))
    finally:
        os.close(fd)
    assert all(count <= vmdk.CHUNK_GRAINS for _, count in runs)
    assert sum(count for _, count in runs) == 20 * MIB // vmdk.GRAIN


@pytest.mark.parametrize("name", ['a"b.vmdk', "a/b.vmdk", "x\ny"])
def test_extent_name_cannot_break_the_descriptor(disk: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="cannot go in a VMDK descriptor"):
        vmdk.write_stream_optimized(disk, tmp_path / "d.vmdk", extent_name=name, desc=None)
