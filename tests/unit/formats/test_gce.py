"""The image GCE imports: disk.raw in a gzipped GNU tar, sparse, the same bytes for the same disk."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from imaging.formats import gce

SIZE = (5 << 20) + 4096  # not a whole number of GiB


def _disk(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(os.urandom(1 << 20))
        f.seek(SIZE - 4096)
        f.write(b"end of the disk".ljust(4096, b"."))
    return path


def test_disk_raw_in_a_gnu_sparse_tar_gz_that_gnu_tar_extracts(tmp_path: Path) -> None:
    raw = _disk(tmp_path / "work.raw")
    out = tmp_path / "a.tar.gz"
    packed = gce.write(raw, SIZE, out, tmp_path, desc="gce")
    assert packed.capacity == 1 << 30 and packed.padded_bytes == (1 << 30) - SIZE
    assert packed.tar_bytes < 2 << 20 and out.stat().st_size < 2 << 20  # the holes cost nothing
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".gce-")] == []  # staging removed
    assert gce.check(out, packed.capacity).startswith(
        "gzip and tar read back: one member disk.raw, 1073741824"
    )
    listing = subprocess.run(["tar", "-tvzf", out], capture_output=True, text=True, check=True).stdout
    assert listing.split()[:3] == ["-rw-r--r--", "0/0", str(1 << 30)] and listing.split()[-1] == "disk.raw"
    with open(out, "rb") as f:  # gzip, then GNU tar's old format, then an old GNU sparse member
        head = io.BytesIO(subprocess.run(["pigz", "-dc"], stdin=f, capture_output=True).stdout[:512])
    gce.check_header(head.read())
    (tmp_path / "x").mkdir()
    disk = gce.extract(out, tmp_path / "x")
    assert disk.stat().st_size == 1 << 30 and disk.stat().st_blocks * 512 < 4 << 20
    with open(disk, "rb") as a, open(raw, "rb") as b:
        assert a.read(SIZE) == b.read() and a.read(1 << 20) == bytes(1 << 20)
    # The same disk, the same bytes (the source's own time and owner never reach the archive).
    os.utime(raw, (1, 1))
    again = tmp_path / "b.tar.gz"
    gce.write(raw, SIZE, again, tmp_path, desc=None)
    assert out.read_bytes() == again.read_bytes()


def _tar_gz(path: Path, members: list[tarfile.TarInfo], fmt: int = tarfile.GNU_FORMAT) -> Path:
    with tarfile.open(path, "w:gz", format=fmt) as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(bytes(m.size)) if m.isreg() else None)
    return path


def test_archives_gce_would_not_take_are_refused(tmp_path: Path) -> None:
    two = _tar_gz(tmp_path / "two.tar.gz", [tarfile.TarInfo("disk.raw"), tarfile.TarInfo("extra")])
    with pytest.raises(gce.GceError, match=r"members \['disk.raw', 'extra'\], expected \['disk.raw'\]"):
        gce.check(two, 0)
    small = tarfile.TarInfo("disk.raw")
    small.size = 512
    with pytest.raises(gce.GceError, match=r"disk.raw is a file of 512 bytes, expected 1073741824"):
        gce.check(_tar_gz(tmp_path / "small.tar.gz", [small]), 1 << 30)
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b" + bytes(100))
    with pytest.raises(gce.GceError, match="is not a readable tar.gz"):
        gce.check(tmp_path / "junk.tar.gz", 0)
    header = bytearray(small.tobuf(tarfile.USTAR_FORMAT))
    with pytest.raises(gce.GceError, match=r"not GNU tar format; disk.raw is not a sparse member"):
        gce.check_header(bytes(header))


def test_a_disk_raw_that_is_a_link_is_not_extracted(tmp_path: Path) -> None:
    """A hostile archive given to the boot check: disk.raw as a link to a host file."""
    link = tarfile.TarInfo("disk.raw")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    archive = _tar_gz(tmp_path / "evil.tar.gz", [link])
    (tmp_path / "x").mkdir()
    with pytest.raises(gce.GceError, match="disk.raw is not a plain file"):
        gce.extract(archive, tmp_path / "x")
    assert list((tmp_path / "x").iterdir()) == []
    with pytest.raises(gce.GceError, match="GNU tar could not extract disk.raw"):
        gce.extract(_tar_gz(tmp_path / "none.tar.gz", [tarfile.TarInfo("other")]), tmp_path / "x")
    assert gce.is_gce(archive) and not gce.is_gce(tmp_path / "none")
