"""How big a disk each output format takes, known before any work starts.

A disk over its format's limit is refused with one line naming the limit and a format without
one, before a run exists (``convert`` and ``export`` on the command line, requests to the
service) and again when 40-export starts, before anything is written. qemu's numbers are
checked against qemu-img in ``tests/unit/formats/test_limits.py``; the VMDK ones follow from the
format and the layout each writer uses:

==========================  ================  ==================================================
raw                         none              (the filesystem holding it: 16 TiB on ext4)
qcow2 (and ``--compress``)  2 PiB             qemu's largest L1 table (32 MiB) with 64 KiB clusters
vmdk streamOptimized, ova   2031.9 GiB        grains addressed by 32-bit sector numbers (2 TiB of
                                              file), and data that does not shrink takes 129
                                              sectors per 128 (:data:`vmdk.MAX_CAPACITY`)
vmdk monolithicSparse       2047.7 GiB        the same 2 TiB of file, less qemu's grain tables
vdi                         512 TiB - 128 MiB qemu's VDI block map (2**29 - 128 blocks of 1 MiB)
vhd                         2040 GiB          qemu's VHD driver (0xff000000 sectors)
vhdx                        64 TiB            the VHDX specification and qemu
==========================  ================  ==================================================

The VMDK limits hold whatever the data: a disk at the limit full of data that does not compress
still fits. qemu-img itself creates monolithicSparse VMDKs of any size and fails (or writes a
broken header: 256 TiB gave a 64 KiB file) only later; the other qemu-img limits are its own
errors, here before the run instead of at its end.

What each writer makes of the disk's size (:func:`size_multiple`): raw, qcow2, vmdk (both
subformats), vdi, the dynamic vhd (``force_size``), vhdx and the OVA's disk keep it to the
sector (qemu-img and our own writers round a size that is not a whole number of sectors up to
one); the fixed VHD rounds it up to a whole MiB (Azure's rule) and the GCE image's ``disk.raw``
to a whole GiB (GCE's disks), both with a hole. A disk those two pad no longer ends where its
GPT's backup header lies (its last sector): a GPT disk for them is planned to the multiple.
"""

from __future__ import annotations

from dataclasses import dataclass

from imaging.config import ImageFormat, VmdkSubformat, load_target
from imaging.errors import ParameterError
from imaging.formats import gce, vhd, vmdk

GiB, TiB, PiB = 1 << 30, 1 << 40, 1 << 50


@dataclass(frozen=True)
class Limit:
    label: str  # the format as the user asked for it
    max_bytes: int  # the largest disk (virtual size) it takes
    why: str  # where the number comes from


def _sparse_vmdk_max() -> int:
    """The largest monolithicSparse VMDK qemu-img writes whatever the data: its layout
    (``vmdk_init_extent``: header, descriptor, grain directory and tables twice, then grains)
    with every grain allocated, the last grain starting below sector 2**32."""

    def fits(grains: int) -> bool:
        tables = -(-grains // vmdk.GTES_PER_GT)
        directory = -(-tables * 4 // vmdk.SECTOR)
        first = 1 + vmdk.DESCRIPTOR_SECTORS + 2 * (directory + 4 * tables)
        first = -(-first // vmdk.GRAIN_SECTORS) * vmdk.GRAIN_SECTORS
        return first + vmdk.GRAIN_SECTORS * (grains - 1) < vmdk.MAX_SECTORS

    return vmdk.largest(fits) * vmdk.GRAIN


_QCOW2 = Limit("qcow2", 2 * PiB, "qemu's largest L1 table, 32 MiB, with 64 KiB clusters")
_STREAM = (
    "grains addressed by 32-bit sector numbers, and data that does not compress takes 129 sectors per 128"
)
LIMITS: dict[tuple[ImageFormat, VmdkSubformat | None], Limit] = {
    (ImageFormat.qcow2, None): _QCOW2,
    (ImageFormat.vmdk, VmdkSubformat.stream_optimized): Limit(
        "vmdk (streamOptimized)", vmdk.MAX_CAPACITY, _STREAM
    ),
    (ImageFormat.vmdk, VmdkSubformat.monolithic_sparse): Limit(
        "vmdk (monolithicSparse)", _sparse_vmdk_max(), "grains addressed by 32-bit sector numbers"
    ),
    (ImageFormat.ova, None): Limit("ova (its streamOptimized VMDK)", vmdk.MAX_CAPACITY, _STREAM),
    (ImageFormat.vdi, None): Limit("vdi", (2**29 - 128) << 20, "qemu's VDI block map"),
    (ImageFormat.vhd, None): Limit("vhd", 0xFF000000 * 512, "qemu's VHD driver, 0xff000000 sectors"),
    (ImageFormat.vhdx, None): Limit("vhdx", 64 * TiB, "the VHDX specification"),
}


def limit_for(
    fmt: ImageFormat, vmdk_subformat: VmdkSubformat = VmdkSubformat.stream_optimized
) -> Limit | None:
    """The format's size limit; None for raw, which has none of its own."""
    return LIMITS.get((fmt, vmdk_subformat if fmt is ImageFormat.vmdk else None))


def size_text(n: int) -> str:
    """A size in the largest unit that states it exactly, else with one decimal rounded down
    (a limit is never shown above what it is): 2040 GiB, 2031.9 GiB, 511.9 TiB."""
    units = (("PiB", PiB), ("TiB", TiB), ("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10))
    for unit, scale in units[:3]:
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    for unit, scale in units:
        if n >= 4 * scale:
            tenths = n * 10 // scale
            return f"{tenths // 10}.{tenths % 10} {unit}"
    return f"{n} bytes"


def check_fits(disk_bytes: int, fmt: ImageFormat | str, vmdk_subformat: VmdkSubformat | str = "streamOptimized",
               *, what: str = "the disk") -> None:  # fmt: skip
    """Refuse a disk of ``disk_bytes`` that ``fmt`` cannot hold, in one line that names the
    limit and a format that takes it."""
    limit = limit_for(ImageFormat(fmt), VmdkSubformat(vmdk_subformat))
    if limit is None or disk_bytes <= limit.max_bytes:
        return
    instead = "raw has no size limit" + (
        "" if disk_bytes > _QCOW2.max_bytes else ", qcow2 takes up to 2 PiB"
    )
    raise ParameterError(
        f"{what} is {size_text(disk_bytes)} ({disk_bytes:,} bytes), over what {limit.label} holds: "
        f"{size_text(limit.max_bytes)} ({limit.max_bytes:,} bytes; {limit.why}); {instead}"
    )


def size_multiple(fmt: ImageFormat | str, target: str = "") -> int:
    """What the size of a disk for ``fmt`` (for ``target``, which says whether a VHD is fixed)
    must be a whole multiple of for its writer to keep it as it is: 512 (a sector) for every
    format but two, a MiB for the fixed VHD, a GiB for GCE's ``disk.raw``. A GPT disk whose size
    is not one has its backup header, in its last sector, end up before the padding."""
    image_format = ImageFormat(fmt)
    if image_format is ImageFormat.gce:
        return gce.GIB
    if image_format is ImageFormat.vhd and target and load_target(target).subformat(image_format) == "fixed":
        return vhd.MIB
    return vmdk.SECTOR
