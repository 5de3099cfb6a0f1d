"""A cloud copy cut mid-way keeps what arrived, and the next attempt fetches only the rest.

Instances run to hundreds of GiB; a copy that starts again from byte zero after every cut link
may never finish. The ``.part`` file (sparse) stays, with a sidecar ``.<name>.part.json`` saying
which source it holds bytes of (``identity``: what must be equal for those bytes to be the same
bytes) and which byte ranges are held. A range is recorded only once its data is on disk
(fdatasync before the sidecar's atomic rename), so a SIGKILL or a power cut can lose recent
bytes, never claim bytes it does not have. The whole file is still checked against the cloud's
size and checksums at the end: a mismatch keeps nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imaging.clouds.transfer import SparseFile
from imaging.errors import SourceError
from imaging.sparse import is_zero, part_path

# Record held ranges at most this often: each record costs an fdatasync of the part file.
CHECKPOINT_SECONDS = 2.0


class Cut(SourceError):
    """A copy cut mid-way: what arrived is kept for the next attempt."""


# Failures after which what arrived is still good: the link went away, the time ran out, the
# user stopped the run. Anything else (a checksum mismatch) says the bytes are wrong.
_KEEP = (Cut, OSError, TimeoutError, EOFError, KeyboardInterrupt)


class RangeSet:
    """Disjoint, sorted half-open byte ranges [start, end)."""

    def __init__(self, ranges: list[tuple[int, int]] | None = None) -> None:
        self.ranges: list[tuple[int, int]] = []
        for start, end in ranges or []:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        merged: list[tuple[int, int]] = []
        for s, e in self.ranges:
            if e < start or s > end:
                merged.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        merged.append((start, end))
        merged.sort()
        self.ranges = merged

    def total(self) -> int:
        return sum(e - s for s, e in self.ranges)

    def prefix(self) -> int:
        return self.ranges[0][1] if self.ranges and self.ranges[0][0] == 0 else 0

    def missing(self, size: int) -> list[tuple[int, int]]:
        gaps, at = [], 0
        for s, e in self.ranges:
            if s > at:
                gaps.append((at, min(s, size)))
            at = max(at, e)
        if at < size:
            gaps.append((at, size))
        return [(s, e) for s, e in gaps if e > s]

    def copy(self) -> RangeSet:
        found = RangeSet()
        found.ranges = list(self.ranges)
        return found


def sidecar_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.part.json")


def _punch(fd: int, start: int, length: int) -> None:
    """Make [start, start+length) a hole again: bytes a cut attempt wrote there but never
    recorded must not survive where the next attempt finds only zeros to write."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    punch, keep_size = 0x02, 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if libc.fallocate(fd, punch | keep_size, ctypes.c_long(start), ctypes.c_long(length)) == 0:
        return
    if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(
            ctypes.get_errno(), f"punching a hole in a partial copy: {os.strerror(ctypes.get_errno())}"
        )
    zeros = bytes(1 << 20)
    for at in range(start, start + length, len(zeros)):
        os.pwrite(fd, zeros[: min(len(zeros), start + length - at)], at)


