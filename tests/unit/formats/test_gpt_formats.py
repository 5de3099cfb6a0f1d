"""A GPT disk (protective MBR; root 1, BIOS boot 14, ESP 15) through every format and back: the
same bytes over its whole size, its backup GPT header still in its last sector. A writer that
dropped, padded or moved the disk's end would leave a GPT whose backup header is lost or not at
the end (firmware and the kernel then warn, or refuse the disk); the fixed VHD and GCE's
disk.raw pad, so their disks are planned to :func:`limits.size_multiple`."""

from __future__ import annotations

import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from imaging.config import ImageFormat
from imaging.formats import export, gce, limits, ova
from imaging.workspace import Workspace

MiB, GiB, SECTOR = 1 << 20, 1 << 30, 512
SMALL = 8 * MiB
BIOS_BOOT, ESP, LINUX = (
    "21686148-6449-6E6F-744E-656564454649",
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
)


def gpt_disk(path: Path, size: int) -> Path:
    """A sparse GPT disk of ``size`` bytes laid out as 30-bootable's hybrid one (partition 14 the
    BIOS boot partition, 15 the ESP, 1 the root to the end), with data in each partition and in
    the root's last sectors, right before the backup partition entries."""
    with open(path, "wb") as f:
        f.truncate(size)
    script = (f"label: gpt\n{path.name}14 : start=2048, size=2048, type={BIOS_BOOT}\n"
              f"{path.name}15 : start=4096, size=4096, type={ESP}\n{path.name}1 : start=8192, type={LINUX}\n")  # fmt: skip
    subprocess.run(["sfdisk", "--quiet", path], input=script, text=True, check=True)
    last_usable = size // SECTOR - 34  # 33 sectors of backup entries and header after it
    with open(path, "r+b") as f:
        for offset, length in ((2048 * SECTOR, 64 << 10), (4096 * SECTOR, MiB), (8192 * SECTOR, MiB),
                               ((last_usable + 1) * SECTOR - (32 << 10), 32 << 10)):  # fmt: skip
            f.seek(offset)
            f.write(os.urandom(length))
    return path


def gpt_problems(path: Path) -> list[str]:
    """What is wrong with the disk's GPT, by sfdisk and by reading both headers: the backup one
    must be in the last sector, point back at the primary, and hold the primary's entries, each
    header and its entries with a good CRC32."""
    proc = subprocess.run(["sfdisk", "--verify", path], capture_output=True, text=True)
    problems = [] if "No errors detected." in proc.stdout else [f"sfdisk: {proc.stderr.strip()}"]
    last = path.stat().st_size // SECTOR - 1
    entries = {}
    with open(path, "rb") as f:
        for where, lba in (("primary", 1), ("backup", last)):
            f.seek(lba * SECTOR)
            raw = f.read(SECTOR)
            (signature, _, size, crc, _, mine, other, _, _, _, at, count, entry_size,
             entries_crc) = struct.unpack_from("<8sIIII4Q16sQIII", raw)  # fmt: skip
            if signature != b"EFI PART":
                problems.append(f"{where} header: no GPT signature at LBA {lba}")
                continue
            if zlib.crc32(raw[:16] + bytes(4) + raw[20:size]) != crc:
                problems.append(f"{where} header: bad CRC32")
            if (mine, other) != (lba, last if where == "primary" else 1):
                problems.append(f"{where} header: at LBA {mine}, other header at {other}")
            f.seek(at * SECTOR)
            entries[where] = f.read(count * entry_size)
            if zlib.crc32(entries[where]) != entries_crc:
                problems.append(f"{where} entries: bad CRC32")
    if len(entries) == 2 and entries["primary"] != entries["backup"]:
        problems.append("the backup entries differ from the primary ones")
    return problems


def back_to_raw(artifact: Path, fmt: ImageFormat, work: Path) -> Path:
    """The disk inside an artifact, raw: an OVA's and a GCE image's taken out by the code's own
    helpers (as the boot check does), every other format by qemu-img."""
    work.mkdir()
    if fmt is ImageFormat.raw:
        return artifact
    if fmt is ImageFormat.gce:
        return gce.extract(artifact, work)
    source, qemu_format = (ova.extract_disk(artifact, work), "vmdk") if fmt is ImageFormat.ova else (artifact, fmt.qemu_format)  # fmt: skip
    raw = work / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", qemu_format, "-O", "raw", source, raw], check=True)
    return raw


def same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            block = fa.read(4 * MiB)
            if block != fb.read(4 * MiB):
                return False
            if not block:
                return True


