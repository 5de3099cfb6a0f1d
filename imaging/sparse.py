"""Sparse-aware copying and hashing: cost follows the data in an image, not its virtual size.

Holes are found with SEEK_DATA/SEEK_HOLE and skipped; data moves with copy_file_range, so the
kernel copies (or reflinks, on filesystems that can) without the bytes passing through Python.
Nothing here ever holds more than one chunk of an image in memory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from imaging.errors import SpaceError
from imaging.progress import bytes_bar
from imaging.records import human_bytes

CHUNK = 16 << 20
_ZEROS = memoryview(bytes(CHUNK))
_ZERO_STEP = 1 << 20


@functools.cache
def _zeros(length: int) -> bytes:
    return bytes(length)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` is all zero bytes. Compared as bytes, a MiB at a time: CPython compares a
    memoryview with anything element by element (0.3-0.5 GB/s here), bytes with memcmp (a copy
    and the compare: 20 GB/s); the node copy's zero check had cost more than its sha256."""
    view = memoryview(data)
    for start in range(0, len(view), _ZERO_STEP):
        piece = view[start : start + _ZERO_STEP].tobytes()
        if piece != _zeros(len(piece)):
            return False
    return True


def data_extents(fd: int, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """Yield (offset, length) of each data region of ``fd`` within [start, end)."""
    if end is None:
        end = os.fstat(fd).st_size
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            raise
        if data >= end:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        stop = min(hole, end)
        yield data, stop - data
        pos = stop


def data_bytes(path: Path, start: int = 0, end: int | None = None) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(length for _, length in data_extents(fd, start, end))
    finally:
        os.close(fd)


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@dataclass(frozen=True)
class CopyStats:
    bytes: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


def _copy_chunk(sfd: int, dfd: int, n: int, soff: int, doff: int) -> int:
    try:
        return os.copy_file_range(sfd, dfd, n, soff, doff)
    except OSError as e:
        # Cross-device copies on old kernels, and some special files, cannot use it.
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    buf = os.pread(sfd, n, soff)
    return os.pwrite(dfd, buf, doff)


def copy_range(
    src: Path,
    dst: Path,
    *,
    src_offset: int = 0,
    length: int | None = None,
    dst_offset: int = 0,
    desc: str = "copy",
) -> CopyStats:
    """Copy the data of ``src[src_offset:src_offset+length]`` into ``dst`` at ``dst_offset``.

    ``dst`` must already exist with its final size (create it sparse with truncate); holes in the
    source stay holes in the destination.
    """
    t0 = time.monotonic()
    sfd = os.open(src, os.O_RDONLY)
    try:
        end = os.fstat(sfd).st_size if length is None else src_offset + length
        extents = list(data_extents(sfd, src_offset, end))
        total = sum(n for _, n in extents)
        dfd = os.open(dst, os.O_WRONLY)
        try:
            with bytes_bar(total, desc) as bar:
                for offset, n in extents:
                    done = 0
                    while done < n:
                        step = _copy_chunk(
                            sfd,
                            dfd,
                            min(CHUNK, n - done),
                            offset + done,
                            dst_offset + offset - src_offset + done,
                        )
                        if step <= 0:
                            raise OSError(errno.EIO, f"short copy from {src} at {offset + done}")
                        done += step
                        bar.update(step)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return CopyStats(total, time.monotonic() - t0)


_FICLONE = 0x40049409


def clone_or_copy(src: Path, dst: Path, *, desc: str = "copy") -> str:
    """``dst`` (new) with ``src``'s content, as its own file: a copy-on-write clone where the
    filesystem has them, else a sparse copy; says which."""
    with open(src, "rb") as s, open(dst, "wb") as d:
        try:
            fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
            return "copy-on-write clone"
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EPERM):
                raise
    create_sparse(dst, src.stat().st_size)
    copy_range(src, dst, desc=desc)
    return "sparse copy"


def create_sparse(path: Path, size: int) -> None:
    """A new file of ``size`` bytes, all hole."""
    with open(path, "wb") as f:
        f.truncate(size)


