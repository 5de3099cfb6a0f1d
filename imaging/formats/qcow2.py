"""Compressed qcow2, written here instead of by ``qemu-img convert -c``: on every core, and the
same bytes for the same disk.

qemu-img compresses one cluster at a time on one core (25 s for 1.3 GB here); ``-W -m`` spreads
the work over cores but writes clusters in whatever order they finish, so two conversions of
one disk differ. Here worker threads compress chunks of clusters (raw deflate with the 4 KiB
window qemu's decoder expects, as :mod:`imaging.formats.deflate` chooses; zlib releases the GIL) and the
caller's thread packs them in guest order. The layout (qcow2 version 3, 64 KiB clusters, 16-bit refcounts)::

    cluster 0      header (rewritten at the end, when the tables' places are known)
    cluster 1..    L1 table (rewritten at the end)
    ...            compressed clusters, byte-packed in guest order; a cluster that does not
                   compress is stored as it is, cluster-aligned
    ...            L2 tables (only those that map data), then the refcount blocks and table

All-zero clusters are not stored (unallocated clusters read as zeros). ``qemu-img check``
verifies every refcount and table entry; ``qemu-img compare`` the content.
"""

from __future__ import annotations

import os
import struct
import time
from array import array
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from imaging.formats import deflate
from imaging.formats.vmdk import grain_runs
from imaging.progress import bytes_bar
from imaging.records import Record
from imaging.sparse import is_zero

DEFLATE = deflate.DESCRIPTION


CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER // 8
REFCOUNT_ORDER = 4  # 16-bit refcounts
REFCOUNTS_PER_BLOCK = CLUSTER * 8 // (1 << REFCOUNT_ORDER)
COPIED = 1 << 63  # "refcount is exactly one": on L1 entries and uncompressed L2 entries
COMPRESSED = 1 << 62
_SECTORS_SHIFT = 62 - (CLUSTER_BITS - 8)  # where a compressed descriptor's sector count starts
# magic, version, backing file offset and size, cluster bits, size, crypt method, L1 size, L1
# offset, refcount table offset and clusters, snapshots count and offset, incompatible,
# compatible and autoclear features, refcount order, header length.
_HEADER = struct.Struct(">IIQIIQIIQQIIQQQQII")
MAGIC = 0x514649FB  # "QFI\xfb"


@dataclass(frozen=True)
class _Chunk:
    clusters: list[tuple[int, bytes, bool]]  # (guest cluster, payload, compressed?)
    read_bytes: int


def _compress_chunk(fd: int, size: int, first: int, count: int) -> _Chunk:
    offset = first * CLUSTER
    data = os.pread(fd, min(count * CLUSTER, size - offset), offset)
    data = data.ljust(count * CLUSTER, b"\0")  # the last cluster of an unaligned disk
    view = memoryview(data)
    found = []
    for i in range(count):
        cluster = view[i * CLUSTER : (i + 1) * CLUSTER]
        if is_zero(cluster):
            continue
        # Raw deflate, 4 KiB window: what qemu's qcow2 decoder (inflateInit2 with -12) reads.
        packed = deflate.raw_unit(cluster, -12)
        # Like qemu: a cluster that does not shrink is stored as it is.
        found.append((first + i, packed, True) if packed is not None else (first + i, bytes(cluster), False))
    return _Chunk(found, len(data))


@dataclass(frozen=True)
class CompressedQcow2(Record):
    path: str
    virtual_size: int
    size_bytes: int
    clusters: int  # stored (not all-zero)
    uncompressed: int  # of those, stored as they are
    deflate: str
    workers: int
    seconds: float


