"""What an image file is: container format (qemu-img), partition table (sfdisk), filesystem (blkid).

Every image is hostile until proven otherwise. qemu-img's format probe is only trusted together
with the checks in :func:`check_self_contained`: a "raw" instance whose first sector was written to
look like a qcow2 header with a backing file, or a VMDK descriptor naming host files as extents,
would otherwise make us read the host's own disks into the artifact.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imaging import tools
from imaging.errors import SourceError
from imaging.progress import percent_bar

_PERCENT = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")

# The container formats qemu-img reads that we accept as sources.
SOURCE_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx")
# VMDK create types whose data lives inside the one file.
_SELF_CONTAINED_VMDK = ("monolithicSparse", "streamOptimized")


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None
    details: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, path: Path, data: dict[str, Any]) -> ImageInfo:
        return cls(
            path=path,
            format=str(data["format"]),
            virtual_size=int(data["virtual-size"]),
            actual_size=int(data.get("actual-size", 0)),
            backing_file=data.get("backing-filename") or data.get("full-backing-filename"),
            details=data,
        )


def _abs(path: Path) -> str:
    # qemu reads "proto:rest" as a protocol; an absolute path can never look like one.
    return os.fspath(path.resolve())


def image_info(path: Path, fmt: str | None = None) -> ImageInfo:
    argv: list[str] = ["qemu-img", "info", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    result = tools.run([*argv, _abs(path)], ok_codes=(0, 1), timeout=60)
    if result.exit_code != 0:
        detail = result.stderr_tail(1).removeprefix("qemu-img: ")
        raise SourceError(f"{path}: qemu-img cannot read it: {detail}")
    return ImageInfo.from_json(path, json.loads(result.stdout))


def check_self_contained(info: ImageInfo) -> None:
    """Refuse images that would make qemu read other files than the one given."""
    if info.format not in SOURCE_FORMATS:
        raise SourceError(
            f"{info.path}: image format {info.format} is not supported ({', '.join(SOURCE_FORMATS)})"
        )
    if info.backing_file:
        raise SourceError(
            f"{info.path}: {info.format} image has a backing file ({info.backing_file}); "
            "refusing: a source must be self-contained (flatten it with qemu-img convert first)"
        )
    specific = info.details.get("format-specific", {}).get("data", {})
    if specific.get("data-file"):
        raise SourceError(
            f"{info.path}: qcow2 image stores its data in another file ({specific['data-file']}); refusing"
        )
    if info.format == "vmdk":
        create_type = specific.get("create-type", "")
        extents = [e.get("filename") for e in specific.get("extents", [])]
        own = _abs(info.path)
        if create_type not in _SELF_CONTAINED_VMDK or any(e and os.path.realpath(e) != own for e in extents):
            raise SourceError(
                f"{info.path}: VMDK of type {create_type or 'unknown'} refers to other files; "
                "only single-file monolithicSparse/streamOptimized VMDKs are accepted"
            )


def data_bytes_of(info: ImageInfo) -> int:
    """Bytes of data (not holes, not zeros) a raw copy of the image will hold."""
    result = tools.run(["qemu-img", "map", "--output=json", "-f", info.format, _abs(info.path)], timeout=300)
    return sum(int(m["length"]) for m in json.loads(result.stdout) if m.get("data"))


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # sectors
    size: int  # sectors
    type: str
    bootable: bool

    @property
    def end(self) -> int:
        return self.start + self.size - 1


@dataclass(frozen=True)
class PartitionTable:
    label: str
    sector_size: int
    id: str
    partitions: tuple[Partition, ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PartitionTable:
        table = data["partitiontable"]
        parts: list[Partition] = []
        for p in table.get("partitions", []):
            node = str(p["node"])
            digits = node[len(node.rstrip("0123456789")) :]
            parts.append(
                Partition(
                    number=int(digits) if digits else len(parts) + 1,
                    start=int(p["start"]),
                    size=int(p["size"]),
                    type=str(p["type"]),
                    bootable=bool(p.get("bootable", False)),
                )
            )
        return cls(
            label=str(table["label"]),
            sector_size=int(table.get("sectorsize", 512)),
            id=str(table.get("id", "")),
            partitions=tuple(parts),
        )


def read_partition_table(path: Path) -> PartitionTable | None:
    result = tools.run(["sfdisk", "--json", _abs(path)], ok_codes=(0, 1), timeout=60)
    if result.exit_code != 0 or not result.stdout.strip():
        return None
    return PartitionTable.from_json(json.loads(result.stdout))


# A GPT header's first 92 bytes: signature, revision, header size, header CRC32, reserved, its
# own LBA, the other header's LBA, first and last usable LBA, disk GUID, the entries' LBA, their
# count, the size of one, their CRC32.
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
# The spec's minimum array is 16 KiB; a header asking for more than this is not read.
_GPT_MAX_ENTRIES = 1 << 20


def _gpt_header(fd: int, lba: int, sector_size: int, last: int) -> tuple[int, str]:
    """(the other header's LBA, "") for a sound header at ``lba``; (-1, what is wrong) if not."""
    raw = os.pread(fd, sector_size, lba * sector_size)
    if len(raw) < _GPT_HEADER.size or raw[:8] != b"EFI PART":
        return -1, "is missing"
    _, _, size, crc, _, own, other, _, _, _, entries_lba, count, entry_size, entries_crc = (
        _GPT_HEADER.unpack_from(raw)
    )
    if not _GPT_HEADER.size <= size <= sector_size or zlib.crc32(raw[:16] + bytes(4) + raw[20:size]) != crc:
        return -1, "fails its checksum"
    if own != lba:
        return -1, f"says it is at LBA {own}"
    length = count * entry_size
    if entry_size < 128 or length > _GPT_MAX_ENTRIES or entries_lba > last:
        return -1, f"has {count} entries of {entry_size} bytes at LBA {entries_lba}: out of bounds"
    entries = os.pread(fd, length, entries_lba * sector_size)
    if len(entries) != length or zlib.crc32(entries) != entries_crc:
        return -1, "has partition entries that fail their checksum"
    return other, ""


def gpt_problems(path: Path, sector_size: int = 512) -> list[str]:
    """What is wrong with a GPT's two headers, one line each (none when both are sound). Read
    only: a table firmware or sfdisk would read from one header alone is never repaired here."""
    with open(path, "rb") as f:
        last = os.lseek(f.fileno(), 0, os.SEEK_END) // sector_size - 1
        other, primary = _gpt_header(f.fileno(), 1, sector_size, last)
        _, backup = _gpt_header(f.fileno(), last, sector_size, last)
    at_end = f"at the last sector (LBA {last})"
    if primary:
        read = f"there is no sound backup {at_end} either" if backup else f"the backup {at_end} was read"
        return [f"the GPT's primary header {primary}: {read}"]
    if other != last:
        why = "the image ends before it: cut short?" if other > last else "the disk grew after partitioning?"
        return [f"the GPT's backup header is not {at_end} but at LBA {other}: {why}"]
    if backup:
        return [f"the GPT's backup header {at_end} {backup}: only the primary is sound"]
    return []


@dataclass(frozen=True)
class Probe:
    """What blkid sees at an offset: a filesystem (TYPE) or a partition table (PTTYPE)."""

    type: str | None = None
    pttype: str | None = None
    uuid: str | None = None
    label: str | None = None

    @classmethod
    def parse(cls, text: str) -> Probe:
        values: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                values[key.strip()] = value.strip()
        return cls(values.get("TYPE"), values.get("PTTYPE"), values.get("UUID"), values.get("LABEL"))


def probe(path: Path, offset: int = 0, size: int | None = None) -> Probe:
    argv = ["blkid", "-p", "-o", "export", "--offset", str(offset)]
    if size is not None:
        argv += ["--size", str(size)]
    result = tools.run([*argv, _abs(path)], ok_codes=(0, 2), timeout=60)
    return Probe.parse(result.stdout) if result.exit_code == 0 else Probe()


def qemu_convert(src: Path, src_format: str, dst: Path, dst_format: str, *, options: list[str] | None = None,
                 desc: str = "convert") -> float:  # fmt: skip
    """``qemu-img convert`` with its progress shown as a bar; returns the seconds it took.

    ``options`` go before the file names (``-o subformat=...``, ``-c``, ``-W``, ``-m N``)."""
    t0 = time.monotonic()
    with percent_bar(desc) as bar:
        seen = [0.0]

        def progress(chunk: str) -> None:
            for m in _PERCENT.finditer(chunk):
                value = float(m.group(1))
                bar.update(max(0.0, value - seen[0]))
                seen[0] = max(seen[0], value)

        tools.run(
            ["qemu-img", "convert", "-p", "-f", src_format, "-O", dst_format, *(options or []),
             os.fspath(src.resolve()), os.fspath(dst.resolve())],
            on_output=progress,
            timeout=24 * 3600,
        )  # fmt: skip
        bar.update(100 - seen[0])
    return time.monotonic() - t0


def check_source(path: Path) -> Path:
    """``path`` as a source: a non-empty regular file or block device we can read; resolved."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SourceError(f"source not found: {path}") from None
    except PermissionError:
        raise SourceError(f"source not readable: {path}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise SourceError(f"source is not a file or block device: {path}")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise SourceError(f"source not readable: {path}: {e.strerror}") from None
    if st.st_size == 0 and stat.S_ISREG(st.st_mode):
        raise SourceError(f"source is empty: {path}")
    return path.resolve()
