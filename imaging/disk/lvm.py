"""LVM2 volume groups read from a disk image in user space; linear volumes copied out by offset.

A PV's label (in its first four sectors) gives its uuid and metadata areas; an area's header points at
the VG's metadata text in a circular buffer; the text maps each LV segment to extents of named PVs,
which the labels place on the disk. No LVM tool runs and nothing is activated (the host may lack
device-mapper; a guest's VG name may be the host's). Checksums are checked; every size, offset and count
read from the image is bounded before use.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaging import sparse
from imaging.disk import images
from imaging.errors import SourceError
from imaging.records import human_bytes
from imaging.tables import Table

SECTOR = 512
BLKID_TYPE = "LVM2_member"  # what blkid calls a physical volume
_LABEL_MAGIC, _LABEL_TYPE = b"LABELONE", b"LVM2 001"
_MDA_MAGIC = b" LVM2 x[5A%r0N*>"
_INITIAL_CRC = 0xF597A6CF
_RAW_LOCN_IGNORED = 1
_MAX_TEXT = 4 << 20
_MAX_DEPTH = 8  # real metadata nests 4 deep (vg / logical_volumes / lv / segment)
_MAX_PVS, _MAX_LVS, _MAX_SEGMENTS = 256, 4096, 4096
_MAX_VALUES = 250_000  # real texts hold about 50,000 per MiB, more than a default metadata area takes
_MAX_INT = 1 << 63
_INT = re.compile(r"-?[0-9]{1,19}\Z")
_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}\Z")
_TOKENS = re.compile(  # possessive: a 4 MiB string is matched without a 4 MiB-deep backtracking stack
    r'\s+|#[^\n]*|(?P<str>"[^"\\]*+(?:\\.[^"\\]*+)*+")'
    r"|(?P<word>[A-Za-z0-9_+.-]+)|(?P<punct>[={}\[\],])|(?P<bad>.)",
    re.S,
)


@dataclass(frozen=True)
class Segment:
    """One segment of a logical volume; for a linear one (``striped`` over one stripe), where its data is."""

    start_extent: int
    extent_count: int
    type: str
    pv_name: str  # "" for a segment that is not one range of one PV
    pv_start_extent: int
    disk_offset: int  # -1 where pv_name is ""
    length: int  # bytes
    lv_offset: int  # bytes from the start of the volume
    stripe_count: int = 1


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    vg: str
    size_bytes: int
    segments: tuple[Segment, ...]
    visible: bool = True  # hidden: a pool's data or metadata, a RAID image, a snapshot's exception store
    snapshot_of: str | None = None  # the origin, where this volume holds a snapshot's changed blocks

    @property
    def dm_name(self) -> str:
        return f"/dev/mapper/{self.vg.replace('-', '--')}-{self.name.replace('-', '--')}"


@dataclass(frozen=True)
class PhysicalVolume:
    name: str  # "pv0", as the metadata text names it
    uuid: str
    partition: int | None
    disk_offset: int
    pe_start: int  # bytes from the PV's start
    size_bytes: int
    pe_count: int = 0


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    uuid: str
    extent_size: int  # bytes
    pvs: tuple[PhysicalVolume, ...]
    lvs: tuple[LogicalVolume, ...]
    seqno: int = 0


@dataclass(frozen=True)
class _Label:
    uuid: str  # 32 characters, no dashes
    partition: int | None
    disk_offset: int
    size: int  # bytes the PV may use: its partition's, or (on a whole disk) what its label says it has
    available: int  # bytes of the image from disk_offset on: less than size on a truncated image
    mdas: tuple[tuple[int, int], ...]  # (offset from the PV start, size)

    def where(self, path: Path) -> str:
        return f"{path}: partition {self.partition}" if self.partition is not None else str(path)


def _crc(data: bytes) -> int:
    # LVM's calc_crc is CRC-32 from its own initial value, without zlib's inversions around it.
    return (zlib.crc32(data, _INITIAL_CRC ^ 0xFFFFFFFF) ^ 0xFFFFFFFF) & 0xFFFFFFFF


def _dashed(uuid: str) -> str:
    return "-".join(
        uuid[a:b] for a, b in ((0, 6), (6, 10), (10, 14), (14, 18), (18, 22), (22, 26), (26, 32))
    )


def _pread(fd: int, size: int, offset: int) -> bytes:
    return os.pread(fd, size, offset) if offset >= 0 else b""


def is_lvm_member(path: Path, offset: int) -> bool:
    """Whether an LVM2 label is in one of the four sectors at ``offset`` (checksums not checked)."""
    with open(path, "rb") as f:
        head = _pread(f.fileno(), 4 * SECTOR, offset)
    return any(
        head[s : s + 8] == _LABEL_MAGIC and head[s + 24 : s + 32] == _LABEL_TYPE
        for s in range(0, len(head) - SECTOR + 1, SECTOR)
    )


def _read_label(
    fd: int, offset: int, size: int | None, available: int, partition: int | None, where: str
) -> _Label | None:
    head = _pread(fd, 4 * SECTOR, offset)
    for n in range(len(head) // SECTOR):
        sector = head[n * SECTOR : (n + 1) * SECTOR]
        if sector[:8] != _LABEL_MAGIC or sector[24:32] != _LABEL_TYPE:
            continue
        number, crc, content = struct.unpack_from("<QII", sector, 8)
        if crc != _crc(sector[20:]):
            raise SourceError(f"{where}: LVM label in sector {n} has a wrong checksum: corrupt")
        if number != n or not 32 <= content <= SECTOR - 72:
            raise SourceError(f"{where}: LVM label in sector {n} is inconsistent: corrupt")
        uuid = sector[content : content + 32].decode("ascii", "replace")
        if not re.fullmatch(r"[A-Za-z0-9]{32}", uuid):
            raise SourceError(f"{where}: LVM label in sector {n} has an invalid uuid: corrupt")
        device_size = struct.unpack_from("<Q", sector, content + 32)[0]
        lists: list[list[tuple[int, int]]] = [[], []]  # data areas, then metadata areas
        pos = content + 40
        for areas in lists:
            while True:
                if pos + 16 > SECTOR:
                    raise SourceError(f"{where}: LVM label's area lists run past its sector: corrupt")
                area = struct.unpack_from("<QQ", sector, pos)
                pos += 16
                if area == (0, 0):
                    break
                areas.append(area)
        size = min(device_size, _MAX_INT) if size is None else size
        return _Label(uuid, partition, offset, size, available, tuple(lists[1]))
    return None


def _read_text(fd: int, label: _Label, mda: tuple[int, int], where: str) -> str | None:
    start, size = mda
    if not SECTOR < size <= label.size or start > label.size - size:
        raise SourceError(f"{where}: LVM metadata area ({start}+{size}) lies outside the physical volume")
    base = label.disk_offset + start
    header = _pread(fd, SECTOR, base)
    if len(header) < SECTOR:
        raise SourceError(f"{where}: LVM metadata area is beyond the end of the image: truncated?")
    if header[4:20] != _MDA_MAGIC or struct.unpack_from("<I", header, 0)[0] != _crc(header[4:]):
        raise SourceError(f"{where}: LVM metadata area header has a wrong magic or checksum: corrupt")
    version, hstart, hsize = struct.unpack_from("<IQQ", header, 20)
    if version != 1 or (hstart, hsize) != (start, size):
        raise SourceError(f"{where}: LVM metadata area header does not match its label: corrupt")
    offset, length, crc, flags = struct.unpack_from("<QQII", header, 40)  # raw_locns[0]: the committed text
    if (offset == 0 and length == 0) or flags & _RAW_LOCN_IGNORED:
        return None  # a PV in no volume group yet, or its copy of the text set aside
    if not SECTOR <= offset < size or not 0 < length <= min(size - SECTOR, _MAX_TEXT):
        raise SourceError(f"{where}: LVM metadata text ({offset}+{length}) is out of bounds: corrupt")
    first = min(length, size - offset)  # the text wraps around to just after the header
    data = _pread(fd, first, base + offset) + _pread(fd, length - first, base + SECTOR)
    if len(data) != length:
        raise SourceError(f"{where}: LVM metadata text is beyond the end of the image: truncated?")
    if _crc(data) != crc:
        raise SourceError(f"{where}: LVM metadata text has a wrong checksum: corrupt")
    # Names are checked where they are used; a stray byte in a description need not refuse the disk.
    return data.rstrip(b"\0").decode("utf-8", "replace")


def parse_metadata(text: str, where: str = "LVM metadata") -> dict[str, Any]:
    """The LVM text format as nested dicts: ``key = value``, ``name { ... }``, ``[ ... ]`` lists."""
    # Tokens are taken one at a time, never listed: a hostile 4 MiB of "a=1" would be millions of them.
    matches = _TOKENS.finditer(text)
    token: tuple[str, str, int] = ("end", "", 0)
    values = 0

    def fail(what: str, at: int | None = None) -> SourceError:
        line = text.count("\n", 0, token[2] if at is None else at) + 1
        return SourceError(f"{where}: cannot parse the metadata text: {what} on line {line}")

    def advance() -> None:
        nonlocal token
        for m in matches:
            kind = m.lastgroup
            if kind == "bad":
                raise fail(f"unexpected {m.group()!r}", m.start())
            if kind:
                value = re.sub(r"\\(.)", r"\1", m.group()[1:-1], flags=re.S) if kind == "str" else m.group()
                token = (kind, value, m.start())
                return
        token = ("end", "", len(text))

    def punct(char: str) -> bool:
        return token[0] == "punct" and token[1] == char

    def scalar() -> Any:
        nonlocal values
        kind, value, _ = token
        if kind in ("punct", "end"):
            raise fail("expected a value")
        values += 1
        if values > _MAX_VALUES:
            raise fail("too many values")
        advance()
        return int(value) if kind == "word" and _INT.match(value) else value

    def section(depth: int, closing: str | None) -> dict[str, Any]:
        if depth > _MAX_DEPTH:
            raise fail("nested too deep")
        out: dict[str, Any] = {}
        while True:
            kind, key, _ = token
            if kind == "end" and closing:
                raise fail(f"missing '{closing}'")
            if kind == "end" or (closing and punct(closing)):
                advance()
                return out
            advance()
            if kind != "word" or not (punct("=") or punct("{")):
                raise fail("expected 'name =' or 'name {'")
            if key in out:
                raise fail(f"{key[:40]} given twice")
            if punct("{"):
                advance()
                out[key] = section(depth + 1, "}")
                continue
            advance()
            if not punct("["):
                out[key] = scalar()
                continue
            advance()
            items: list[Any] = []
            while not punct("]"):
                items.append(scalar())
                if punct(","):
                    advance()
            advance()
            out[key] = items

    advance()
    return section(0, None)


def _get(d: dict[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    value = d.get(key, default)
    if not isinstance(value, kind) or (isinstance(value, int) and not 0 <= value < _MAX_INT):
        raise SourceError(f"{where}: LVM metadata has no valid {key}: corrupt")
    return value


def _group_of(top: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    groups = [(k, v) for k, v in top.items() if isinstance(v, dict)]
    if len(groups) != 1 or not _NAME.match(groups[0][0]):
        raise SourceError(f"{where}: LVM metadata text holds no single, validly named volume group")
    return groups[0]


def _uuid(value: str, where: str) -> str:
    uuid = value.replace("-", "")
    if not re.fullmatch(r"[A-Za-z0-9]{32}", uuid):
        raise SourceError(f"{where}: LVM metadata has an invalid uuid: corrupt")
    return uuid


def _volume_group(top: dict[str, Any], labels: dict[str, _Label], where: str) -> VolumeGroup:
    name, vg = _group_of(top, where)
    here = f"{where}: volume group {name}"
    extent = _get(vg, "extent_size", int, here) * SECTOR
    if not 0 < extent <= 1 << 40:
        raise SourceError(f"{here}: extent size {extent} is out of bounds: corrupt")
    pvs: dict[str, tuple[PhysicalVolume, _Label]] = {}
    for key, pv in _get(vg, "physical_volumes", dict, here).items():
        if not isinstance(pv, dict) or len(pvs) >= _MAX_PVS or not _NAME.match(key):
            raise SourceError(f"{here}: physical volume {key[:40]!r} is invalid or one too many: corrupt")
        uuid = _uuid(_get(pv, "id", str, here), here)
        if uuid not in labels:
            raise SourceError(
                f"volume group {name} needs physical volume {_dashed(uuid)}, which is not on this disk"
            )
        flags = pv.get("flags", [])
        if isinstance(flags, list) and "MISSING" in flags:
            # Back, but what it holds may be older than the rest: LVM itself keeps such a group partial.
            raise SourceError(f"volume group {name} marks its physical volume {_dashed(uuid)} as missing")
        label = labels[uuid]
        pe_start, pe_count = _get(pv, "pe_start", int, here) * SECTOR, _get(pv, "pe_count", int, here)
        dev_size = _get(pv, "dev_size", int, here, 0) * SECTOR
        found = PhysicalVolume(
            key, _dashed(uuid), label.partition, label.disk_offset, pe_start, dev_size, pe_count
        )
        pvs[key] = (found, label)
    snapshots: dict[str, str] = {}  # exception store -> origin
    lvs: list[LogicalVolume] = []
    for key, lv in _get(vg, "logical_volumes", dict, here, {}).items():
        if not isinstance(lv, dict) or len(lvs) >= _MAX_LVS or not _NAME.match(key):
            raise SourceError(f"{here}: logical volume {key[:40]!r} is invalid or one too many: corrupt")
        segments: list[Segment] = []
        for skey, seg in lv.items():
            if not (isinstance(seg, dict) and re.fullmatch(r"segment\d+", skey)):
                continue
            if len(segments) >= _MAX_SEGMENTS:
                raise SourceError(f"{here}: logical volume {key} has too many segments")
            segments.append(_segment(seg, pvs, extent, f"{here}: logical volume {key}"))
            cow, origin = seg.get("cow_store"), seg.get("origin")
            if seg.get("type") == "snapshot" and isinstance(cow, str) and isinstance(origin, str):
                snapshots[cow] = origin if _NAME.match(origin) else "?"
        segments.sort(key=lambda s: s.start_extent)
        expected = 0
        for s in segments:
            if s.start_extent != expected:
                raise SourceError(
                    f"{here}: logical volume {key} has overlapping or missing extents: corrupt"
                )
            expected += s.extent_count
        visible = "VISIBLE" in lv.get("status", []) if isinstance(lv.get("status"), list) else False
        lvs.append(LogicalVolume(key, name, expected * extent, tuple(segments), visible))
    # LVM gives each extent to one volume at most: extents given twice would let a hostile text make a
    # volume (and its copy) many times the disk.
    used = sorted((s.pv_name, s.pv_start_extent, s.extent_count, lv.name) for lv in lvs for s in lv.segments)
    for (pv_a, start_a, count_a, lv_a), (pv_b, start_b, _, lv_b) in itertools.pairwise(used):
        if pv_a and pv_a == pv_b and start_a + count_a > start_b:
            raise SourceError(f"{here}: logical volumes {lv_a} and {lv_b} share extents of {pv_a}: corrupt")
    lvs = [dataclasses.replace(lv, snapshot_of=snapshots.get(lv.name)) for lv in lvs]
    uuid, seqno = _dashed(_uuid(_get(vg, "id", str, here), here)), _get(vg, "seqno", int, here, 0)
    return VolumeGroup(name, uuid, extent, tuple(p for p, _ in pvs.values()), tuple(lvs), seqno)


def _segment(
    seg: dict[str, Any], pvs: dict[str, tuple[PhysicalVolume, _Label]], extent: int, where: str
) -> Segment:
    start, count = _get(seg, "start_extent", int, where), _get(seg, "extent_count", int, where)
    kind, stripes = _get(seg, "type", str, where), seg.get("stripe_count", 1)
    if not re.fullmatch(r"[a-z0-9+_.-]{1,40}", kind):
        raise SourceError(f"{where}: a segment has an invalid type: corrupt")
    if count == 0 or start + count > _MAX_INT // extent:
        raise SourceError(f"{where}: a segment of {count} extents is out of bounds: corrupt")
    length, lv_offset = count * extent, start * extent
    if kind != "striped" or stripes != 1:
        n = stripes if isinstance(stripes, int) else 0
        return Segment(start, count, kind, "", 0, -1, length, lv_offset, n)
    pair = seg.get("stripes")
    if not (isinstance(pair, list) and len(pair) == 2 and pair[0] in pvs and isinstance(pair[1], int)):
        raise SourceError(f"{where}: a linear segment does not name one of its physical volumes: corrupt")
    pv, label = pvs[pair[0]]
    if not 0 <= pair[1] <= pv.pe_count - count:
        raise SourceError(
            f"{where}: a segment lies beyond the extents of physical volume {pv.name}: corrupt"
        )
    offset = pv.pe_start + pair[1] * extent
    if offset + length > label.size:
        place = f"partition {pv.partition}" if pv.partition is not None else "its physical volume"
        raise SourceError(f"{where} ends beyond the end of {place}: corrupt")
    if offset + length > label.available:
        raise SourceError(
            f"{where} ends at byte {label.disk_offset + offset + length:,} of the disk, "
            f"beyond the end of the image ({label.disk_offset + label.available:,}): truncated?"
        )
    return Segment(start, count, kind, pv.name, pair[1], pv.disk_offset + offset, length, lv_offset)


def read_volume_groups(path: Path, table: images.PartitionTable | None) -> list[VolumeGroup]:
    """Every volume group whose physical volumes are on the disk (the whole disk when there is no
    partition table, else each partition), its newest metadata (highest seqno) from any of them."""
    with open(path, "rb") as f:
        fd = f.fileno()
        disk = os.lseek(fd, 0, os.SEEK_END)  # a block device's size too
        places: list[tuple[int | None, int, int | None]] = [(None, 0, None)]
        if table is not None:
            ss = table.sector_size
            # An extended partition's box holds the logical ones: their labels are theirs alone.
            places = [
                (p.number, p.start * ss, p.size * ss)
                for p in table.partitions
                if p.type.lower() not in ("5", "f", "85")
            ]
        labels: dict[str, _Label] = {}
        for number, offset, size in places:
            where = f"{path}: partition {number}" if number is not None else str(path)
            label = _read_label(fd, offset, size, max(0, disk - offset), number, where)
            if label is None:
                continue
            if label.uuid in labels:
                raise SourceError(f"{path}: physical volume {_dashed(label.uuid)} is on the disk twice")
            labels[label.uuid] = label
        # Every copy of the text first, then only the newest of each group is taken at its word: an
        # older copy may name what is long gone.
        newest: dict[str, tuple[int, dict[str, Any], str]] = {}
        for label in labels.values():
            for mda in label.mdas[:2]:  # LVM writes at most two copies per PV
                text = _read_text(fd, label, mda, label.where(path))
                if text is None:
                    continue
                top = parse_metadata(text, label.where(path))
                name, vg = _group_of(top, label.where(path))
                uuid, seqno = vg.get("id"), vg.get("seqno")
                if not isinstance(uuid, str) or not isinstance(seqno, int):
                    raise SourceError(
                        f"{label.where(path)}: volume group {name} has no id or seqno: corrupt"
                    )
                if uuid not in newest or seqno > newest[uuid][0]:
                    newest[uuid] = (seqno, top, label.where(path))
    groups = [_volume_group(top, labels, where) for _, top, where in newest.values()]
    return sorted(groups, key=lambda vg: vg.name)


_KINDS = {"thin": "a thin volume", "thin-pool": "a thin pool", "mirror": "a mirror",
          "snapshot": "a snapshot", "cache": "a cached volume", "cache-pool": "a cache pool",
          "writecache": "a cached volume", "vdo": "a VDO volume", "vdo-pool": "a VDO pool",
          "integrity": "an integrity volume"}  # fmt: skip


def check_linear(lv: LogicalVolume) -> None:
    """Refuse, in one line, a volume whose data is not plain ranges of the disk."""
    tail = "only linear volumes can be read without activating them"
    if lv.snapshot_of is not None:
        raise SourceError(
            f"logical volume {lv.vg}/{lv.name} holds the changed blocks of a snapshot of "
            f"{lv.snapshot_of}, not a filesystem: {tail}"
        )
    for s in lv.segments:
        if s.type == "striped" and s.stripe_count != 1:
            what = f"striped over {s.stripe_count} physical volumes"
        elif s.type.startswith("raid"):
            what = "a RAID volume"
        elif s.pv_name:
            continue
        else:
            what = _KINDS.get(s.type, "of an unsupported type")
        raise SourceError(f"logical volume {lv.vg}/{lv.name} is {what} (segment type {s.type}): {tail}")
    if not lv.segments:
        raise SourceError(f"logical volume {lv.vg}/{lv.name} has no extents: nothing to read")


def copy_volume(path: Path, lv: LogicalVolume, dest: Path, *, desc: str = "copy logical volume") -> float:
    """``dest`` (new, sparse, ``lv.size_bytes``) with the volume's data; returns the seconds it took.
    Holes stay holes: the cost follows the data in the segments, never the disk's size."""
    check_linear(lv)
    t0 = time.monotonic()
    sparse.create_sparse(dest, lv.size_bytes)
    for n, s in enumerate(lv.segments, 1):
        label = f"{desc} ({n}/{len(lv.segments)})" if len(lv.segments) > 1 else desc
        sparse.copy_range(
            path, dest, src_offset=s.disk_offset, length=s.length, dst_offset=s.lv_offset, desc=label
        )
    return time.monotonic() - t0


def volume_table(vg: VolumeGroup) -> Table:
    """One row per segment of each logical volume ([hidden] ones too): where on the disk its data is."""
    pvs = {pv.name: pv for pv in vg.pvs}
    rows: list[list[Any]] = []
    for lv in vg.lvs:
        for n, s in enumerate(lv.segments, 1):
            name, size = lv.name if lv.visible else f"[{lv.name}]", human_bytes(lv.size_bytes)
            pv = pvs.get(s.pv_name)
            if pv is None:
                kind = f"striped x{s.stripe_count}" if s.type == "striped" else s.type
                rows.append([vg.name, name, size, n, kind, "-", f"{s.extent_count}", "-"])
                continue
            where = "whole disk" if pv.partition is None else f"partition {pv.partition}"
            extents = f"{s.pv_start_extent}-{s.pv_start_extent + s.extent_count - 1}"
            rows.append(
                [vg.name, name, size, n, "linear", f"{pv.name} ({where})", extents, f"{s.disk_offset:,}"]
            )
    columns = [
        "volume group",
        "volume",
        "size",
        "segment",
        "type",
        "physical volume",
        "extents",
        "disk offset",
    ]
    return Table(rows, columns)
