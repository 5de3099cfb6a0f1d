"""The image Google Compute Engine imports: ``disk.raw`` in a gzip-compressed GNU tar.

GCE's image import reads one file, ``disk.raw``, from a ``.tar.gz`` written the way its guide
writes it (``tar --format=oldgnu -Sczf``): GNU tar's old format, the disk as a sparse member, so
its holes cost nothing in the archive. We run the same GNU tar, with its owner, mode and time
fixed, and compress its stream with pigz on every core (gzip's default level, as the guide's
``tar -z``; pigz gives the same bytes whatever the number of threads). The same disk therefore
always gives the same archive.

GCE's disks come in whole GiB: ``disk.raw`` is the disk padded with a hole up to the next GiB
(the partition table keeps its size; the guest's growpart or a resize uses the rest).

The tar stream passes through this process on its way to pigz: that is where the progress bar
counts bytes and where the first header is checked (``disk.raw``, GNU, sparse).
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import os
import shutil
import stat
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from imaging import sparse, tools
from imaging.errors import ImagingError
from imaging.formats import identity
from imaging.progress import bytes_bar
from imaging.records import Record

MEMBER = "disk.raw"
GIB = 1 << 30
LEVEL = 6  # gzip's default, what GCE's guide gets from tar -z
_CHUNK = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_GNU_MAGIC = b"ustar  \0"  # GNU tar's old format (ustar has "ustar\x0000")
_SPARSE = b"S"  # old GNU sparse member


class GceError(ImagingError):
    """An archive that is not what GCE's import reads."""


@dataclass(frozen=True)
class Packed(Record):
    capacity: int  # the size of disk.raw in the archive (the disk rounded up to a whole GiB)
    padded_bytes: int
    tar_bytes: int  # the tar stream before compression
    seconds: float


def gce_size(virtual_size: int) -> int:
    return -(-virtual_size // GIB) * GIB


def tar_argv(directory: Path) -> list[str]:
    """GNU tar writing ``directory/disk.raw`` to stdout: old GNU format, sparse, and nothing
    from this machine (owner, group, mode, time) in the header."""
    return ["tar", "--create", "--file=-", "--format=oldgnu", "--sparse", "--numeric-owner", "--owner=0",
            "--group=0", "--mode=0644", f"--mtime=@{identity.FIXED_TIME}", "--directory", str(directory),
            "--", MEMBER]  # fmt: skip


def pigz_argv() -> list[str]:
    return ["pigz", "--no-name", "-p", str(os.cpu_count() or 1), f"-{LEVEL}"]


def write(raw: Path, virtual_size: int, part: Path, work: Path, desc: str) -> Packed:
    """``raw`` (a raw disk) as GCE's ``.tar.gz`` at ``part``. ``work``: where disk.raw is staged
    (a hard link when the disk is already a whole number of GiB, else a sparse copy)."""
    tools.require_tools("tar", "pigz", reason="write a GCE image", hint="apt install tar pigz")
    t0 = time.monotonic()
    size = gce_size(virtual_size)
    stage = Path(tempfile.mkdtemp(prefix=".gce-", dir=work))
    try:
        disk = stage / MEMBER
        _stage(raw, disk, size)
        total = sparse.data_bytes(disk)
        streamed = _tar_gz(stage, part, total, desc)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return Packed(size, size - virtual_size, streamed, round(time.monotonic() - t0, 3))


def _stage(raw: Path, disk: Path, size: int) -> None:
    if raw.stat().st_size == size:
        with contextlib.suppress(OSError):
            os.link(raw, disk)
            return
    sparse.check_space(disk.parent, sparse.data_bytes(raw) + (64 << 20), f"stage {MEMBER}")
    sparse.create_sparse(disk, size)
    sparse.copy_range(raw, disk, desc=f"stage {MEMBER}")


def _pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # bigger pipes, fewer switches; the default works too
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, _CHUNK)
    return read_end, write_end


