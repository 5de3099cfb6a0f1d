"""Mounting guest filesystems: the one place that does it, and undoes it on every exit path.

Most of the pipeline never mounts (debugfs and e2fsprogs work on image files). Mounting is for
what needs the kernel's view of the files: copying them into a new filesystem (placement mkfs),
and later running the guest's own tools in a chroot. Each mount is noted in a ledger file in the
run directory before it is made and struck off after it is undone, so a run killed with SIGKILL
still gets its mounts released by :func:`release_leftovers` (the pipeline calls it after every
stage). Loop devices come from ``mount -o loop`` with autoclear: they go when the mount goes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from imaging import tools
from imaging.disk import ext
from imaging.errors import CommandError, ImagingError, SourceError

_LEDGER_ENV = "IMAGING_MOUNT_LEDGER"
_LOOP = "loop:"  # ledger keys of attached loop devices (the others are mountpoints)


def _ledger() -> Path | None:
    value = os.environ.get(_LEDGER_ENV)
    return Path(value) if value else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[dict[str, str]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = json.loads(path.read_text()) if path.exists() and path.read_text().strip() else {}
        yield entries
        path.write_text(json.dumps(entries, indent=1))


def _note(mountpoint: Path, what: str) -> None:
    ledger = _ledger()
    if ledger:
        with _locked(ledger) as entries:
            entries[str(mountpoint)] = what


def _strike(mountpoint: Path) -> None:
    ledger = _ledger()
    if ledger:
        with _locked(ledger) as entries:
            entries.pop(str(mountpoint), None)


def is_mounted(path: Path) -> bool:
    target = os.fspath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


def _umount(mountpoint: Path) -> None:
    for attempt in range(10):
        if not is_mounted(mountpoint):
            return
        result = tools.run(["umount", mountpoint], ok_codes=range(256), timeout=60)
        if result.exit_code == 0:
            return
        time.sleep(0.2 * (attempt + 1))  # "target is busy" right after rsync/chroot exits
    tools.run(["umount", "--lazy", mountpoint], ok_codes=range(256), timeout=60)


def _detach(device: str, image: str) -> None:
    """Detach loop ``device`` if it still holds ``image`` (a dead run's device may be reused)."""
    found = tools.run(["losetup", "--list", "--noheadings", "--output", "BACK-FILE", device],
                      ok_codes=range(256), timeout=60)  # fmt: skip
    if found.exit_code == 0 and found.stdout.strip() == image:
        tools.run(["losetup", "--detach", device], ok_codes=range(256), timeout=60)


def release_leftovers(ledger: Path) -> list[str]:
    """Unmount whatever a dead stage left behind; return what was released."""
    if not ledger.exists():
        return []
    released = []
    with _locked(ledger) as entries:
        # Loop devices after the mounts that use them; deepest mounts first (bind mounts inside
        # a guest before the guest itself).
        for key in [k for k in entries if not k.startswith(_LOOP)] + [
            k for k in entries if k.startswith(_LOOP)
        ]:
            if key.startswith(_LOOP):
                _detach(key.removeprefix(_LOOP), entries[key].rpartition("@")[0])
                released.append(key)
                entries.pop(key)
        for mountpoint in sorted(entries, key=len, reverse=True):
            mp = Path(mountpoint)
            if is_mounted(mp):
                _umount(mp)
                released.append(mountpoint)
            with contextlib.suppress(OSError):
                mp.rmdir()
            entries.pop(mountpoint)
    return released


@contextlib.contextmanager
def mounted(
    image: Path,
    *,
    offset: int = 0,
    size: int | None = None,
    readonly: bool,
    fstype: str,
    extra: list[str] | None = None,
    at: Path | None = None,
) -> Iterator[Path]:
    """Mount the filesystem at ``offset`` in ``image`` on a fresh directory (or on ``at``, a
    directory the caller resolved, inside a guest mounted before); always unmount."""
    if os.geteuid() != 0:
        raise ImagingError("mounting a guest filesystem needs root (placement copy does not)")
    mountpoint = at or Path(tempfile.mkdtemp(prefix="imaging-mnt-"))
    # A loop device already attached (several mounts of one btrfs share it) is mounted as it is.
    opts = [] if image.is_block_device() else ["loop", f"offset={offset}"]
    opts += ["nodev", "nosuid"]
    if size is not None and opts[0] == "loop":
        opts.append(f"sizelimit={size}")
    opts.append("ro" if readonly else "rw")
    opts += extra or []
    _note(mountpoint, f"{image}@{offset}")
    try:
        tools.run(["mount", "-t", fstype, "-o", ",".join(opts), image, mountpoint], timeout=120)
        yield mountpoint
    finally:
        _umount(mountpoint)
        if at is None:
            with contextlib.suppress(OSError):
                mountpoint.rmdir()
        _strike(mountpoint)


@contextlib.contextmanager
def attached(image: Path, *, offset: int = 0, size: int | None = None, readonly: bool) -> Iterator[Path]:
    """A loop device for the bytes [offset, offset+size) of ``image``, for the tools that take no
    offset (xfs_repair, btrfs check) and for several mounts of one btrfs; always detached."""
    if os.geteuid() != 0:
        raise ImagingError("attaching a loop device needs root")
    argv: list[str | Path] = ["losetup", "--find", "--show", "--offset", str(offset)]
    if size is not None:
        argv += ["--sizelimit", str(size)]
    if readonly:
        argv.append("--read-only")
    device = tools.run([*argv, image.resolve()], timeout=60).stdout.strip()
    key = f"{_LOOP}{device}"
    _note(Path(key), f"{image.resolve()}@{offset}")
    try:
        yield Path(device)
    finally:
        _detach(device, str(image.resolve()))
        _strike(Path(key))


def trim(image: Path, fstype: str, extra: list[str], what: str) -> None:
    """Mount our copy ``image`` read-write (which replays an XFS or btrfs log: nothing in user
    space does) and give its free space back as holes (fstrim: the loop device punches them);
    a filesystem that will not mount is one line naming ``what`` was being done."""
    try:
        with mounted(image, readonly=False, fstype=fstype, extra=extra) as root:
            tools.run(["fstrim", root], timeout=3600)
    except CommandError as e:
        detail = e.result.stderr_tail(1) if isinstance(e.result, tools.CommandResult) else str(e)
        name = {"xfs": "XFS"}.get(fstype, fstype)
        raise SourceError(f"the {name} filesystem cannot be mounted {what}: {detail}") from None


def copy_files_to_new_fs(
    instance: Path,
    disk: Path,
    offset: int,
    blocks: int,
    block_size: int,
    fs_type: str,
    uuid: str,
    label: str,
) -> tuple[int, float]:
    """The original procedure's placement: mkfs in the partition, mount both, copy every file.

    rsync with -aHAX --numeric-ids (plain -a, as in the original, loses hard links, ACLs and
    xattrs). The new filesystem keeps the instance's UUID and label so fstab and the boot menu
    still find it. Returns (bytes of files copied, seconds spent copying).
    """
    tools.require_tools("mke2fs", "rsync", "mount", reason="make a new filesystem and copy the files",
                        hint="apt install e2fsprogs rsync mount")  # fmt: skip
    argv = ["mke2fs", "-q", "-F", "-t", fs_type, "-b", str(block_size), "-E", f"offset={offset}", "-U", uuid]
    if label:
        argv += ["-L", label]
    tools.run([*argv, disk, str(blocks)], timeout=3600)
    src_fs = ext.read_superblock(ext.device(instance))
    if fs_type not in ext.TYPES or src_fs.fs_type not in ext.TYPES:
        raise ImagingError(f"placement mkfs makes ext filesystems only, not {fs_type}: use placement copy")
    t0 = time.monotonic()
    with (
        mounted(instance, readonly=True, fstype=src_fs.fs_type) as src,
        mounted(disk, offset=offset, size=blocks * block_size, readonly=False, fstype=fs_type) as dst,
    ):
        result = tools.run(
            ["rsync", "-aHAXS", "--numeric-ids", "--stats", f"{src}/", f"{dst}/"], timeout=24 * 3600
        )
    seconds = time.monotonic() - t0
    copied = 0
    for line in result.stdout.splitlines():
        if line.startswith("Total transferred file size:"):
            copied = int(line.split(":")[1].split()[0].replace(",", ""))
    return copied, seconds
