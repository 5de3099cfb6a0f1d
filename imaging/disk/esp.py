"""The EFI system partition: a FAT32 filesystem made and filled in user space, then placed.

mkfs.vfat makes it in a scratch file and mtools copies files in (no mount, no loop device); the
source's own ESP, where 00-acquire kept one (``work/esp.raw``), is copied in first, file by file
between the two images, so what the guest had there (its distribution's shim and GRUB, a
vendor's tools) stays, under the same volume id that the guest's fstab names. Then the boot
files go in, the removable path (``\\EFI\\BOOT\\BOOTX64.EFI``, what firmware with empty NVRAM
boots) among them, and ``fsck.vfat`` checks the result before it is copied into the partition.

Timestamps come from ``SOURCE_DATE_EPOCH`` (fixed otherwise): the same instance gives the same
ESP, byte for byte.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imaging import sparse, tools
from imaging.errors import GuestError
from imaging.records import Record

# 2010-01-01: any fixed time will do; FAT cannot store one before 1980.
_EPOCH = "1262304000"
_FAT_PATH = re.compile(r"(/(?!\.\.?(?:/|$))[A-Za-z0-9._-]{1,64}){1,8}")


@dataclass(frozen=True)
class Esp(Record):
    volume_id: str
    bytes: int
    kept_from_source: int  # files copied from the source's ESP
    files: list[str]  # what imaging wrote, as paths on the ESP
    fsck: str


def _env(rc: Path | None = None) -> dict[str, str]:
    env = {"SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", _EPOCH), "MTOOLS_SKIP_CHECK": "1"}
    return {**env, "MTOOLSRC": str(rc)} if rc else env


def _count_files(image: Path) -> int:
    listing = tools.run(
        ["mdir", "-/", "-b", "-i", image, "::/"], ok_codes=range(256), timeout=120, env=_env()
    )
    return sum(1 for line in listing.stdout.splitlines() if line and not line.endswith("/"))


def build(
    disk: Path, offset: int, size: int, volume_id: str, files: dict[str, bytes], source: Path | None = None
) -> Esp:
    """Make the ESP of ``size`` bytes at ``offset`` in ``disk``: the source ESP's files, then
    ``files`` (ESP path -> content) over them."""
    tools.require_tools("mkfs.vfat", "mcopy", "fsck.vfat", reason="make the EFI system partition",
                        hint="apt install dosfstools mtools")  # fmt: skip
    if not re.fullmatch(r"[0-9A-F]{4}-[0-9A-F]{4}", volume_id):
        raise GuestError(f"ESP volume id {volume_id!r} is not like ABCD-1234")
    for path in files:
        if not _FAT_PATH.fullmatch(path):
            raise GuestError(f"{path!r} is not a path imaging writes on the ESP")
    with tempfile.TemporaryDirectory(prefix="esp-", dir=disk.parent) as tmp:
        image = Path(tmp) / "esp.raw"
        sparse.create_sparse(image, size)
        # No label: mkfs.vfat writes its directory entry with the time of day (SOURCE_DATE_EPOCH
        # or not), and the ESP would differ from one run to the next.
        tools.run(["mkfs.vfat", "-F", "32", "-i", volume_id.replace("-", ""), image],
                  timeout=120, env=_env())  # fmt: skip
        kept = 0
        if source is not None and source.is_file():
            # Between the two images, through mtools' drive letters: no file of the source
            # passes through the host's filesystem.
            rc = Path(tmp) / "mtoolsrc"
            rc.write_text(f'drive s: file="{source.resolve()}"\ndrive d: file="{image}"\n')
            tools.run(["mcopy", "-s", "-m", "-n", "-Q", "s:/*", "d:/"], timeout=600, env=_env(rc))
            kept = _count_files(image)
        made: set[str] = set()
        for path, data in sorted(files.items()):
            parts = path.strip("/").split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                folder = "/" + "/".join(parts[:depth])
                if folder in made:
                    continue
                exists = tools.run(["mdir", "-b", "-i", image, f"::{folder}"], ok_codes=range(256), timeout=60,
                                   env=_env()).exit_code == 0  # fmt: skip
                if not exists:
                    tools.run(["mmd", "-i", image, f"::{folder}"], timeout=60, env=_env())
                made.add(folder)
            local = Path(tmp) / "file"
            local.write_bytes(data)
            os.utime(local, (int(_env()["SOURCE_DATE_EPOCH"]),) * 2)
            tools.run(["mcopy", "-o", "-m", "-i", image, local, f"::{path}"], timeout=120, env=_env())
        checked = tools.run(["fsck.vfat", "-n", image], ok_codes=range(256), timeout=300)
        if checked.exit_code != 0:
            raise GuestError(
                f"the new ESP does not pass fsck.vfat: {checked.stdout.strip().splitlines()[-1:]}"
            )
        sparse.copy_range(image, disk, dst_offset=offset, desc="ESP")
    return Esp(volume_id=volume_id, bytes=size, kept_from_source=kept, files=sorted(files),
               fsck="clean (fsck.vfat -n)")  # fmt: skip


def files(image: Path) -> list[str]:
    """Every file of the FAT in ``image``, as ESP paths (``/EFI/rocky/shimx64.efi``)."""
    listing = tools.run(
        ["mdir", "-/", "-b", "-i", image, "::/"], ok_codes=range(256), timeout=120, env=_env()
    )
    found = [line.removeprefix("::") for line in listing.stdout.splitlines() if line.startswith("::/")]
    return [path for path in found if not path.endswith("/") and _FAT_PATH.fullmatch(path)]


def read_file(image: Path, path: str, offset: int = 0, limit: int = 64 << 20) -> bytes | None:
    """A file of the FAT at ``offset`` in ``image``, as mtools reads it (None if it is not there)."""
    if not _FAT_PATH.fullmatch(path):
        raise GuestError(f"{path!r} is not a path imaging reads on an ESP")
    with tempfile.TemporaryDirectory(prefix="esp-read-") as tmp:
        out = Path(tmp) / "file"
        result = tools.run(["mcopy", "-n", "-i", f"{image}@@{offset}", f"::{path}", out], ok_codes=range(256),
                           timeout=60, env=_env())  # fmt: skip
        if result.exit_code != 0 or not out.is_file():
            return None
        if out.stat().st_size > limit:
            raise GuestError(
                f"{path} on the ESP is {out.stat().st_size:,} bytes: more than a boot file can be"
            )
        return out.read_bytes()
