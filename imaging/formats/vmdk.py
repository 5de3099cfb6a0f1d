"""streamOptimized VMDK, written here instead of by qemu-img: the same format, on every core.

The layout follows VMware's Virtual Disk Format 1.1 (sparse extent, version 3, compressed grains
with markers)::

    sector 0     sparse extent header, gdOffset = GD_AT_END (the footer has the real one)
    sector 1..   embedded descriptor (createType="streamOptimized"), zero-padded
    OVERHEAD     grains in LBA order: marker (lba, compressed size) + zlib data, sector-padded
    ...          for each grain table that covers data: GT marker + 512 entries
                 GD marker + grain directory (0 for tables that cover no data)
                 footer marker + a copy of the header with the real gdOffset
    last sector  end-of-stream marker

qemu-img compresses one grain at a time with zlib level 6 on one core (49 MB/s here). Grains are
independent deflate streams, so they compress in parallel: worker threads read and compress
chunks of grains (zlib releases the GIL; :mod:`imaging.formats.deflate` says which deflate and why), the
caller's thread writes them in order. At most ``2 x workers`` chunks are in flight: memory stays
bounded whatever the disk's size. All-zero grains are not stored (a grain table entry of 0 reads
as zeros).

The CID is derived from the disk's content sample (:func:`imaging.formats.identity.fingerprint`, as
every identity in our artifacts), so it is known before the first byte: the file is written
strictly in order and hashed as it is written, and the same disk always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from imaging.formats import deflate, identity
from imaging.progress import bytes_bar
from imaging.records import Record
from imaging.sparse import data_extents, is_zero

DEFLATE = deflate.DESCRIPTION

SECTOR = 512
GRAIN_SECTORS = 128  # 64 KiB grains, as VMware and qemu write them
GRAIN = GRAIN_SECTORS * SECTOR
GTES_PER_GT = 512  # one grain table covers 32 MiB
MAGIC = 0x564D444B  # "KDMV" on disk
VERSION = 3
FLAG_NL_DETECT = 1 << 0
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
FLAGS = FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS
COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
DESCRIPTOR_OFFSET = 1
DESCRIPTOR_SECTORS = 20  # what qemu reserves (and reads) for an embedded descriptor
OVERHEAD = GRAIN_SECTORS  # header + descriptor, padded so the first grain starts grain-aligned
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3

# magic, version, flags, capacity, grainSize, descriptorOffset, descriptorSize, numGTEsPerGT,
# rgdOffset, gdOffset, overHead, uncleanShutdown, the four newline-detection characters,
# compressAlgorithm; then zero padding to 512 bytes.
_HEADER = struct.Struct("<IIIQQQQIQQQB4sH")
_GRAIN_MARKER = struct.Struct("<QI")  # lba (sectors), compressed size; the data follows at once
_META_MARKER = struct.Struct("<QII")  # sectors of metadata that follow, 0, type; padded to a sector

CHUNK_GRAINS = 64  # 4 MiB read and compressed by one worker at a time

# Grain tables and the grain directory hold 32-bit sector numbers: every grain and grain table
# must start in the file's first 2**32 sectors (2 TiB), as qemu's VMDK_EXTENT_MAX_SECTORS says.
MAX_SECTORS = 1 << 32
GT_SECTORS = GTES_PER_GT * 4 // SECTOR


def _zlib_bound(n: int) -> int:
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13  # zlib's compressBound()


# The most a grain can take: its marker and a zlib stream no longer than compressBound (a
# stored grain, 65552 bytes, is shorter), padded to a sector: 129 sectors for 128 of data.
WORST_GRAIN_SECTORS = -(-(_GRAIN_MARKER.size + _zlib_bound(GRAIN)) // SECTOR)


def largest(fits: Callable[[int], bool]) -> int:
    """The largest grain count ``n`` for which ``fits(n)`` holds (``fits`` falls as n grows)."""
    lo, hi = 0, MAX_SECTORS
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _fits_in_sectors(grains: int) -> bool:
    # Worst case: every grain holds data that does not shrink, every grain table is written
    # (marker + table); the last table must start before sector 2**32.
    tables = -(-grains // GTES_PER_GT)
    return OVERHEAD + WORST_GRAIN_SECTORS * grains + (1 + GT_SECTORS) * tables <= MAX_SECTORS


# The largest disk a streamOptimized VMDK written here holds whatever its data (2031.9 GiB).
MAX_CAPACITY = largest(_fits_in_sectors) * GRAIN


def header_bytes(capacity_sectors: int, gd_offset: int) -> bytes:
    """The 512-byte sparse extent header (also the footer's body)."""
    fields = _HEADER.pack(
        MAGIC, VERSION, FLAGS, capacity_sectors, GRAIN_SECTORS, DESCRIPTOR_OFFSET, DESCRIPTOR_SECTORS,
        GTES_PER_GT, 0, gd_offset, OVERHEAD, 0, b"\n \r\n", COMPRESSION_DEFLATE,
    )  # fmt: skip
    return fields.ljust(SECTOR, b"\0")


def meta_marker(kind: int, sectors: int) -> bytes:
    return _META_MARKER.pack(sectors, 0, kind).ljust(SECTOR, b"\0")


def descriptor(capacity_sectors: int, cid: int, filename: str, adapter: str = "ide") -> str:
    """The embedded descriptor; ``filename`` is the extent's own name (checked by the caller)."""
    heads, sectors = 16, 63
    cylinders = min(capacity_sectors // (heads * sectors), 16383)
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        f"CID={cid:08x}\n"
        "parentCID=ffffffff\n"
        'createType="streamOptimized"\n'
        "\n"
        "# Extent description\n"
        f'RW {capacity_sectors} SPARSE "{filename}"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        'ddb.virtualHWVersion = "4"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        f'ddb.geometry.sectors = "{sectors}"\n'
        f'ddb.adapterType = "{adapter}"\n'
    )


def _padded(n: int) -> int:
    return -(-n // SECTOR) * SECTOR


def grain_runs(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(first grain, number of grains) of each chunk that holds data, in order, at most
    CHUNK_GRAINS long; holes (SEEK_HOLE) are skipped without reading."""
    start = end = -1
    for offset, length in data_extents(fd, 0, size):
        first, last = offset // GRAIN, -(-(offset + length) // GRAIN)
        if first <= end:  # touches the run being built (extents can share a grain)
            end = max(end, last)
            continue
        if end > start >= 0:
            yield from _split(start, end)
        start, end = first, last
    if end > start >= 0:
        yield from _split(start, end)


def _split(start: int, end: int) -> Iterator[tuple[int, int]]:
    for first in range(start, end, CHUNK_GRAINS):
        yield first, min(CHUNK_GRAINS, end - first)


@dataclass(frozen=True)
class _Chunk:
    blob: bytearray  # marker + data of each stored grain, sector-padded, back to back
    grains: list[tuple[int, int]]  # (grain index, sector within blob)
    read_bytes: int


def _compress_chunk(fd: int, size: int, first: int, count: int) -> _Chunk:
    offset = first * GRAIN
    data = os.pread(fd, min(count * GRAIN, size - offset), offset)
    if len(data) < count * GRAIN:  # the disk's last grain: the format stores whole grains
        data = data.ljust(count * GRAIN, b"\0")
    view = memoryview(data)
    blob = bytearray()
    grains: list[tuple[int, int]] = []
    for i in range(count):
        grain = view[i * GRAIN : (i + 1) * GRAIN]
        if is_zero(grain):
            continue
        packed = deflate.zlib_unit(grain)
        start = len(blob)
        blob += _GRAIN_MARKER.pack((first + i) * GRAIN_SECTORS, len(packed))
        blob += packed
        blob += bytes(-len(blob) % SECTOR)
        grains.append((first + i, start // SECTOR))
    return _Chunk(blob, grains, len(data))


@dataclass(frozen=True)
class StreamVmdk(Record):
    path: str
    capacity_bytes: int
    size_bytes: int
    grains: int  # grains stored (not all-zero)
    data_bytes: int  # bytes read from the disk (its data extents)
    cid: str
    digests: dict[str, str]  # of the file, computed as it was written
    deflate: str
    workers: int
    seconds: float


def write_stream_optimized(
    disk: Path,
    out: Path,
    *,
    extent_name: str | None = None,
    cid: int | None = None,
    digests: tuple[str, ...] = ("sha256",),
    workers: int | None = None,
    desc: str | None = "vmdk",
    at: int = 0,
) -> StreamVmdk:
    """Write raw ``disk`` as a streamOptimized VMDK at ``out`` (created or truncated), starting
    at byte ``at`` of it (an OVA's disk goes straight to its place in the tar).

    Strictly in order, header first: ``digests`` (hashlib names) of the file come from the
    bytes as they are written, so nobody reads the file again to hash it. The CID defaults to
    one derived from the disk's content sample (:func:`imaging.formats.identity.fingerprint`)."""
    t0 = time.monotonic()
    deflate.tune_malloc()
    workers = workers or os.cpu_count() or 1
    name = extent_name or out.name
    if not name or any(c in name for c in '"\n\r/'):
        raise ValueError(f"extent name {name!r} cannot go in a VMDK descriptor")
    if os.stat(disk).st_size > MAX_CAPACITY:  # imaging.formats.limits says so to users first
        raise ValueError(f"a streamOptimized VMDK holds at most {MAX_CAPACITY} bytes")
    cid = identity.derived_cid(identity.fingerprint(disk)) if cid is None else cid
    hashes = [hashlib.new(d) for d in digests]
    src = os.open(disk, os.O_RDONLY)
    dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.lseek(dst, at, os.SEEK_SET)

    def emit(data: bytes | bytearray) -> None:
        # The workers keep compressing while this thread writes and hashes (both release the GIL).
        os.write(dst, data)
        for h in hashes:
            h.update(data)

    try:
        size = os.fstat(src).st_size
        capacity = -(-size // SECTOR)
        text = descriptor(capacity, cid, name).encode("ascii")
        if len(text) > DESCRIPTOR_SECTORS * SECTOR:
            raise ValueError("VMDK descriptor too long")
        emit((header_bytes(capacity, GD_AT_END) + text).ljust(OVERHEAD * SECTOR, b"\0"))
        tables: dict[int, array[int]] = {}
        stored = read = 0
        position = OVERHEAD  # in sectors
        with ThreadPoolExecutor(workers, thread_name_prefix="vmdk") as pool, bytes_bar(size, desc) as bar:
            pending: deque[Future[_Chunk]] = deque()

            def drain(keep: int) -> None:
                nonlocal position, stored, read
                while len(pending) > keep:
                    chunk = pending.popleft().result()
                    emit(chunk.blob)
                    for grain, sector in chunk.grains:
                        table = tables.setdefault(grain // GTES_PER_GT, array("I", bytes(4 * GTES_PER_GT)))
                        table[grain % GTES_PER_GT] = position + sector
                    position += len(chunk.blob) // SECTOR
                    stored += len(chunk.grains)
                    read += chunk.read_bytes
                    bar.update(chunk.read_bytes)

            for first, count in grain_runs(src, size):
                pending.append(pool.submit(_compress_chunk, src, size, first, count))
                drain(2 * workers)
            drain(0)
        emit(_tables(position, capacity, tables))
        out_size = os.lseek(dst, 0, os.SEEK_CUR) - at
    finally:
        os.close(src)
        os.close(dst)
    return StreamVmdk(
        path=str(out), capacity_bytes=size, size_bytes=out_size, grains=stored, data_bytes=read,
        cid=f"{cid:08x}", digests={h.name: h.hexdigest() for h in hashes}, deflate=DEFLATE, workers=workers,
        seconds=round(time.monotonic() - t0, 3),
    )  # fmt: skip


def _tables(position: int, capacity: int, tables: dict[int, array[int]]) -> bytearray:
    """Grain tables, grain directory, footer and end-of-stream, to follow the grains that end
    at sector ``position``."""
    gt_count = -(-capacity // (GRAIN_SECTORS * GTES_PER_GT))
    directory = array("I", bytes(4 * gt_count))
    out = bytearray()
    for index in sorted(tables):
        out += meta_marker(MARKER_GT, GT_SECTORS)
        directory[index] = position + len(out) // SECTOR
        out += tables[index].tobytes()
    gd_bytes = directory.tobytes().ljust(_padded(4 * gt_count), b"\0")
    out += meta_marker(MARKER_GD, len(gd_bytes) // SECTOR)
    gd_offset = position + len(out) // SECTOR
    out += gd_bytes
    out += meta_marker(MARKER_FOOTER, 1)
    out += header_bytes(capacity, gd_offset)
    out += meta_marker(MARKER_EOS, 0)
    return out


@dataclass(frozen=True)
class Header:
    magic: int
    version: int
    flags: int
    capacity: int
    grain_size: int
    descriptor_offset: int
    descriptor_size: int
    gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    unclean: int
    newline_check: bytes
    compression: int

    @classmethod
    def parse(cls, data: bytes) -> Header:
        return cls(*_HEADER.unpack_from(data))


def read_layout(path: Path) -> tuple[Header, Header, str]:
    """(header, footer, descriptor text) of a streamOptimized VMDK; for checks and tests."""
    with open(path, "rb") as f:
        head = f.read(SECTOR * (DESCRIPTOR_OFFSET + DESCRIPTOR_SECTORS))
        f.seek(-3 * SECTOR, os.SEEK_END)
        tail = f.read(3 * SECTOR)
    header = Header.parse(head)
    footer = Header.parse(tail[SECTOR:])
    text = head[SECTOR * header.descriptor_offset :].split(b"\0", 1)[0].decode("ascii")
    return header, footer, text
