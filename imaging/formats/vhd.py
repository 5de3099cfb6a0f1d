"""VHD's footer, read by our own code, and the fixed VHD that Azure takes.

Every VHD ends with a 512-byte footer (a dynamic one keeps a copy in its first sector too) that
says what it is: disk type 2 (fixed), 3 (dynamic) or 4 (differencing), the disk's size, a
checksum. A fixed VHD is nothing but the raw disk followed by that footer, so qemu-img probes
it as raw (the footer is just one more sector to it): whoever reads one must name the format,
and :func:`read_footer` is how this package tells.

Azure takes only fixed VHDs whose size is a whole number of MiB. :func:`write_fixed` makes one:
a sparse file of the rounded size with the footer that ``qemu-img convert -O vpc -o
subformat=fixed,force_size`` writes (Microsoft's guide for Azure uses that command; a test holds
the two footers byte for byte the same), its UUID and creation time derived from the disk
(:mod:`imaging.formats.identity`) instead of random; then ``qemu-img convert -n`` copies the disk
into it. The padding is a hole, not written zeros: the file is as sparse as the raw disk and
costs no more to write. (``qemu-img create`` would make the same file, but it fsyncs it, which
took 0.4 to 4.5 s on a busy host; the artifact is flushed once, at the end, anyway.)
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from imaging.disk import images
from imaging.errors import ImagingError
from imaging.formats import identity
from imaging.records import Record

FOOTER = 512
COOKIE = b"conectix"
KINDS = {2: "fixed", 3: "dynamic", 4: "differencing"}
MIB = 1 << 20


class VhdError(ImagingError):
    """A VHD whose footer is not what it must be."""


@dataclass(frozen=True)
class Footer(Record):
    disk_type: int  # 2 fixed, 3 dynamic, 4 differencing
    kind: str
    current_size: int  # the disk's size in bytes, as Hyper-V and Azure read it
    original_size: int
    creator: str  # the creator application (qemu-img writes "qem2": size from current_size)
    uuid: str
    checksum_ok: bool
    data_offset: int  # where a dynamic disk's header is; all ones for a fixed disk
    file_size: int

    @property
    def mib_aligned(self) -> bool:
        return self.current_size % MIB == 0


def parse_footer(raw: bytes, file_size: int = 0) -> Footer | None:
    """The footer in ``raw`` (512 bytes), or None when it is not a VHD footer."""
    if len(raw) != FOOTER or raw[:8] != COOKIE:
        return None
    data_offset, = struct.unpack_from(">Q", raw, 16)  # fmt: skip
    original, current = struct.unpack_from(">QQ", raw, 40)
    disk_type, checksum = struct.unpack_from(">II", raw, 60)
    return Footer(
        disk_type=disk_type,
        kind=KINDS.get(disk_type, f"unknown ({disk_type})"),
        current_size=current,
        original_size=original,
        creator=raw[28:32].decode("latin-1"),
        uuid=str(uuid.UUID(bytes=raw[68:84])),
        checksum_ok=checksum == identity.vhd_checksum(raw),
        data_offset=data_offset,
        file_size=file_size,
    )


def read_footer(path: Path) -> Footer | None:
    """The footer at the end of ``path``, or None when the file does not end with one."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < FOOTER:
            return None
        f.seek(size - FOOTER)
        return parse_footer(f.read(FOOTER), size)


def check_fixed(path: Path) -> Footer:
    """The footer of a fixed VHD as Azure takes it, checked: disk type 2, a good checksum, a
    size that is a whole number of MiB, and the data exactly that size before the footer."""
    footer = read_footer(path)
    if footer is None:
        raise VhdError(f"{path.name} does not end with a VHD footer")
    problems = []
    if footer.disk_type != 2:
        problems.append(f"disk type {footer.disk_type} ({footer.kind}), not 2 (fixed)")
    if not footer.checksum_ok:
        problems.append("the footer's checksum is wrong")
    if not footer.mib_aligned:
        problems.append(f"size {footer.current_size} is not a whole number of MiB")
    if footer.file_size != footer.current_size + FOOTER:
        problems.append(
            f"file is {footer.file_size} bytes, not the size {footer.current_size} and the footer"
        )
    if problems:
        raise VhdError(f"{path.name}: " + "; ".join(problems))
    return footer


# What qemu-img writes into a fixed VHD's footer with force_size: its creator "qem2" (readers take
# the size from current_size, not from the geometry), version 5.3 on "Wi2k", and the largest CHS
# geometry (65535 cylinders, 16 heads, 255 sectors), which tells Virtual PC the same.
_CREATOR, _CREATOR_VERSION, _CREATOR_OS = b"qem2", 0x00050003, b"Wi2k"
_MAX_GEOMETRY = struct.pack(">HBB", 65535, 16, 255)
_EPOCH_2000 = 946_684_800


def footer(size: int, ident: uuid.UUID, created: int = identity.FIXED_TIME) -> bytes:
    """The 512-byte footer of a fixed VHD of ``size`` bytes (VHD specification 1.0)."""
    raw = bytearray(FOOTER)
    struct.pack_into(">8sIIQI4sI4sQQ4sI", raw, 0, COOKIE, 2, 0x00010000, 0xFFFFFFFFFFFFFFFF,
                     created - _EPOCH_2000, _CREATOR, _CREATOR_VERSION, _CREATOR_OS, size, size,
                     _MAX_GEOMETRY, 2)  # fmt: skip
    raw[68:84] = ident.bytes
    struct.pack_into(">I", raw, 64, identity.vhd_checksum(raw))
    return bytes(raw)


def fixed_size(virtual_size: int) -> int:
    """The size of the fixed VHD's disk: ``virtual_size`` rounded up to a whole MiB."""
    return -(-virtual_size // MIB) * MIB


def write_fixed(
    src: Path, src_format: str, virtual_size: int, part: Path, seed: str, desc: str
) -> dict[str, object]:
    """A fixed VHD of ``src`` at ``part``, its size rounded up to a whole MiB; sparse."""
    size = fixed_size(virtual_size)
    ident = identity.derived_uuid(seed, "vhd")  # what identity.stamp gives a VHD qemu-img wrote
    with open(part, "wb") as f:
        f.truncate(size)
        f.seek(size)
        f.write(footer(size, ident))
    # -n: into the VHD just made (all hole, hence --target-is-zero: the disk's holes stay holes).
    images.qemu_convert(src, src_format, part, "vpc", options=["-n", "--target-is-zero"], desc=desc)
    read = check_fixed(part)
    return {"capacity": size, "padded_bytes": size - virtual_size, "footer": read.to_dict(),
            "identities": [f"uuid {ident}", f"timestamp {identity.FIXED_TIME}"]}  # fmt: skip
