"""What every cloud source shares: the downloaded disk, written sparse under a ``.part`` name and
renamed only when its size and checksums match, and a record of what was fetched."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaging.records import Record
from imaging.sparse import atomic_path, is_zero


@dataclass(frozen=True)
class Fetched(Record):
    """A disk copied out of a cloud into the run's work directory (``work/source.<format>``)."""

    source: str  # the SOURCE URI
    cloud: str
    kind: str
    path: str
    format: str  # raw or qcow2 (what the cloud gave)
    size_bytes: int
    data_bytes: int  # bytes written (holes are what the cloud said is empty, or zeros)
    digest: str  # of the whole disk as received: "sha256:<hex>" as it arrived, or sparse.content_digest
    verified: str  # what the copy was checked against
    seconds: float
    where: str  # the node, snapshot or image it came from
    snapshot: str = ""  # a snapshot or image made for the copy (and removed after it, unless kept)


class HashBeside:
    """A hash fed in a thread of its own: hashlib lets go of the GIL while it hashes, so a second
    digest of a download runs on another core rather than after the first (a Glance download's
    MD5 beside its SHA-512). Fed immutable ``bytes`` only: a chunk is hashed after it is handed
    over. At most ``depth`` chunks wait."""

    def __init__(self, h: Any, depth: int = 16) -> None:
        self.h = h
        self._chunks: queue.Queue[bytes | None] = queue.Queue(depth)
        self._thread = threading.Thread(target=self._feed, name=f"hash {h.name}", daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self.h.update(chunk)

    def update(self, data: bytes) -> None:
        self._chunks.put(bytes(data))  # a copy only when it is not bytes already

    def close(self) -> None:
        if self._thread.is_alive():
            self._chunks.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        return str(self.h.hexdigest())


class SparseFile:
    """A file being filled at offsets by one or more threads; zero pieces stay holes."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, size)
        self.data_bytes = 0
        self._lock = threading.Lock()

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset + len(data) > self.size:
            raise OSError(f"a block at {offset} of {len(data)} bytes lies beyond the disk's {self.size}")
        if is_zero(data):
            return
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        with self._lock:
            self.data_bytes += len(view)

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


@contextlib.contextmanager
def sparse_download(final: Path, size: int) -> Iterator[SparseFile]:
    """A sparse file of ``size`` bytes at ``final``'s ``.part`` name, renamed to ``final`` only
    when the block completes; on any error (a cut connection, a bad checksum) it is removed."""
    with atomic_path(final) as part:
        out = SparseFile(part, size)
        try:
            yield out
        finally:
            out.close()
