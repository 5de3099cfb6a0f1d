"""Small filesystems for the full-disks campaign: a loop-mounted ext4 of a given size, a ballast
file that takes its free space at a chosen moment, and the planted files of a user.

Every loop device attached here is detached, and every mount unmounted, on every exit path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

MiB = 1 << 20


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout


def _take(fd: int, offset: int, size: int) -> bool:
    """``size`` more bytes for the file; False if they do not fit. A fallocate that fails keeps
    the blocks it took past the end of the file: a truncate from above gives them back."""
    try:
        os.posix_fallocate(fd, offset, size)
        return True
    except OSError:
        os.ftruncate(fd, offset + 4096)
        os.ftruncate(fd, offset)
        return False


class SmallFs:
    """An ext4 of ``size`` bytes on a loop device, mounted at ``mnt``; ``ballast`` takes space."""

    def __init__(self, backing: Path, mnt: Path, loop: str) -> None:
        self.backing = backing
        self.mnt = mnt
        self.loop = loop
        self.ballast = mnt / "ballast"

    def free(self) -> int:
        return shutil.disk_usage(self.mnt).free

    def used(self) -> int:
        st = os.statvfs(self.mnt)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def fill(self, leave: int) -> None:
        """The ballast grown (fallocate: at once, no data written) until less than 4 KiB more
        than ``leave`` bytes are free."""
        have = self.ballast.stat().st_size if self.ballast.exists() else 0
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            step = max(self.free() - leave, 0) // 4096 * 4096
            while step >= 4096:
                if self.free() - leave >= step and _take(fd, have, step):
                    have += step
                else:
                    step = step // 2 // 4096 * 4096
        finally:
            os.close(fd)

    def empty(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def grow(self, size: int) -> None:
        """The filesystem grown to ``size`` bytes while mounted (its loop device told first)."""
        os.truncate(self.backing, size)
        _run("losetup", "--set-capacity", self.loop)
        _run("resize2fs", self.loop)


@contextlib.contextmanager
def small_fs(size: int, *, under: Path | None = None) -> Iterator[SmallFs]:
    """A fresh ext4 of ``size`` bytes, mounted; gone (unmounted, detached, removed) afterwards."""
    base = Path(tempfile.mkdtemp(prefix="imaging-fullfs-", dir=under))
    backing, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    with open(backing, "wb") as f:
        f.truncate(size)
    # No reserved blocks (root would write into them: the "full" disk would not be), no journal
    # of its own size to guess about; lazy init off so no background writes change the figures.
    _run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(backing))
    loop = _run("losetup", "--find", "--show", str(backing)).strip()
    try:
        _run("mount", loop, str(mnt))
        try:
            yield SmallFs(backing, mnt, loop)
        finally:
            _unmount(mnt)
    finally:
        _run("losetup", "-d", loop)
        shutil.rmtree(base, ignore_errors=True)


def _unmount(mnt: Path) -> None:
    # A run's process still holding a file there is the product's leak: lazy, so the loop can go,
    # but the caller's leftovers check names it.
    proc = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=120)


def plant(directory: Path, names: dict[str, bytes]) -> dict[str, str]:
    """The user's own files in ``directory``; their digests, by name."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in names.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return digests(directory, names)


def digests(directory: Path, names: dict[str, bytes] | list[str]) -> dict[str, str]:
    found = {}
    for name in names:
        path = directory / name
        found[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    return found