def _sync(path: Path, sync: Callable[[int], None], flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        sync(fd)
    finally:
        os.close(fd)


def flush(path: Path) -> None:
    """Put ``path``'s data on disk (fdatasync)."""
    _sync(path, os.fdatasync)


def sha256(path: Path, desc: str | None = "sha256") -> str:
    """sha256 of the whole file; holes are hashed as the zeros they read as, without reading them.

    ``desc=None`` hashes without a progress bar (for hashing beside other work)."""
    h = hashlib.sha256()
    # One buffer read into again and again: a fresh 16 MiB per read costs as much in page faults
    # on these machines as the hashing (0.9 s instead of 0.6 s for 900 MB).
    buf = memoryview(bytearray(CHUNK))
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        with bytes_bar(size, desc) as bar:
            for offset, n in [*data_extents(fd, 0, size), (size, 0)]:
                while pos < offset:  # the hole before this extent
                    step = min(CHUNK, offset - pos)
                    h.update(_ZEROS[:step])
                    pos += step
                    bar.update(step)
                end = offset + n
                while pos < end:
                    got = os.preadv(fd, [buf[: min(CHUNK, end - pos)]], pos)
                    if not got:
                        raise OSError(errno.EIO, f"{path} shrank while hashing")
                    h.update(buf[:got])
                    pos += got
                    bar.update(got)
    finally:
        os.close(fd)
    return h.hexdigest()


# The content digest: a hash list over 1 MiB blocks, so that a hole costs what its place in the
# list costs (32 bytes hashed), not what reading and hashing its zeros would.
DIGEST_BLOCK = 1 << 20
DIGEST_NAME = "sha256-1MiB-list"
_ZERO_BLOCK_DIGEST = hashlib.sha256(bytes(DIGEST_BLOCK)).digest()


def content_digest(path: Path, *, workers: int = 2) -> str:
    """``sha256-1MiB-list:<hex>``: the sha256 of the sha256 digests of every 1 MiB block of the
    file in order (the last one as long as it is), a block that holds no data taking the
    digest of zeros without being read.

    An identity of the content alone, which costs the data, not the virtual size: a 20 GiB disk
    holding 600 MiB reads and hashes 600 MiB (on ``workers`` threads: blocks are independent),
    where a plain sha256 hashes 20 GiB of zeros too (one core, 11 s here). The same content
    gives the same digest however sparse the file is (a written zero block hashes like a hole);
    any changed byte changes its block's digest and so the whole. Not what ``sha256sum`` prints:
    where a user asks for that, :func:`sha256` pays the virtual size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        blocks = -(-size // DIGEST_BLOCK)
        touched: list[int] = []  # blocks holding data, in order
        for offset, length in data_extents(fd, 0, size):
            first, last = offset // DIGEST_BLOCK, -(-(offset + length) // DIGEST_BLOCK)
            start = max(first, touched[-1] + 1) if touched else first
            touched.extend(range(start, last))
        local = threading.local()

        def leaf(block: int) -> bytes:
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = memoryview(bytearray(DIGEST_BLOCK))
            want = min(DIGEST_BLOCK, size - block * DIGEST_BLOCK)
            got = os.preadv(fd, [buf[:want]], block * DIGEST_BLOCK)
            if got != want:
                raise OSError(errno.EIO, f"{path} shrank while hashing")
            return hashlib.sha256(buf[:want]).digest()

        top = hashlib.sha256()
        pos = 0

        def holes(upto: int) -> None:
            nonlocal pos
            while pos < upto:
                n = min(upto - pos, 1 << 16)
                top.update(_ZERO_BLOCK_DIGEST * n)
                pos += n

        with ThreadPoolExecutor(workers, thread_name_prefix="digest") as pool:
            for block, digest in zip(touched, pool.map(leaf, touched), strict=True):
                holes(block)
                top.update(digest)
                pos = block + 1
        tail = size % DIGEST_BLOCK
        if tail and (not touched or touched[-1] != blocks - 1):  # a short last block, all hole
            holes(blocks - 1)
            top.update(hashlib.sha256(bytes(tail)).digest())
            pos = blocks
        holes(blocks)
    finally:
        os.close(fd)
    return f"{DIGEST_NAME}:{top.hexdigest()}"


def sha256_of(chunks: Iterable[bytes]) -> str:
    """:func:`sha256` of a stream of bytes."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def content_digest_of(chunks: Iterable[bytes]) -> str:
    """:func:`content_digest` of a stream of bytes (a zero block hashes as a hole does)."""
    top, block = hashlib.sha256(), bytearray()
    for chunk in chunks:
        block += chunk
        while len(block) >= DIGEST_BLOCK:
            top.update(hashlib.sha256(memoryview(block)[:DIGEST_BLOCK]).digest())
            del block[:DIGEST_BLOCK]
    if block:
        top.update(hashlib.sha256(block).digest())
    return f"{DIGEST_NAME}:{top.hexdigest()}"


def write_sha256_file(path: Path, digest: str, beside: Path | None = None, *, tag: str = "") -> Path:
    """``<file>.sha256`` beside the file (or at ``beside``), in the format ``sha256sum -c`` reads;
    on disk, under its name, before this returns."""
    side = beside or path.with_name(path.name + ".sha256")
    with atomic_path(side, durable=True, tag=tag) as tmp:
        tmp.write_text(f"{digest}  {path.name}\n", encoding="utf-8")
    return side


def part_path(path: Path, tag: str = "") -> Path:
    """The in-progress name of ``path``: hidden, same directory (so the rename is atomic). With
    ``tag`` (a run id) it is that run's own: ``.<name>~<tag>.part``, which no other run's
    can be (names and run ids hold no '~'), so a run cleans up after itself alone."""
    return path.with_name(f".{path.name}~{tag}.part" if tag else f".{path.name}.part")


def fsync_dir(directory: Path) -> None:
    """Put ``directory``'s entries on disk: a rename is durable only once its directory is."""
    _sync(directory, os.fsync, os.O_RDONLY | os.O_DIRECTORY)


def make_durable(path: Path) -> None:
    """``path``'s data and its name in its directory on disk."""
    _sync(path, os.fsync)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: Path, *, durable: bool = False, tag: str = "") -> Iterator[Path]:
    """Write to a temporary name and rename over ``path`` only if the block completes.

    On any exception (including Ctrl-C) the temporary file is removed: nothing half-written is
    ever left at a final path. ``durable``: the data is on disk before the rename, and the
    rename before this returns (a power cut leaves the old file or the new one, never an
    empty one). ``tag``: see :func:`part_path`.
    """
    tmp = part_path(path, tag)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def space_message(directory: Path, need: int, what: str, free: int) -> str:
    return f"not enough free space in {directory} to {what}: need about {human_bytes(need)}, have {human_bytes(free)}"


def check_space(directory: Path, need: int, what: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < need:
        raise SpaceError(space_message(directory, need, what, free))