def convert(
    tmp_path: Path, disk: Path, fmt: str, target: str, firmware: str, variant: str = ""
) -> export.Artifact:
    """40-export's writer for ``fmt`` on ``disk``, as 30-bootable's record would have it boot."""
    ws = Workspace.open(tmp_path / "run")
    found = export.InputDisk(str(disk), "raw", disk.stat().st_size, 0, "convert", firmware)
    subformat = variant if fmt == "vmdk" and variant else "streamOptimized"
    return export.export(ws, "gpt", fmt, tmp_path / "out", disk=found, target=target,
                         compress=variant == "compressed", vmdk_subformat=subformat)  # fmt: skip


# Every writer: (format, target, variant); the fixed VHD is azure-gen2's, the dynamic one kvm's.
CASES = [
    ("raw", "kvm", ""), ("qcow2", "kvm", ""), ("qcow2", "kvm", "compressed"), ("vmdk", "kvm", ""),
    ("vmdk", "kvm", "monolithicSparse"), ("vdi", "kvm", ""), ("vhd", "kvm", ""), ("vhd", "azure-gen2", ""),
    ("vhdx", "kvm", ""), ("ova", "virtualbox", ""), ("gce", "gce", ""),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "target", "variant"), CASES, ids=["-".join(filter(None, c)) for c in CASES])
@pytest.mark.parametrize("firmware", ["hybrid", "uefi"])
def test_every_format_keeps_the_gpt_disk_to_its_last_sector(tmp_path: Path, fmt: str, target: str, variant: str,
                                                           firmware: str) -> None:  # fmt: skip
    multiple = limits.size_multiple(fmt, target)
    disk = gpt_disk(tmp_path / "disk.raw", -(-SMALL // multiple) * multiple)
    assert gpt_problems(disk) == []
    artifact = convert(tmp_path, disk, fmt, target, firmware, variant)
    assert (artifact.virtual_size, artifact.firmware) == (disk.stat().st_size, firmware)
    back = back_to_raw(Path(artifact.path), ImageFormat(fmt), tmp_path / "back")
    assert back.stat().st_size == disk.stat().st_size and same_bytes(disk, back)
    assert gpt_problems(back) == []
    if fmt == "ova":
        ova.check_ova(Path(artifact.path), "gpt")
        assert artifact.details["ovf_firmware"] == ("efi" if firmware == "uefi" else "bios")
    if fmt == "gce":
        assert artifact.details["guest_os_features"] == ["UEFI_COMPATIBLE"]
        assert artifact.details["import"].endswith(" --guest-os-features=UEFI_COMPATIBLE")
    if target == "azure-gen2":
        assert artifact.details["hyper_v_generation"] == {"uefi": "V2", "hybrid": "V1 or V2"}[firmware]


@pytest.mark.parametrize(
    ("fmt", "target", "size"), [("gce", "gce", SMALL), ("vhd", "azure-gen2", SMALL + 4096)]
)
def test_a_disk_off_the_formats_multiple_is_padded_past_its_backup_header(tmp_path: Path, fmt: str, target: str,
                                                                         size: int) -> None:  # fmt: skip
    # Why size_multiple: GCE's disk.raw is whole GiB, Azure's fixed VHD whole MiB; a GPT disk
    # of another size comes back longer, its backup header no longer in the last sector.
    disk = gpt_disk(tmp_path / "disk.raw", size)
    artifact = convert(tmp_path, disk, fmt, target, "uefi")
    multiple = limits.size_multiple(fmt, target)
    assert artifact.virtual_size == -(-size // multiple) * multiple > size
    back = back_to_raw(Path(artifact.path), ImageFormat(fmt), tmp_path / "back")
    with open(back, "rb") as f, open(disk, "rb") as source:
        assert f.read(size) == source.read() and not f.read().strip(b"\0")
    problems = gpt_problems(back)
    assert "backup header: no GPT signature" in problems[-1] and "not on the end" in problems[0]


def test_the_check_sees_a_backup_header_lost_or_moved(tmp_path: Path) -> None:
    disk = gpt_disk(tmp_path / "disk.raw", SMALL)
    lost, short = tmp_path / "lost.raw", tmp_path / "short.raw"
    subprocess.run(["cp", "--sparse=always", disk, lost], check=True)
    with open(lost, "r+b") as f:  # the last sector dropped (a writer that wrote one sector less)
        f.seek(SMALL - SECTOR)
        f.write(bytes(SECTOR))
    subprocess.run(["cp", "--sparse=always", disk, short], check=True)
    os.truncate(short, SMALL - SECTOR)
    assert "backup header: no GPT signature at LBA 16383" in gpt_problems(lost)
    assert "backup header: no GPT signature at LBA 16382" in gpt_problems(short)


def test_size_multiples() -> None:
    assert limits.size_multiple("gce") == GiB and limits.size_multiple("vhd", "azure") == MiB
    assert limits.size_multiple("vhd", "azure-gen2") == MiB and limits.size_multiple("vhd", "kvm") == SECTOR
    assert {limits.size_multiple(f) for f in ("raw", "qcow2", "vmdk", "vdi", "vhd", "vhdx", "ova")} == {
        SECTOR
    }
