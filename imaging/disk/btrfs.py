"""btrfs: the root of Fedora (Cloud and Workstation) and openSUSE, in subvolumes.

The superblock (64 KiB in) is read here from the image's bytes; ``btrfs check --readonly`` runs
on a read-only loop device. Growing (``btrfs filesystem resize max``) and everything about
subvolumes take a mount. Which subvolume is the root is the guest's own word: the subvolume
whose ``/etc/fstab`` mounts it at ``/`` (``subvol=root`` on Fedora), else the default subvolume
(openSUSE's snapshot). GRUB reads paths from the top level, so the root's path there is kept
(``Instance.subvolume``) for the boot menu and for ``rootflags=subvol=``.

The guest's snapshots (read-only subvolumes no fstab entry mounts) are dropped by default: a
snapshot taken before cleaning still holds every key, history and log that 10-clean removes
from the live root. ``snapshots="keep"`` keeps them for a guest that rolls back to them.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
import struct
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

from imaging import tools
from imaging.disk import mounts
from imaging.disk.common import CheckVerdict, FsInfo
from imaging.disk.files import Guest
from imaging.errors import SourceError

TYPES: tuple[str, ...] = ("btrfs",)
GRUB_MODULE = "btrfs"
KERNEL_MODULE = "btrfs"
SUPERBLOCK = 0x10000
_MAGIC = b"_BHRfS_M"
# A read-only look never replays the log tree (it would write; the source is read-only anyway).
TOOLS: tuple[str, str] = ("btrfs check --readonly", "btrfs filesystem resize max")  # check, grow
READ_ONLY_OPTIONS: list[str] = ["rescue=nologreplay"]
_COMPRESS = re.compile(r"compress(-force)?=(zlib|lzo|zstd)(:[0-9]{1,2})?")
# Subvolumes we look at for a root: a real system has a handful, a snapper one some hundreds.
_MAX_SUBVOLUMES = 4096


def info(image: Path, offset: int = 0) -> FsInfo:
    """The superblock's facts (little-endian fields at fixed places, btrfs_super_block)."""
    with open(image, "rb") as f:
        f.seek(offset + SUPERBLOCK)
        sb = f.read(4096)
    if len(sb) < 4096 or sb[0x40:0x48] != _MAGIC:
        raise SourceError("not a btrfs superblock (no _BHRfS_M magic at 64 KiB)")
    total, used = struct.unpack_from("<QQ", sb, 0x70)
    (devices,) = struct.unpack_from("<Q", sb, 0x88)
    (sector,) = struct.unpack_from("<I", sb, 0x90)
    if devices != 1:
        raise SourceError(
            f"the btrfs filesystem spans {devices} devices: only a single-device btrfs can be placed"
        )
    if sector not in (4096, 8192, 16384, 65536) or not 0 < total < 1 << 60:
        raise SourceError(f"btrfs superblock with a sector size of {sector} and {total} bytes: corrupt")
    label = sb[0x12B : 0x12B + 256].split(b"\0", 1)[0].decode("utf-8", "replace")
    fs_uuid = uuidlib.UUID(bytes=sb[0x20:0x30])
    return FsInfo("btrfs", str(fs_uuid), label, sector, total // sector, min(used, total))


def _checked(device: Path) -> CheckVerdict:
    result = tools.run(["btrfs", "check", "--readonly", device], ok_codes=range(256), timeout=3600)
    lines = [x.strip() for x in (result.stderr + result.stdout).splitlines() if x.strip()]
    errors = [x for x in lines if re.search(r"\berror|ERROR|corrupt|mismatch|not found\b", x)]
    summary = "; ".join((errors or lines)[-2:]) or "no problems found"
    return CheckVerdict("btrfs check --readonly", result.exit_code, summary)


def check(image: Path, offset: int = 0, size: int | None = None, *, repair: bool = False) -> CheckVerdict:
    """``btrfs check --readonly``; what it finds is refused (``repair`` changes nothing: btrfs
    check's own repair is documented as a last resort, never ours to run on a user's data)."""
    tools.require_tools("btrfs", reason="check a btrfs filesystem", hint="apt install btrfs-progs")
    with mounts.attached(image, offset=offset, size=size, readonly=True) as device:
        verdict = _checked(device)
    if not verdict.ok:
        raise SourceError(f"btrfs check --readonly: the btrfs filesystem needs repair: {verdict.summary}")
    return verdict


@contextlib.contextmanager
def top_level(image: Path, *, offset: int = 0, size: int | None = None, writable: bool) -> Iterator[Path]:
    """The whole filesystem mounted from its top level (subvolume 5), every subvolume under it."""
    extra = ["subvolid=5"] + ([] if writable else [*READ_ONLY_OPTIONS, "noexec"])
    with mounts.mounted(
        image, offset=offset, size=size, readonly=not writable, fstype="btrfs", extra=extra
    ) as top:
        yield top


def tidy(image: Path) -> CheckVerdict:
    """Our copy: its log tree replayed by a mount, free space trimmed into holes, checked."""
    tools.require_tools("btrfs", "fstrim", reason="check a btrfs filesystem",
                        hint="apt install btrfs-progs util-linux")  # fmt: skip
    mounts.trim(image, "btrfs", ["subvolid=5"], "to replay its log")
    return check(image)


def grow(image: Path, offset: int, size: int) -> bool:
    """Fill ``size`` bytes at ``offset``: ``btrfs filesystem resize max`` on a mount."""
    fs = info(image, offset)
    if size // fs.block_size <= fs.block_count:
        return False
    with top_level(image, offset=offset, size=size, writable=True) as top:
        tools.run(["btrfs", "filesystem", "resize", "max", top], timeout=3600)
    return info(image, offset).block_count > fs.block_count


def mount_options() -> list[str]:
    return []


# -- subvolumes -----------------------------------------------------------------------------


def subvolumes(top: Path, *, snapshots_only: bool = False) -> list[str]:
    """Paths from the top level of the subvolumes of the filesystem mounted at ``top``."""
    argv: list[str | Path] = ["btrfs", "subvolume", "list", "-a", *(["-s"] if snapshots_only else []), top]
    out = tools.run(argv, timeout=300).stdout
    paths = []
    for line in out.splitlines()[:_MAX_SUBVOLUMES]:
        m = re.search(r" path (.+)$", line)
        if m:
            paths.append(m.group(1).removeprefix("<FS_TREE>/"))
    return paths


def default_subvolume(top: Path) -> str:
    """The default subvolume's path from the top level ("" for the top level itself)."""
    out = tools.run(["btrfs", "subvolume", "get-default", top], timeout=300).stdout
    m = re.search(r" path (.+)$", out.strip())
    return m.group(1).removeprefix("<FS_TREE>/") if m and not out.startswith("ID 5 ") else ""


def root_entry_subvolume(fstab: str) -> str | None:
    """The ``subvol=`` of fstab's ``/`` entry: its path without a leading slash, "" when the
    entry names none (the default subvolume is mounted), None when there is no ``/`` entry."""
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) >= 4 and not fields[0].startswith("#") and fields[1] == "/":
            for option in fields[3].split(","):
                if option.startswith("subvol="):
                    return posixpath.normpath("/" + option.removeprefix("subvol=")).lstrip("/")
            return ""
    return None


