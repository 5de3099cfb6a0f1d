"""imaging.formats.deflate: what is deflated, what is stored, and that both read back."""

from __future__ import annotations

import random
import zlib

from imaging.formats import deflate

UNIT = 1 << 16


def _text(n: int) -> bytes:
    words = [b"kernel", b"module", b"initrd", b"grub", b"/usr/lib", b"0x1f", b"\n"]
    rng = random.Random(1)
    return b" ".join(rng.choice(words) for _ in range(n))[:n]


def test_compressible_units_are_deflated_and_read_back() -> None:
    unit = memoryview(_text(UNIT))
    packed = deflate.zlib_unit(unit)
    assert len(packed) < UNIT // 3 and zlib.decompress(packed) == unit
    raw = deflate.raw_unit(unit, -12)
    assert raw is not None and len(raw) < UNIT // 3
    assert zlib.decompressobj(-12).decompress(raw) == unit  # what qemu's qcow2 reader does


def test_units_that_do_not_shrink_are_stored() -> None:
    unit = memoryview(random.Random(2).randbytes(UNIT))
    packed = deflate.zlib_unit(unit)
    # Stored blocks: the data itself plus headers and the checksum, and it reads back.
    assert UNIT < len(packed) <= UNIT + 32 and zlib.decompress(packed) == unit
    assert packed.find(unit[:1000].tobytes()) > 0  # the bytes as they are
    assert deflate.raw_unit(unit, -12) is None  # qcow2 stores the cluster as it is


def test_a_unit_half_compressible_is_deflated() -> None:
    # The probe samples the start and the middle: text in either half is worth deflating.
    unit = memoryview(random.Random(3).randbytes(UNIT // 2) + _text(UNIT // 2))
    packed = deflate.zlib_unit(unit)
    assert len(packed) < 0.8 * UNIT and zlib.decompress(packed) == unit


def test_the_same_unit_gives_the_same_bytes() -> None:
    unit = memoryview(_text(UNIT))
    assert deflate.zlib_unit(unit) == deflate.zlib_unit(memoryview(bytearray(unit)))
    deflate.tune_malloc()
    deflate.tune_malloc()  # once is enough; again is harmless
    assert deflate.zlib_unit(unit) == deflate.zlib_unit(unit)