def _tar_gz(directory: Path, part: Path, total: int, desc: str) -> int:
    """tar | (this process: progress, header check) | pigz > part; the tar stream's length."""
    tar_out, from_tar = _pipe()
    pigz_in, to_pigz = _pipe()
    out = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    streamed, head = 0, b""
    with ThreadPoolExecutor(2, thread_name_prefix="gce") as pool:
        # Each tool in its own thread, with this stage's command log (a copied context).
        packing = pool.submit(contextvars.copy_context().run, tools.run, pigz_argv(), stdin_fd=pigz_in,
                              stdout_fd=out, timeout=24 * 3600)  # fmt: skip
        taring = pool.submit(contextvars.copy_context().run, tools.run, tar_argv(directory),
                             stdout_fd=from_tar, timeout=24 * 3600)  # fmt: skip
        # Closing our ends on any exit (an error, Ctrl-C) ends both tools: tar's writes fail,
        # pigz reads the end of its input.
        with (
            open(tar_out, "rb", buffering=0) as source,
            open(to_pigz, "wb") as sink,
            bytes_bar(total, desc) as bar,
        ):
            try:
                while chunk := source.read(_CHUNK):
                    if len(head) < tarfile.BLOCKSIZE:
                        head += chunk[: tarfile.BLOCKSIZE - len(head)]
                    sink.write(chunk)
                    streamed += len(chunk)
                    bar.update(len(chunk))
            except BrokenPipeError:  # pigz is gone: its own error says why
                pass
        taring.result()
        packing.result()
    check_header(head)
    return streamed


def check_header(head: bytes) -> None:
    """The tar's first header must be GCE's: ``disk.raw``, GNU's old format, a sparse member."""
    if len(head) < tarfile.BLOCKSIZE:
        raise GceError("the tar stream is shorter than one header")
    name = head[:100].split(b"\0", 1)[0]
    problems = []
    if name != MEMBER.encode():
        problems.append(f"first member is {name!r}, not {MEMBER}")
    if head[257:265] != _GNU_MAGIC:
        problems.append("not GNU tar format")
    if head[156:157] != _SPARSE:
        problems.append(f"{MEMBER} is not a sparse member (type {head[156:157]!r})")
    if problems:
        raise GceError("; ".join(problems))


def check(path: Path, capacity: int) -> str:
    """Read the archive back as GCE does, with another reader than the one that wrote it
    (Python's tarfile, streaming): gzip's CRC and length, one member ``disk.raw`` of the disk's
    size, nothing else."""
    members = []
    try:
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                members.append((member.name, member.size, member.isreg(), member.issparse()))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise GceError(f"{path.name} is not a readable tar.gz: {e}") from None
    if [m[0] for m in members] != [MEMBER]:
        raise GceError(f"{path.name}: members {[m[0] for m in members]}, expected [{MEMBER!r}]")
    name, size, regular, is_sparse = members[0]
    if not regular or size != capacity:
        raise GceError(f"{path.name}: {name} is {'a file' if regular else 'not a file'} of {size} bytes, expected {capacity}")  # fmt: skip
    return f"gzip and tar read back: one member {name}, {size} bytes{', sparse' if is_sparse else ''}"


def extract(path: Path, directory: Path) -> Path:
    """``disk.raw`` out of a GCE archive into ``directory``, by GNU tar (holes restored), as a
    user would check it; refused unless it comes out as a plain file."""
    tools.require_tools(
        "tar", "pigz", reason="take disk.raw out of a GCE image", hint="apt install tar pigz"
    )
    disk = directory / MEMBER
    disk.unlink(missing_ok=True)
    try:
        tools.run(["tar", "--extract", "--file", path.resolve(), "--use-compress-program=pigz", "--no-same-owner",
                   "--no-same-permissions", "--directory", directory, "--", MEMBER], timeout=24 * 3600)  # fmt: skip
    except tools.CommandError as e:
        disk.unlink(missing_ok=True)
        raise GceError(f"{path.name}: GNU tar could not extract {MEMBER}: {e}") from None
    st = disk.lstat()
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(disk, ignore_errors=True)
        else:
            disk.unlink(missing_ok=True)
        raise GceError(f"{path.name}: {MEMBER} is not a plain file")
    return disk


def is_gce(path: Path) -> bool:
    """A gzip stream (no disk format starts like one): taken for a GCE image."""
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False
