"""Deflate for the grains of a streamOptimized VMDK and the clusters of a compressed qcow2:
libdeflate level 1 for VMDK grains, zlib level 1 for qcow2 clusters, and no deflating at all of
data that will not shrink.

Why libdeflate for VMDK grains: on a disk of real OS files (programs, libraries, docs: what
images are made of) its level 1 deflates 2.1x as fast as zlib's level 1 (206 against 98 MB/s per
core here) into slightly fewer bytes (1.08x qemu-img's zlib level 6, against zlib level 1's
1.09x). Its output depends only on the input and the library's version: one thread per call, no
randomness, the same match finder on every CPU (SIMD only fills tables and sums checksums), and
the version is pinned (the ``deflate`` wheel links it statically). A grain is a whole buffer, so
libdeflate's lack of streaming costs nothing. qcow2 cannot use it: qemu inflates compressed
clusters with a 4 KiB window (``inflateInit2(-12)``) and libdeflate always uses 32 KiB, so
qcow2 clusters stay on zlib with ``wbits=-12``.

Rejected because the same disk must give the same bytes: ISA-L (python-isal, 8x zlib level 1)
gave other bytes for the same 64 KiB now and then: on two threads of one process even with every
buffer zeroed (a C test against Debian's libisal 2.30), and through python-isal even in separate
single-threaded processes (3 different streams in 4 runs over the benchmark disk). The output
stays valid, only the matches chosen differ. zlib-ng level 1 is 2.6x zlib's speed on real files
but 1.31x zlib level 6's size (over the 1.10x allowed), level 2 only 1.4x zlib's speed;
zlib-ng#2100 was a case of its output depending on earlier data in memory. Both libdeflate and
zlib release the GIL, so the writers use every core.

Why a probe: part of a real image's data is already compressed (packages, initrds, media), and
deflate spends its slowest work there for nothing (libdeflate 154 MB/s per core on such data).
Before deflating a 64 KiB unit we deflate two 2 KiB samples of it (libdeflate level 1, 6 % of a
unit's cost); when they do not shrink by 3 %, the unit is stored (a zlib stream of stored blocks
for a VMDK grain; the cluster as it is in qcow2, as qemu does for clusters that do not shrink).
The decision depends only on the data, so the output stays deterministic.
"""

from __future__ import annotations

import ctypes
import functools
import zlib

import deflate as libdeflate

LEVEL = 1
# The probe: two samples of SAMPLE bytes (at the start and the middle of the unit), deflated
# together; the unit is deflated only if they shrink below STORE_ABOVE of their size.
SAMPLE = 2048
STORE_ABOVE = 0.97
DESCRIPTION = (
    f"libdeflate level {LEVEL} (qcow2: zlib level {LEVEL}); units whose samples do not shrink are stored"
)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache  # once per process (twice in a race is harmless: the same settings)
def tune_malloc() -> None:
    """Keep the deflaters' state (zlib's ~270 KiB per call, libdeflate's compressor) and the 4 MiB chunks read and written in the heap,
    instead of fresh mmap()s.

    Each call allocates its state and frees it, and each chunk of 64 units is read
    into a new buffer; glibc serves allocations that big with mmap and hands them back with
    munmap, so every unit paid for system calls and freshly zeroed pages (32 us of a 60 us unit
    here, and 0.8 s of system time for the benchmark's VMDK). Fixed thresholds (8 MiB to map,
    32 MiB to trim) keep them in the heap, to be reused; the process is a stage's kernel, gone
    after the stage."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 8 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 32 << 20)
    except (OSError, AttributeError):  # not glibc: only slower
        pass


def _shrinks(unit: memoryview) -> bool:
    half = len(unit) // 2
    sample = bytes(unit[:SAMPLE]) + bytes(unit[half : half + SAMPLE])
    return len(libdeflate.deflate_compress(sample, LEVEL)) < STORE_ABOVE * len(sample)


def zlib_unit(unit: memoryview) -> bytes:
    """A zlib stream (RFC 1950) of ``unit``: deflated by libdeflate, or stored when it would
    not shrink."""
    if _shrinks(unit):
        packed = libdeflate.zlib_compress(unit, LEVEL)
        if len(packed) <= len(unit):  # else the samples misled: stored is shorter
            return bytes(packed)
    return zlib.compress(unit, 0)


def raw_unit(unit: memoryview, wbits: int = -12) -> bytes | None:
    """Raw deflate (RFC 1951, zlib) of ``unit`` with a 2**-wbits window, or None when it does not
    shrink below the unit's size (the caller stores the unit as it is)."""
    if not _shrinks(unit):
        return None
    c = zlib.compressobj(LEVEL, zlib.DEFLATED, wbits)
    packed = c.compress(unit) + c.flush()
    return packed if len(packed) < len(unit) else None