def write_compressed(
    disk: Path, out: Path, *, workers: int | None = None, desc: str | None = "qcow2"
) -> CompressedQcow2:
    """Write raw ``disk`` as a compressed qcow2 image at ``out`` (created or truncated)."""
    t0 = time.monotonic()
    deflate.tune_malloc()
    workers = workers or os.cpu_count() or 1
    src = os.open(disk, os.O_RDONLY)
    dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = os.fstat(src).st_size
        l1_size = max(1, -(-size // (CLUSTER * L2_ENTRIES)))
        l1_clusters = -(-l1_size * 8 // CLUSTER)
        cursor = (1 + l1_clusters) * CLUSTER  # next free byte: data starts after the L1 table
        os.write(dst, bytes(cursor))
        l2: dict[int, array[int]] = {}
        refcounts: dict[int, int] = {}
        stored = raw = 0
        pending: deque[Future[_Chunk]] = deque()

        def place(chunk: _Chunk) -> None:
            nonlocal cursor, stored, raw
            for guest, payload, compressed in chunk.clusters:
                if compressed:
                    offset = cursor
                    extra = (offset + len(payload) - 1) // 512 - offset // 512
                    entry = COMPRESSED | (extra << _SECTORS_SHIFT) | offset
                    for host in range(
                        offset >> CLUSTER_BITS, ((offset + len(payload) - 1) >> CLUSTER_BITS) + 1
                    ):
                        refcounts[host] = refcounts.get(host, 0) + 1
                else:
                    offset = -(-cursor // CLUSTER) * CLUSTER
                    if offset > cursor:
                        os.write(dst, bytes(offset - cursor))
                    entry = COPIED | offset
                    refcounts[offset >> CLUSTER_BITS] = 1
                    raw += 1
                os.write(dst, payload)
                cursor = offset + len(payload)
                table = l2.setdefault(guest // L2_ENTRIES, array("Q", bytes(CLUSTER)))
                table[guest % L2_ENTRIES] = entry
                stored += 1

        with ThreadPoolExecutor(workers, thread_name_prefix="qcow2") as pool, bytes_bar(size, desc) as bar:
            for first, count in grain_runs(src, size):
                pending.append(pool.submit(_compress_chunk, src, size, first, count))
                while len(pending) > 2 * workers:
                    done = pending.popleft().result()
                    place(done)
                    bar.update(done.read_bytes)
            while pending:
                done = pending.popleft().result()
                place(done)
                bar.update(done.read_bytes)
        # qemu reads the size in whole sectors, rounded down: an unaligned disk's size is rounded
        # up instead, as qemu-img does, or its last bytes would be cut off (the last cluster
        # holds them, zero-padded).
        virtual = -(-size // 512) * 512
        _write_metadata(dst, cursor, virtual, l1_size, l1_clusters, l2, refcounts)
        out_size = os.fstat(dst).st_size
    finally:
        os.close(src)
        os.close(dst)
    return CompressedQcow2(
        path=str(out), virtual_size=virtual, size_bytes=out_size, clusters=stored, uncompressed=raw,
        deflate=DEFLATE, workers=workers, seconds=round(time.monotonic() - t0, 3),
    )  # fmt: skip


def _be(values: array[int]) -> bytes:
    swapped = array(values.typecode, values)
    swapped.byteswap()  # qcow2 tables are big-endian
    return swapped.tobytes()


def _write_metadata(dst: int, cursor: int, size: int, l1_size: int, l1_clusters: int,
                    l2: dict[int, array[int]], refcounts: dict[int, int]) -> None:  # fmt: skip
    """L2 tables and refcounts after the data, then the L1 table and the header in place."""
    next_cluster = -(-cursor // CLUSTER)
    l1 = array("Q", bytes(8 * l1_size))
    tables = bytearray()
    for index in sorted(l2):
        host = next_cluster + len(tables) // CLUSTER
        l1[index] = COPIED | (host << CLUSTER_BITS)
        tables += _be(l2[index])
    for n in range(1 + l1_clusters):  # header and L1
        refcounts[n] = 1
    first_l2 = next_cluster
    for n in range(len(tables) // CLUSTER):
        refcounts[first_l2 + n] = 1
    # The refcount structures count themselves: grow them until they cover the whole file.
    used = first_l2 + len(tables) // CLUSTER
    blocks = table_clusters = 1
    while True:
        total = used + blocks + table_clusters
        need_blocks = -(-total // REFCOUNTS_PER_BLOCK)
        need_table = -(-need_blocks * 8 // CLUSTER)
        if (need_blocks, need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = need_blocks, need_table
    for n in range(used, used + blocks + table_clusters):
        refcounts[n] = 1
    counts = array("H", bytes(2 * blocks * REFCOUNTS_PER_BLOCK))
    for cluster, count in refcounts.items():
        counts[cluster] = count
    table = array("Q", bytes(table_clusters * CLUSTER))
    for n in range(blocks):
        table[n] = (used + n) << CLUSTER_BITS
    os.pwrite(dst, bytes(first_l2 * CLUSTER - cursor) + tables + _be(counts) + _be(table), cursor)
    header = _HEADER.pack(
        MAGIC, 3, 0, 0, CLUSTER_BITS, size, 0, l1_size, CLUSTER, (used + blocks) << CLUSTER_BITS, table_clusters,
        0, 0, 0, 0, 0, REFCOUNT_ORDER, _HEADER.size,
    )  # fmt: skip
    os.pwrite(dst, header + bytes(8), 0)  # then the end of header extensions (type 0, length 0)
    os.pwrite(dst, _be(l1), CLUSTER)


def read_header(path: Path) -> dict[str, int]:
    """The header's fields, for checks and tests."""
    names = ("magic version backing_file_offset backing_file_size cluster_bits size crypt_method l1_size "
             "l1_table_offset refcount_table_offset refcount_table_clusters nb_snapshots snapshots_offset "
             "incompatible_features compatible_features autoclear_features refcount_order header_length").split()  # fmt: skip
    with open(path, "rb") as f:
        return dict(zip(names, _HEADER.unpack(f.read(_HEADER.size)), strict=True))
