"""The physical limits behind the conversion numbers, measured on this machine in this run: what
one core deflates and hashes per second, what the disk writes, and what a source's identity
costs as a plain sha256 (its virtual size) against our content digest (its data).

Deflate rates are over a sample of the real-files disk's 64 KiB grains (every 8th non-zero one),
one core, CPU time; the writers spread grains over every core, so a conversion's floor is about
data / (rate x cores).
"""

from __future__ import annotations

import os
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deflate as libdeflate  # noqa: E402

from bench.common import WORK, load, real_disk, run  # noqa: E402
from imaging import sparse  # noqa: E402
from imaging.formats import vmdk  # noqa: E402

GRAIN = 1 << 16


def _grains(disk: Path, every: int = 8) -> list[bytes]:
    fd = os.open(disk, os.O_RDONLY)
    found, n = [], 0
    try:
        for first, count in vmdk.grain_runs(fd, os.fstat(fd).st_size):
            data = os.pread(fd, count * GRAIN, first * GRAIN)
            for i in range(0, len(data), GRAIN):
                grain = data[i : i + GRAIN]
                if grain != bytes(GRAIN) and n % every == 0:
                    found.append(grain)
                n += 1
    finally:
        os.close(fd)
    return found


def _rate(grains: list[bytes], fn: object) -> tuple[float, int]:
    t0 = time.process_time()
    out = sum(len(fn(g)) for g in grains)  # type: ignore[operator]
    return sum(map(len, grains)) / (time.process_time() - t0), out


def main() -> list[tuple[str, str, str]]:
    WORK.mkdir(parents=True, exist_ok=True)
    disk = real_disk(WORK / "real-5g.img")
    grains = _grains(disk)
    size = sum(map(len, grains))
    rows = []
    level6, out6 = _rate(grains, lambda g: zlib.compress(g, 6))
    for name, fn in (
        ("libdeflate level 1 (our VMDK grains)", lambda g: libdeflate.zlib_compress(g, 1)),
        ("zlib level 1 (our qcow2 clusters)", lambda g: zlib.compress(g, 1)),
        ("zlib level 6 (qemu-img's VMDK and qcow2 -c)", None),
    ):
        rate, out = (level6, out6) if fn is None else _rate(grains, fn)
        rows.append((f"limit: deflate, {name}", f"{rate / 1e6:.0f} MB/s per core",
                     f"{size / 1e6:.0f} MB of the real-files disk's grains -> {out / size:.3f} of their size "
                     f"({out / out6:.3f}x zlib level 6's); load {load():.1f}"))  # fmt: skip
    buf = bytes(64 << 20)
    t0 = time.process_time()
    for _ in range(16):
        __import__("hashlib").sha256(buf).digest()
    sha = (16 * len(buf)) / (time.process_time() - t0)
    rows.append(("limit: sha256", f"{sha / 1e9:.2f} GB/s per core", "one stream cannot use a second core"))
    # Disk bandwidth: 1 GiB written and flushed, the way an artifact reaches the disk.
    path = WORK / "bandwidth.tmp"
    block = os.urandom(16 << 20)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(64):
            os.write(fd, block)
        os.fdatasync(fd)
    finally:
        os.close(fd)
        path.unlink()
    write = (64 << 24) / (time.perf_counter() - t0)
    rows.append(("limit: disk write + flush", f"{write / 1e6:.0f} MB/s", f"1 GiB; load {load():.1f}"))
    # A source's identity: what a plain sha256 costs (virtual size) against the content digest.
    data = sparse.data_bytes(disk)
    t0 = time.perf_counter()
    run("sha256sum", disk)
    t_tool = time.perf_counter() - t0
    t0 = time.perf_counter()
    sparse.sha256(disk, desc=None)
    t_sha = time.perf_counter() - t0
    t0 = time.perf_counter()
    sparse.content_digest(disk)
    t_list = time.perf_counter() - t0
    rows.append(("source identity of the real-files disk", f"{t_list:.2f} s",
                 f"content digest (sha256 list over 1 MiB blocks, {data / 1e9:.2f} GB of data read, two threads); "
                 f"a plain sha256 of its {disk.stat().st_size / (1 << 30):.0f} GiB: ours {t_sha:.2f} s, "
                 f"sha256sum {t_tool:.2f} s; load {load():.1f}"))  # fmt: skip
    return rows


if __name__ == "__main__":
    for row in main():
        print(" | ".join(row), flush=True)
