"""Deterministic identities in the headers qemu-img writes: the same disk gives the same bytes.

qemu-img stamps every new image with random identifiers, so two conversions of one disk differ:
a VDI's image and modification UUIDs, a VHD footer's UUID and creation time (and its checksum),
a VHDX's file and data write GUIDs, header sequence numbers, virtual disk id and the stale log
entries of its creation, a VMDK descriptor's CID. Here each is replaced by a value derived from
the disk's content (its ``fingerprint``), so a different disk still gets different identities
(VirtualBox refuses two media with one UUID) while the same disk always gets the same ones.
Checksums are recomputed; nothing else in the image is touched. qcow2 and raw carry no such
fields; the streamOptimized VMDK and compressed qcow2 written by this package carry none random.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import uuid
from pathlib import Path

from imaging.sparse import data_extents

# Creation times written into images and archives (2023-11-14T22:13:20Z), not the clock's.
FIXED_TIME = 1_700_000_000
_NAMESPACE = uuid.UUID("6b1c7c0e-3f0a-5a57-9d0e-696d6167696e")


# Samples of a disk's content taken by its fingerprint: at most this many 4 KiB blocks, on a
# grid fixed by the disk's size alone (every 64 KiB up to 256 MiB, wider beyond).
_SAMPLES = 4096
_SAMPLE = 4096


def fingerprint(path: Path, fmt: str = "raw") -> str:
    """What the identities derive from: sha256 over the disk's size, its first 4 MiB and every
    non-zero 4 KiB block on a grid fixed by its size (at most 4096 blocks, 64 KiB apart or more).

    A sample, not the whole disk: reading all of it would cost more than the conversion itself
    (qemu-img writes 1.3 GB as vdi in 0.6 s; hashing it takes 1 s more). The sample holds what
    changes whenever a disk's content does: the partition table and boot code, the filesystem's
    superblock and group descriptors (UUID, write time, free counts) and data across the disk.

    Content only, never where the file's data lies: holes are skipped (they read as zeros), but
    an extent the filesystem preallocated (unwritten, as mke2fs and ``fallocate`` leave them)
    counts as data or as a hole depending on what the page cache holds, so the same disk gave
    other identities, and other bytes, from one run to the next.
    For an image file that is not raw, its format stands in for the grid.
    """
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        h.update(struct.pack("<Q", size))
        h.update(os.pread(fd, 4 << 20, 0))
        if fmt == "raw":
            step = max(16 * _SAMPLE, -(-size // _SAMPLES // _SAMPLE) * _SAMPLE)
            zero, done = bytes(_SAMPLE), -1
            for offset, length in data_extents(fd):
                # Every grid block that overlaps the extent (extents need not be 4 KiB aligned).
                first = max(done + 1, -(-max(offset - _SAMPLE + 1, 0) // step))
                for k in range(first, -(-(offset + length) // step)):
                    block = os.pread(fd, _SAMPLE, k * step)
                    if block != zero[: len(block)]:
                        h.update(struct.pack("<Q", k))
                        h.update(block)
                    done = k
        else:
            h.update(fmt.encode())
    finally:
        os.close(fd)
    return h.hexdigest()


def derived_uuid(seed: str, role: str) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, f"{seed}:{role}")


def derived_cid(seed: str) -> int:
    cid = int.from_bytes(hashlib.sha256(f"{seed}:cid".encode()).digest()[:4], "big")
    return cid if cid != 0xFFFFFFFF else 0xFFFFFFFE  # ffffffff means "no CID"


def stamp(path: Path, qemu_format: str, seed: str, final_name: str) -> list[str]:
    """Replace the random identities of a qemu-img output in place; returns what was set.

    ``final_name``: the file's name once renamed (a VMDK descriptor names its own file)."""
    if qemu_format == "vdi":
        return _stamp_vdi(path, seed)
    if qemu_format == "vpc":
        return _stamp_vhd(path, seed)
    if qemu_format == "vhdx":
        return _stamp_vhdx(path, seed)
    if qemu_format == "vmdk":
        return _stamp_vmdk(path, seed, final_name)
    return []


def _read(fd: int, n: int, offset: int) -> bytearray:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise ValueError(f"short read at {offset}")
    return bytearray(data)


# VDI 1.1: signature at 0x40, image UUID at 0x188, last modification UUID at 0x198.
_VDI_SIGNATURE = 0xBEDA107F


def _stamp_vdi(path: Path, seed: str) -> list[str]:
    fd = os.open(path, os.O_RDWR)
    try:
        head = _read(fd, 0x1C8, 0)
        if struct.unpack_from("<I", head, 0x40)[0] != _VDI_SIGNATURE:
            raise ValueError(f"{path} is not a VDI image")
        image, modified = derived_uuid(seed, "vdi-image"), derived_uuid(seed, "vdi-modification")
        # VirtualBox stores UUIDs in its RTUUID layout, which is the little-endian GUID layout.
        os.pwrite(fd, image.bytes_le + modified.bytes_le, 0x188)
    finally:
        os.close(fd)
    return [f"image uuid {image}", f"modification uuid {modified}"]


def vhd_checksum(footer: bytes | bytearray) -> int:
    return ~(sum(footer[:64]) + sum(footer[68:])) & 0xFFFFFFFF


