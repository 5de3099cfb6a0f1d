"""Stage 40-export: the bootable disk becomes the artifact a user asked for, as (sha256, path).

The artifact is written under a hidden ``.part`` name inside ``--out`` and renamed when complete,
with ``<file>.sha256`` beside it (``sha256sum -c`` reads it).
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from . import sparse, tools
from .config import ImageFormat, check_format, check_name
from .errors import ParameterError
from .progress import percent_bar
from .records import Record
from .workspace import Workspace

_PERCENT = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


def qemu_convert(src: Path, src_format: str, dst: Path, dst_format: str, *, options: list[str] | None = None,
                 desc: str = "convert") -> float:  # fmt: skip
    """``qemu-img convert`` with its progress shown as a bar; returns the seconds it took."""
    t0 = time.monotonic()
    with percent_bar(desc) as bar:
        seen = [0.0]

        def progress(chunk: str) -> None:
            for m in _PERCENT.finditer(chunk):
                value = float(m.group(1))
                bar.update(max(0.0, value - seen[0]))
                seen[0] = max(seen[0], value)

        tools.run(
            ["qemu-img", "convert", "-p", "-f", src_format, "-O", dst_format, *(options or []),
             os.fspath(src.resolve()), os.fspath(dst.resolve())],
            on_output=progress,
            timeout=24 * 3600,
        )  # fmt: skip
        bar.update(100 - seen[0])
    return time.monotonic() - t0


def artifact_path(out: Path, name: str, fmt: ImageFormat) -> Path:
    """``out/<name>.<ext>``, refusing any name that would land elsewhere."""
    check_name(name)
    out = out.resolve()
    path = (out / f"{name}.{fmt.extension}").resolve()
    if path.parent != out:
        raise ParameterError(f"artifact {path} would not be inside {out}")
    return path


@dataclass(frozen=True)
class Artifact(Record):
    sha256: str
    path: str
    format: str
    size_bytes: int
    virtual_size: int
    seconds: float
    check: str

    @property
    def pair(self) -> tuple[str, str]:
        """(sha256, path): what the original design handed back."""
        return self.sha256, self.path


def _link_or_copy(src: Path, dst: Path) -> None:
    """A raw artifact is the disk itself: a hard link when out/ shares the filesystem, else a
    sparse copy. Nothing writes to work/disk.raw after stage 30, so sharing the inode is safe."""
    try:
        os.link(src, dst)
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
    sparse.create_sparse(dst, src.stat().st_size)
    sparse.copy_range(src, dst, desc="copy raw")


def export(ws: Workspace, name: str, fmt: str, out: str | Path) -> Artifact:
    """Write the bootable disk as ``out/<name>.<format>``; return its sha256 and path."""
    tools.require_tools("qemu-img", reason="convert the disk", hint="apt install qemu-utils")
    image_format = check_format(fmt)
    out_dir = Path(out) if out else ws.root / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = artifact_path(out_dir, name, image_format)
    if not ws.disk.exists():
        raise ParameterError(f"{ws.disk} does not exist: stage 30-bootable has not completed")
    from .acquire import check_space

    check_space(out_dir, sparse.data_bytes(ws.disk) + (64 << 20), f"write {path.name}")
    t0 = time.monotonic()
    with sparse.atomic_path(path) as part:
        if image_format is ImageFormat.raw:
            _link_or_copy(ws.disk, part)
        else:
            qemu_convert(ws.disk, "raw", part, image_format.value, desc=f"convert to {image_format.value}")
        check = _check(part, image_format)
        digest = sparse.sha256(part, desc=f"sha256 {path.name}")
    seconds = time.monotonic() - t0
    sparse.write_sha256_file(path, digest)
    info = json.loads(
        tools.check_output(["qemu-img", "info", "--output=json", "-f", image_format.value, path])
    )
    return Artifact(
        sha256=digest,
        path=str(path),
        format=image_format.value,
        size_bytes=path.stat().st_size,
        virtual_size=int(info["virtual-size"]),
        seconds=round(seconds, 3),
        check=check,
    )


def _check(path: Path, fmt: ImageFormat) -> str:
    if fmt is ImageFormat.raw:
        return "raw (nothing to check)"
    result = tools.run(["qemu-img", "check", "-f", fmt.value, path], ok_codes=(0,), timeout=3600)
    lines = [x for x in result.stdout.splitlines() if x.strip()]
    return lines[0] if lines else "ok"