def fstab_subvolumes(fstab: str) -> dict[str, str]:
    """Mount point -> subvolume path (no leading slash) for every fstab entry with ``subvol=``."""
    found = {}
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) >= 4 and not fields[0].startswith("#") and fields[2] == "btrfs":
            for option in fields[3].split(","):
                if option.startswith("subvol="):
                    found[fields[1]] = posixpath.normpath("/" + option.removeprefix("subvol=")).lstrip("/")
    return found


def compression(fstab: str) -> list[str]:
    """The root entry's compression (``compress=zstd:1`` on Fedora), so that what we write into
    the guest is stored as the guest's own writes are: GRUB then reads compressed extents too."""
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) >= 4 and not fields[0].startswith("#") and fields[1] == "/":
            return [o for o in fields[3].split(",") if _COMPRESS.fullmatch(o)][:1]
    return []


def _root_in(top: Path) -> str | None:
    default = default_subvolume(top)
    candidates = list(dict.fromkeys([default, "", *subvolumes(top)]))
    with Guest(top) as g:
        for path in candidates:
            fstab = g.read_text(posixpath.join("/", path, "etc/fstab"))
            named = root_entry_subvolume(fstab) if fstab is not None else None
            if named == path or (named == "" and path == default):
                return path
    return None


def find_root(image: Path, *, offset: int = 0, size: int | None = None) -> str | None:
    """The root subvolume's path from the top level ("" for the top level), or None when no
    subvolume holds an ``/etc/fstab`` that mounts it at ``/``. Looked at read-only."""
    with top_level(image, offset=offset, size=size, writable=False) as top:
        return _root_in(top)


def drop_snapshots(image: Path, keep: set[str]) -> list[str]:
    """Delete our copy's snapshots except those in ``keep`` (the root, fstab's subvolumes, and
    whatever holds them); return the paths dropped."""
    dropped = []
    with top_level(image, writable=True) as top:
        for path in sorted(subvolumes(top, snapshots_only=True), key=lambda p: -p.count("/")):
            if any(path == k or k.startswith(path + "/") for k in keep):
                continue
            tools.run(["btrfs", "subvolume", "delete", "--commit-after", top / path], timeout=600)
            dropped.append(path)
        if dropped:
            tools.run(["btrfs", "subvolume", "sync", top], timeout=3600)
    return dropped