def _stamp_vhd(path: Path, seed: str) -> list[str]:
    """A VHD footer sits at the end, and a dynamic disk keeps a copy in its first sector."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        ident = derived_uuid(seed, "vhd")
        stamped = 0
        for offset in (0, size - 512):
            footer = _read(fd, 512, offset)
            if footer[:8] != b"conectix":
                continue
            struct.pack_into(">I", footer, 24, FIXED_TIME - 946_684_800)  # seconds since 2000
            footer[68:84] = ident.bytes  # big-endian, as the VHD specification stores it
            struct.pack_into(">I", footer, 64, vhd_checksum(footer))
            os.pwrite(fd, bytes(footer), offset)
            stamped += 1
        if not stamped:
            raise ValueError(f"{path} has no VHD footer")
    finally:
        os.close(fd)
    return [f"uuid {ident}", f"timestamp {FIXED_TIME}"]


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes | bytearray) -> int:
    """CRC-32C (Castagnoli), as VHDX checksums its headers; only 4 KiB blocks pass through here."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


_VHDX_HEADERS = (64 << 10, 128 << 10)
_VHDX_REGION_TABLE = 192 << 10
_METADATA_REGION = uuid.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e")
_PAGE83_ITEM = uuid.UUID("beca12ab-b2e6-4523-93ef-c309e000c746")


def _stamp_vhdx(path: Path, seed: str) -> list[str]:
    fd = os.open(path, os.O_RDWR)
    try:
        if _read(fd, 8, 0) != b"vhdxfile":
            raise ValueError(f"{path} is not a VHDX image")
        file_guid, data_guid = derived_uuid(seed, "vhdx-file-write"), derived_uuid(seed, "vhdx-data-write")
        headers = [_read(fd, 4096, offset) for offset in _VHDX_HEADERS]
        order = sorted(range(2), key=lambda i: struct.unpack_from("<Q", headers[i], 8)[0])
        log_length, log_offset = struct.unpack_from("<IQ", headers[order[1]], 68)
        for rank, i in enumerate(order, 1):
            header = headers[i]
            if header[:4] != b"head" or any(header[48:64]):
                raise ValueError(f"{path}: VHDX header {i + 1} is not clean (pending log)")
            # Sequence numbers keep their order (the higher one is current), from fixed values.
            struct.pack_into("<Q", header, 8, rank)
            header[16:32], header[32:48] = file_guid.bytes_le, data_guid.bytes_le
            struct.pack_into("<I", header, 4, 0)
            struct.pack_into("<I", header, 4, crc32c(header))
            os.pwrite(fd, bytes(header), _VHDX_HEADERS[i])
        # With LogGuid zero the log is empty by definition; clear qemu's stale entries.
        os.pwrite(fd, bytes(log_length), log_offset)
        disk_id = derived_uuid(seed, "vhdx-disk")
        page83 = _vhdx_metadata_item(fd, _PAGE83_ITEM)
        os.pwrite(fd, disk_id.bytes_le, page83)
    finally:
        os.close(fd)
    return [f"file write guid {file_guid}", f"data write guid {data_guid}", f"virtual disk id {disk_id}"]


def _vhdx_metadata_item(fd: int, item: uuid.UUID) -> int:
    """File offset of a metadata item's data, found through the region table."""
    table = _read(fd, 64 << 10, _VHDX_REGION_TABLE)
    if table[:4] != b"regi":
        raise ValueError("VHDX region table not found")
    (count,) = struct.unpack_from("<I", table, 8)
    for n in range(count):
        guid, offset, _length, _required = struct.unpack_from("<16sQII", table, 16 + 32 * n)
        if uuid.UUID(bytes_le=guid) == _METADATA_REGION:
            meta = _read(fd, 64 << 10, offset)
            if meta[:8] != b"metadata":
                raise ValueError("VHDX metadata table not found")
            (entries,) = struct.unpack_from("<H", meta, 10)
            for k in range(entries):
                item_id, item_offset, _size = struct.unpack_from("<16sII", meta, 32 + 32 * k)
                if uuid.UUID(bytes_le=item_id) == item:
                    return int(offset + item_offset)
    raise ValueError(f"VHDX metadata item {item} not found")


_CID = re.compile(rb"^CID=[0-9a-fA-F]+$", re.MULTILINE)
_EXTENT = re.compile(rb'^(RW \d+ SPARSE )"[^"\n]*"$', re.MULTILINE)


def _stamp_vmdk(path: Path, seed: str, final_name: str) -> list[str]:
    """A sparse VMDK's embedded descriptor: the CID (random and of varying length) is fixed, and
    the extent line names the final file, not the temporary one qemu-img wrote."""
    fd = os.open(path, os.O_RDWR)
    try:
        head = _read(fd, 512, 0)
        if head[:4] != b"KDMV":
            raise ValueError(f"{path} is not a sparse VMDK")
        offset, sectors = struct.unpack_from("<QQ", head, 28)
        area = _read(fd, sectors * 512, offset * 512)
        text = bytes(area).split(b"\0", 1)[0]
        cid = derived_cid(seed)
        fixed, n = _CID.subn(f"CID={cid:08x}".encode(), text)
        fixed, m = _EXTENT.subn(lambda match: match.group(1) + b'"' + final_name.encode() + b'"', fixed)
        if n != 1 or m != 1 or len(fixed) > len(area) or '"' in final_name:
            raise ValueError(f"{path}: cannot set the descriptor's CID")
        os.pwrite(fd, fixed.ljust(len(area), b"\0"), offset * 512)
    finally:
        os.close(fd)
    return [f"cid {cid:08x}"]
