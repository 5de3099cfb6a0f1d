"""An appliance of a real size: a disk holding more than 8 GiB of data that does not compress
(media, archives, packages) becomes an OVA whose tar members, ustar's 8 GiB - 1 past, readers we
did not write accept: Python's tarfile, GNU tar, and virt-v2v (which reads the OVF as VMware's
tools write it and checks the manifest against the disk as GNU tar extracts it); qemu-img finds
the disk, where GNU tar says it lies, identical to the source.

The costliest test of the suite per byte, kept lean: 8.03 GiB of data (an AES-CTR keystream,
0.15 s per GiB to make; writing it is the cost), one conversion, no boot (the data is not a
bootable system; the small OVAs of test_formats.py boot), everything removed at the end. The
source lies in a tmpfs of its own (8.2 GiB of memory for two minutes; these machines have 24)
so that the test needs 9 GB of disk, for the OVA, rather than 19: a CI machine had 12 free."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

from bench.common import incompressible_disk
from imaging.formats import ova

from .conftest import Cli, last_json

GiB, MiB = 1 << 30, 1 << 20
# Data from 0 to 4 GiB, a 64 MiB hole, data to 8 GiB + 96 MiB, a hole, and the last 1 MiB +
# 1.5 KiB of an unaligned disk (its last grain is partial): 8 GiB + 33 MiB of data in all.
SIZE = 8 * GiB + 160 * MiB + 1536
EXTENTS = [(0, 4 * GiB), (4 * GiB + 64 * MiB, 4 * GiB + 32 * MiB), (8 * GiB + 159 * MiB, MiB + 1536)]
NEEDED = SIZE + GiB  # the OVA (1/128 larger than the data), room
MEMORY = SIZE + 64 * MiB  # the tmpfs holding the source


@contextlib.contextmanager
def tmpfs(where: Path, size: int) -> Iterator[Path]:
    """A private tmpfs of ``size`` bytes at ``where``, unmounted (its memory freed) on leaving."""
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "imaging-test", where], check=True
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", where], check=True)
        where.rmdir()


def memory_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def gnu_tar_listing(path: Path) -> list[tuple[str, int, int]]:
    """(name, size, offset of the data) of each member, as GNU tar reads the headers."""
    out = subprocess.run(
        ["tar", "--numeric-owner", "-tvRf", path], capture_output=True, text=True, check=True
    )
    members = []
    for line in out.stdout.splitlines():
        m = re.match(r"block (\d+): -\S+ \S+ +(\d+) \S+ \S+ (.+)$", line)
        if m:
            members.append((m.group(3), int(m.group(2)), (int(m.group(1)) + 1) * tarfile.BLOCKSIZE))
    return members


def test_an_ova_over_8_gib(tmp_path: Path) -> None:
    for tool, package in (("virt-v2v", "virt-v2v"), ("tar", "tar"), ("qemu-img", "qemu-utils")):
        assert shutil.which(tool), f"{tool} is needed: apt install {package} (make setup)"
    free = shutil.disk_usage(tmp_path).free
    assert free > NEEDED, (
        f"this test needs {NEEDED / 1e9:.0f} GB free in {tmp_path}, there are {free / 1e9:.0f}"
    )
    memory = memory_available()
    assert memory > MEMORY + 2 * GiB, (
        f"this test needs {(MEMORY + 2 * GiB) / 1e9:.0f} GB of memory available, there are {memory / 1e9:.0f}"
    )
    out = tmp_path / "out"
    with tmpfs(tmp_path / "source", MEMORY) as source:
        disk = source / "big.raw"
        try:
            check_big_ova(tmp_path, disk, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(tmp_path / "runs", ignore_errors=True)


def check_big_ova(tmp_path: Path, disk: Path, out: Path) -> None:
    incompressible_disk(disk, SIZE, EXTENTS)
    assert sum(length for _, length in EXTENTS) > 8 * GiB
    cli = Cli(tmp_path / "runs")
    cli.runs.mkdir()
    result = last_json(cli("convert", str(disk), "--format", "ova", "--target", "virtualbox", "--name", "big",
                           "--out", str(out), timeout=1200))  # fmt: skip
    path = Path(result["path"])
    assert path == out / "big.ova" and result["format"] == "ova"

    # Python's tarfile, and the header of the disk: GNU, its size in base-256.
    with tarfile.open(path) as tar:
        found = [(m.name, m.size, m.offset_data) for m in tar.getmembers()]
    names = ["big.ovf", "big-disk1.vmdk", "big.mf"]
    assert [f[0] for f in found] == names
    disk_size, disk_at = found[1][1:]
    assert disk_size > ova.USTAR_MAX_SIZE
    with open(path, "rb") as f:
        header = os.pread(f.fileno(), tarfile.BLOCKSIZE, disk_at - tarfile.BLOCKSIZE)
    assert header[257:265] == b"ustar  \0" and header[124] == 0x80

    # GNU tar: the same members, sizes and places.
    assert gnu_tar_listing(path) == found

    # virt-v2v: parses the OVF, and checks the manifest's SHA1 of each member as
    # `tar xOf` extracts it (GNU tar taking the disk out, whole).
    v2v = subprocess.run(["virt-v2v", "-i", "ova", path, "--print-source"], capture_output=True, text=True,
                         env={**os.environ, "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}, timeout=600)  # fmt: skip
    assert v2v.returncode == 0, v2v.stderr
    assert "source name: big" in v2v.stdout and re.search(r"0 \[sata\]", v2v.stdout), v2v.stdout

    # The disk where GNU tar says it lies (where virt-v2v reads it too) is the source's content.
    inside = {"driver": "vmdk", "file": {"driver": "raw", "offset": disk_at, "size": disk_size,
                                         "file": {"driver": "file", "filename": str(path)}}}  # fmt: skip
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", disk, "json:" + json.dumps(inside)],
                             capture_output=True, text=True)  # fmt: skip
    assert compare.returncode == 0 and "Images are identical" in compare.stdout, (
        compare.stdout + compare.stderr
    )