class Partial(SparseFile):
    """The ``.part`` file of a resumable copy: written at offsets, zero pieces left as holes, every
    write marked held; ``held`` already holds what an earlier attempt kept."""

    def __init__(self, path: Path, sidecar: Path, size: int, identity: dict[str, Any]) -> None:
        self.path, self.size, self.sidecar, self.identity = path, size, sidecar, identity
        self.held = RangeSet()
        self.data_bytes = 0
        kept = self._kept()
        if kept is None:
            path.unlink(missing_ok=True)
            sidecar.unlink(missing_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | (0 if kept else os.O_TRUNC), 0o644)
        os.ftruncate(self.fd, size)
        if kept is not None:
            self.held = RangeSet([(int(s), int(e)) for s, e in kept["held"]])
            self.data_bytes = int(kept.get("data_bytes", 0))
            for start, end in self.held.missing(size):
                _punch(self.fd, start, end - start)
        self.resumed_bytes = self.held.total()
        self._lock = threading.Lock()
        self._recorded = time.monotonic()
        # The periodic record runs beside the copy: its fdatasync waits for the disk, which the
        # copy need not (a Glance download of 1.26 GB of data stalled 2-3 s in them).
        self._recorder: threading.Thread | None = None
        self._recording = False
        self._record_lock = threading.Lock()
        self._record_failed: OSError | None = None

    def _kept(self) -> dict[str, Any] | None:
        """What an earlier attempt kept for this same source, if anything can be trusted."""
        try:
            kept = json.loads(self.sidecar.read_text())
            if not self.path.is_file() or self.path.stat().st_size != self.size:
                return None
            if kept.get("identity") != self.identity or kept.get("size") != self.size:
                return None
            ranges = kept["held"]
            if not all(0 <= int(s) < int(e) <= self.size for s, e in ranges):
                return None
            return dict(kept)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset + len(data) > self.size:
            raise OSError(f"a block at {offset} of {len(data)} bytes lies beyond the disk's {self.size}")
        zero = is_zero(data)
        if not zero:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        with self._lock:
            if not zero:
                self.data_bytes += len(data)
            self.held.add(offset, offset + len(data))
            failed, self._record_failed = self._record_failed, None
            # One record at a time, whichever of the writing threads finds it due.
            due = not self._recording and time.monotonic() - self._recorded >= CHECKPOINT_SECONDS
            if due:
                self._recording = True
                self._recorder = threading.Thread(
                    target=self._record_beside, name="record a partial copy", daemon=True
                )
                self._recorder.start()
        if failed is not None:
            raise failed

    def _record_beside(self) -> None:
        try:
            self._record()
        except OSError as e:  # the next write raises it
            with self._lock:
                self._record_failed = e
        finally:
            with self._lock:
                self._recording = False

    def record(self) -> None:
        """Put the held ranges on record; only bytes already on disk are recorded."""
        self._join_recorder()
        self._record()

    def _join_recorder(self) -> None:
        with self._lock:
            recorder = self._recorder
        if recorder is not None:
            recorder.join()

    def close(self) -> None:
        self._join_recorder()
        super().close()

    def _record(self) -> None:
        with self._record_lock:  # the record's one temporary name: one writer at a time
            with self._lock:
                held, data_bytes = self.held.copy(), self.data_bytes
                self._recorded = time.monotonic()
            os.fdatasync(self.fd)
            tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
            tmp.write_text(json.dumps({"identity": self.identity, "size": self.size, "held": held.ranges,
                                       "data_bytes": data_bytes}))  # fmt: skip
            os.replace(tmp, self.sidecar)

    def missing(self) -> list[tuple[int, int]]:
        with self._lock:
            return self.held.missing(self.size)

    def prefix(self) -> int:
        with self._lock:
            return self.held.prefix()

    def hash_prefix(self, h: Any, end: int) -> None:
        """Feed ``h`` the file's bytes [0, end): a resumed stream's digest covers what it kept."""
        at = 0
        while at < end:
            piece = os.pread(self.fd, min(16 << 20, end - at), at)
            if not piece:
                raise OSError(f"the partial copy ends at {at:,} of the {end:,} bytes it should hold")
            h.update(piece)
            at += len(piece)


@contextlib.contextmanager
def resumable_download(final: Path, size: int, identity: dict[str, Any]) -> Iterator[Partial]:
    """A sparse ``.part`` file of ``size`` bytes, renamed to ``final`` only when the block
    completes. On a cut (``Cut``, OSError, TimeoutError, EOFError, an interrupt) it stays, with its
    record, for the next call with the same ``identity`` and size; on any other failure both go."""
    part, sidecar = part_path(final), sidecar_path(final)
    out = Partial(part, sidecar, size, identity)
    try:
        yield out
    except _KEEP:
        with contextlib.suppress(OSError):
            out.record()
        out.close()
        raise
    except BaseException:
        out.close()
        part.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        raise
    out.close()
    os.replace(part, final)
    sidecar.unlink(missing_ok=True)
