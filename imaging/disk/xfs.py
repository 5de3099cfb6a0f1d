"""XFS: the root of the RHEL family (7-9, Rocky, Alma, Oracle) and of Amazon Linux 2 and 2023.

The superblock is read here, from the image's bytes; checks are ``xfs_repair -n`` through a
read-only loop device (it takes no offset). Growing takes a mount (``xfs_growfs`` works on a
mounted filesystem only); XFS cannot shrink. Every mount says ``nouuid``: two XFS with one UUID
cannot be mounted at once, and the host may have one with the guest's UUID (a guest made from
the same image). An XFS copied from a running instance may have a dirty log: only a mount
replays it, so :func:`tidy` mounts our copy once (never the source), and a log that will not
replay is an error, as is anything ``xfs_repair -n`` finds after that.
"""

from __future__ import annotations

import re
import struct
import uuid as uuidlib
from pathlib import Path

from imaging import tools
from imaging.disk import mounts
from imaging.disk.common import CheckVerdict, FsInfo
from imaging.errors import SourceError

TYPES: tuple[str, ...] = ("xfs",)
GRUB_MODULE = "xfs"
KERNEL_MODULE = "xfs"
# A read-only look must not replay a log (that writes).
TOOLS: tuple[str, str] = ("xfs_repair -n", "xfs_growfs")  # check, grow
READ_ONLY_OPTIONS: list[str] = ["norecovery"]
_DIRTY_LOG = "valuable metadata changes in a log"


def info(image: Path, offset: int = 0) -> FsInfo:
    """The primary superblock's facts (big-endian fields at fixed places, xfs_format.h)."""
    with open(image, "rb") as f:
        f.seek(offset)
        sb = f.read(512)
    if len(sb) < 512 or sb[:4] != b"XFSB":
        raise SourceError("not an XFS superblock (no XFSB magic)")
    block_size, dblocks = struct.unpack_from(">IQ", sb, 4)
    fs_uuid = uuidlib.UUID(bytes=sb[32:48])
    label = sb[108:120].split(b"\0", 1)[0].decode("ascii", "replace")
    (fdblocks,) = struct.unpack_from(">Q", sb, 144)
    if block_size not in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536) or not 0 < dblocks < 1 << 48:
        raise SourceError(f"XFS superblock with a block size of {block_size} and {dblocks} blocks: corrupt")
    used = max(0, dblocks - min(fdblocks, dblocks)) * block_size
    return FsInfo("xfs", str(fs_uuid), label, block_size, dblocks, used)


def _summary(result: tools.CommandResult) -> str:
    lines = [x.strip() for x in (result.stderr + result.stdout).splitlines()]
    keep = [x for x in lines if x and not x.startswith(("Phase ", "- ", "No modify flag", "Cannot get host",
                                                          "Repair may fail", "the image and the host"))]  # fmt: skip
    return "; ".join(keep[-2:]) or "no problems found"


def _repair_n(device: Path) -> CheckVerdict:
    result = tools.run(["xfs_repair", "-n", device], ok_codes=range(256), timeout=3600)
    if _DIRTY_LOG in result.stderr + result.stdout:
        return CheckVerdict("xfs_repair -n", 2, "the log holds changes not yet replayed")
    return CheckVerdict("xfs_repair -n", result.exit_code, _summary(result))


def check(image: Path, offset: int = 0, size: int | None = None, *, repair: bool = False) -> CheckVerdict:
    """``xfs_repair -n``; a filesystem it finds fault with is refused. ``repair`` changes nothing:
    a copy that needs more than its log replayed is not ours to fix."""
    tools.require_tools("xfs_repair", reason="check an XFS filesystem", hint="apt install xfsprogs")
    with mounts.attached(image, offset=offset, size=size, readonly=True) as device:
        verdict = _repair_n(device)
    if not verdict.ok:
        raise SourceError(f"xfs_repair -n: the XFS filesystem needs repair: {verdict.summary}")
    return verdict


def tidy(image: Path) -> CheckVerdict:
    """Our copy: its log replayed by a mount (when dirty), free space trimmed into holes, checked."""
    tools.require_tools("xfs_repair", "fstrim", reason="check an XFS filesystem",
                        hint="apt install xfsprogs util-linux")  # fmt: skip
    mounts.trim(image, "xfs", mount_options(), "to replay its log")
    return check(image)


def grow(image: Path, offset: int, size: int) -> bool:
    """Fill ``size`` bytes at ``offset``: a mount and ``xfs_growfs`` (XFS grows only mounted)."""
    fs = info(image, offset)
    blocks = size // fs.block_size
    if blocks <= fs.block_count:
        return False
    with mounts.mounted(
        image, offset=offset, size=size, readonly=False, fstype="xfs", extra=mount_options()
    ) as root:
        tools.run(["xfs_growfs", "-d", root], timeout=3600)
    return info(image, offset).block_count > fs.block_count


def exists(image: Path, path: str, *, offset: int = 0, size: int | None = None) -> bool:
    """Whether ``path`` is in the XFS at ``offset``, looked up by ``xfs_db`` (user space, no mount)."""
    if not re.fullmatch(r"(/[A-Za-z0-9._-]+)+", path):
        raise ValueError(f"not a plain path: {path!r}")
    with mounts.attached(image, offset=offset, size=size, readonly=True) as device:
        found = tools.run(["xfs_db", "-r", "-c", f"path {path}", device], ok_codes=range(256), timeout=120)
    return found.exit_code == 0 and not found.stderr.strip()


def mount_options() -> list[str]:
    return ["nouuid"]
