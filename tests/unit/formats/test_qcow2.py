"""The compressed qcow2 writer's structures, decoded here (qemu-img check does it again in the
integration tests)."""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

import pytest

from imaging.formats import qcow2

MIB = 1 << 20
C = qcow2.CLUSTER


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    rng = random.Random(3)
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(600 * MIB + 1000)  # two L2 tables' worth, and an unaligned end
        for offset, data in {0: b"text " * 30000, 10 * MIB: rng.randbytes(3 * C),  # incompressible
                             513 * MIB: b"second table", 600 * MIB: b"end"}.items():  # fmt: skip
            f.seek(offset)
            f.write(data)
    return path


def tables(path: Path) -> tuple[dict[str, int], dict[int, int]]:
    """(header, {guest cluster: L2 entry})."""
    data = path.read_bytes()
    header = qcow2.read_header(path)
    l1 = struct.unpack_from(f">{header['l1_size']}Q", data, header["l1_table_offset"])
    entries = {}
    for i, l1e in enumerate(l1):
        if not l1e:
            continue
        assert l1e & qcow2.COPIED
        l2 = struct.unpack_from(f">{qcow2.L2_ENTRIES}Q", data, l1e & ~qcow2.COPIED)
        entries.update({i * qcow2.L2_ENTRIES + j: e for j, e in enumerate(l2) if e})
    return header, entries


def test_header(disk: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.qcow2"
    result = qcow2.write_compressed(disk, out, desc=None)
    header, _ = tables(out)
    assert header["magic"] == 0x514649FB and header["version"] == 3 and header["cluster_bits"] == 16
    # The unaligned size rounded up to a sector, as qemu-img writes it: qemu reads whole sectors
    # of it, rounded down, and would lose the disk's last 488 bytes.
    assert header["size"] == 600 * MIB + 1024 == result.virtual_size
    assert header["l1_size"] == 2 and header["l1_table_offset"] == C
    assert header["refcount_order"] == 4 and header["header_length"] == 104
    assert header["backing_file_offset"] == header["crypt_method"] == header["nb_snapshots"] == 0
    assert header["incompatible_features"] == 0
    assert result.size_bytes == out.stat().st_size and out.stat().st_size % C == 0


def test_clusters_decode_to_the_disk(disk: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.qcow2"
    result = qcow2.write_compressed(disk, out, desc=None, workers=2)
    _, entries = tables(out)
    raw, data = disk.read_bytes(), out.read_bytes()
    expected = {n for n in range(-(-len(raw) // C)) if raw[n * C : (n + 1) * C].strip(b"\0")}
    assert set(entries) == expected and result.clusters == len(expected)
    mask = (1 << qcow2._SECTORS_SHIFT) - 1
    for guest, entry in entries.items():
        want = raw[guest * C : (guest + 1) * C].ljust(C, b"\0")
        if entry & qcow2.COMPRESSED:
            offset, extra = entry & mask, (entry & ~qcow2.COMPRESSED) >> qcow2._SECTORS_SHIFT
            end = (offset // 512 + extra + 1) * 512
            assert zlib.decompressobj(-12).decompress(data[offset:end], C) == want
        else:  # stored as it is: cluster-aligned, refcount one
            assert entry & qcow2.COPIED and (entry & ~qcow2.COPIED) % C == 0
            assert data[entry & ~qcow2.COPIED :][:C] == want
    assert result.uncompressed == 3  # the random clusters


def test_refcounts_match_every_use(disk: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.qcow2"
    qcow2.write_compressed(disk, out, desc=None)
    header, entries = tables(out)
    data = out.read_bytes()
    used: dict[int, int] = {0: 1, 1: 1}  # header, L1
    l1 = struct.unpack_from(">2Q", data, C)
    for e in l1:
        used[(e & ~qcow2.COPIED) // C] = 1
    mask = (1 << qcow2._SECTORS_SHIFT) - 1
    for entry in entries.values():
        if entry & qcow2.COMPRESSED:
            offset, extra = entry & mask, (entry & ~qcow2.COMPRESSED) >> qcow2._SECTORS_SHIFT
            last = (offset // 512 + extra + 1) * 512 - 1
            for host in range(offset // C, last // C + 1):
                used[host] = used.get(host, 0) + 1
        else:
            used[(entry & ~qcow2.COPIED) // C] = 1
    table_offset, table_clusters = header["refcount_table_offset"], header["refcount_table_clusters"]
    for n in range(table_clusters):
        used[table_offset // C + n] = 1
    table = struct.unpack_from(f">{table_clusters * C // 8}Q", data, table_offset)
    counts: dict[int, int] = {}
    for b, block in enumerate(t for t in table if t):
        used[block // C] = 1
        for i, count in enumerate(struct.unpack_from(f">{qcow2.REFCOUNTS_PER_BLOCK}H", data, block)):
            if count:
                counts[b * qcow2.REFCOUNTS_PER_BLOCK + i] = count
    assert counts == used
    assert max(used) == len(data) // C - 1  # nothing in the file is unaccounted for


def test_same_disk_same_bytes(disk: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qcow2.write_compressed(disk, a, desc=None, workers=1)
    qcow2.write_compressed(disk, b, desc=None, workers=4)
    assert a.read_bytes() == b.read_bytes()


def test_empty_disk(tmp_path: Path) -> None:
    empty = tmp_path / "e.raw"
    with open(empty, "wb") as f:
        f.truncate(5 * MIB)
    out = tmp_path / "e.qcow2"
    assert qcow2.write_compressed(empty, out, desc=None).clusters == 0
    assert tables(out)[1] == {}
    assert os.path.getsize(out) == 4 * C  # header, L1, refcount block, refcount table
