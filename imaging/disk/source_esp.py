"""The source disk's EFI system partition (ESP): found, copied whole to ``work/esp.raw``, checked.

A source that boots by UEFI keeps its boot chain (shim, GRUB or systemd-boot, their
configuration, vendor directories) on a FAT partition of the ESP's type (GPT C12A7328-...,
MBR 0xef). 00-acquire copies it as a sparse block copy, for 30-bootable to keep on the new disk;
its files are never extracted here (their names are the guest's), only counted by mtools on
our copy. We do not guess: a disk with two ESPs (which one did the firmware boot?) or an ESP
that is not FAT is refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from imaging import sparse, tools
from imaging.disk import images
from imaging.errors import SourceError

GPT_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
MBR_TYPE = "ef"
BLKID_TYPE = "vfat"  # blkid's TYPE for FAT12/16/32 alike
# mtools refuses a FAT whose geometry it finds odd (one made by a guest's mkfs for a disk, not
# a floppy); we only read through it.
_MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}


@dataclass(frozen=True)
class Esp:
    partition: int
    offset: int  # bytes
    length: int  # bytes: the partition's, copied whole
    uuid: str  # the FAT's volume id as blkid gives it ("ABCD-1234")
    label: str


def is_esp(part: images.Partition, label: str) -> bool:
    """Whether a partition table entry has the ESP's type (``label``: sfdisk's, gpt or dos)."""
    want = GPT_TYPE if label == "gpt" else MBR_TYPE
    return part.type.upper() == want.upper()


def find_esp(path: Path, table: images.PartitionTable | None) -> Esp | None:
    """The disk's ESP, None when it has none; refused when there are two, or it is not FAT."""
    found = [p for p in table.partitions if is_esp(p, table.label)] if table else []
    if table is None or not found:
        return None
    if len(found) > 1:
        numbers = ", ".join(str(p.number) for p in found[:-1]) + f" and {found[-1].number}"
        raise SourceError(
            f"{path}: partitions {numbers} are {'both' if len(found) == 2 else 'all'} EFI system partitions: "
            "cannot tell which one the firmware boots from"
        )
    (part,) = found
    ss = table.sector_size
    where = f"{path}: the EFI system partition (partition {part.number})"
    probe = images.probe(path, part.start * ss, part.size * ss)
    if probe.type != BLKID_TYPE:
        raise SourceError(f"{where} holds {probe.type or 'no filesystem blkid knows'}, not FAT")
    # Found, it will be copied and checked: the tools for that are needed before any copy starts.
    tools.require_tools(
        "fsck.vfat", "mdir", reason="check the EFI system partition", hint="apt install dosfstools mtools"
    )
    return Esp(part.number, part.start * ss, part.size * ss, probe.uuid or "", probe.label or "")


def copy_esp(disk: Path, esp: Esp, dest: Path) -> tuple[int, list[str]]:
    """Copy the ESP to ``dest`` (new, sparse) and check it there, read-only (``fsck.vfat -n``);
    returns how many files it holds and what the record should warn of."""
    warnings = []
    sparse.create_sparse(dest, esp.length)
    sparse.copy_range(disk, dest, src_offset=esp.offset, length=esp.length, desc="copy ESP")
    if _clear_dirty_bit(dest):
        warnings.append(
            f"the EFI system partition (partition {esp.partition}) was not cleanly unmounted "
            "(copied from a running instance?): its dirty bit is cleared on our copy before the check"
        )
    result = tools.run(["fsck.vfat", "-n", dest], ok_codes=(0, 1), timeout=600)
    if result.exit_code != 0:
        raise SourceError(
            f"the EFI system partition (partition {esp.partition}) fails its check: fsck.vfat -n: "
            f"{_complaint(result.stdout + result.stderr)}"
        )
    return count_files(dest), warnings


def count_files(image: Path) -> int:
    """Files (not directories) in the FAT ``image``, read by mtools."""
    # -/ -b: every path, directories ending in "/". Exit 1 and no output: an empty filesystem.
    result = tools.run(
        ["mdir", "-i", image, "-/", "-b", "::"], ok_codes=(0, 1), env=_MTOOLS_ENV, timeout=600
    )
    if result.exit_code != 0 and result.stdout.strip():
        raise SourceError(f"mdir cannot list the FAT in {image}: {_complaint(result.stderr)}")
    return sum(1 for line in result.stdout.splitlines() if line.startswith("::/") and not line.endswith("/"))


def _clear_dirty_bit(image: Path) -> bool:
    """Clear the FAT's "not cleanly unmounted" bit on our copy; whether it was set. Linux sets it
    while the filesystem is mounted read-write, so a copy of a running instance's ESP has it;
    fsck.vfat -n would fail on that alone."""
    with open(image, "r+b") as f:
        boot = f.read(512)
        if len(boot) < 512:
            return False
        # FAT32 has no 16-bit FAT size (0); its state byte follows a longer BPB.
        at = 0x41 if struct.unpack_from("<H", boot, 22)[0] == 0 else 0x25
        if not boot[at] & 1:
            return False
        f.seek(at)
        f.write(bytes([boot[at] & 0xFE]))
    return True


def _complaint(output: str) -> str:
    """fsck.vfat's first complaint on one line (it names the guest's paths: shown, never run)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("fsck.fat ", "Leaving filesystem unchanged"))]
    text = " ".join(lines[:2]) or "no reason given"
    return "".join(c if c.isprintable() else "?" for c in text)[:300]
