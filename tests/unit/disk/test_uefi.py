"""What boots a disk under UEFI: the ESP made in user space (FAT, mtools), the signed GRUB's
prefix read out of the image, the host's GRUB for x86_64-efi."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from imaging.disk import esp, uefi
from imaging.errors import GuestError

UUID = "0b6b0a36-4a4c-4b0c-8a5a-2f1e0c7e6d5a"
SIGNED_GRUB = Path("/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed")


def test_the_prefix_compiled_into_a_grub_image_is_read_out_of_it(tmp_path: Path) -> None:
    image = tmp_path / "grubx64.efi"
    subprocess.run(["grub-mkimage", "-O", "x86_64-efi", "-o", image, "-p", "/EFI/rocky", "part_gpt", "fat"],
                   check=True)  # fmt: skip
    assert uefi.grub_prefix(image.read_bytes()) == "/EFI/rocky"
    if SIGNED_GRUB.is_file():  # Debian's signed GRUB (shim-signed pulls it in on the host)
        assert uefi.grub_prefix(SIGNED_GRUB.read_bytes()) == "/EFI/debian"
    # The host's own image: its prefix is in the root filesystem, not an ESP directory.
    with pytest.raises(GuestError, match="is not a directory of the ESP"):
        uefi.grub_prefix(uefi.host_grub_image(UUID, "/boot/imaging-grub", "ext2"))
    with pytest.raises(GuestError, match="not a PE/COFF"):
        uefi.grub_prefix(b"\x7fELF" + bytes(100))


def test_the_signed_chain_goes_to_the_removable_path_and_the_distributions(tmp_path: Path) -> None:
    image = tmp_path / "grubx64.efi"
    subprocess.run(["grub-mkimage", "-O", "x86_64-efi", "-o", image, "-p", "/EFI/debian", "fat"], check=True)
    files = uefi.signed_chain_files(b"shim", image.read_bytes(), b"mok", UUID, "/boot/imaging-grub")
    assert files["/EFI/BOOT/BOOTX64.EFI"] == files["/EFI/debian/shimx64.efi"] == b"shim"
    assert files["/EFI/BOOT/grubx64.efi"] == image.read_bytes() and files["/EFI/debian/mmx64.efi"] == b"mok"
    cfg = files["/EFI/debian/grub.cfg"].decode()
    assert f"--fs-uuid --set=root {UUID}" in cfg and "configfile $prefix/grub.cfg" in cfg
    assert "/EFI/BOOT/fbx64.efi" not in files  # no fallback: with empty NVRAM it only adds a reboot


def _disk(tmp_path: Path, size: int) -> Path:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(size)
    return disk


def test_the_esp_is_fat_with_the_files_and_the_sources_kept(tmp_path: Path) -> None:
    source = tmp_path / "source-esp.raw"
    with open(source, "wb") as f:
        f.truncate(40 << 20)
    subprocess.run(["mkfs.vfat", "-F", "32", "-i", "1A2B3C4D", source], check=True, capture_output=True)
    subprocess.run(["mmd", "-i", source, "::/EFI", "::/EFI/rocky"], check=True)
    (tmp_path / "vendor").write_bytes(b"the source's own shim")
    subprocess.run(["mcopy", "-i", source, tmp_path / "vendor", "::/EFI/rocky/shimx64.efi"], check=True)
    disk = _disk(tmp_path, 200 << 20)
    made = esp.build(disk, 1 << 20, 128 << 20, "1A2B-3C4D", {"/EFI/BOOT/BOOTX64.EFI": b"grub"}, source)
    assert made.kept_from_source == 1 and made.files == ["/EFI/BOOT/BOOTX64.EFI"]
    assert esp.read_file(disk, "/EFI/rocky/shimx64.efi", 1 << 20) == b"the source's own shim"
    assert esp.read_file(disk, "/EFI/BOOT/BOOTX64.EFI", 1 << 20) == b"grub"
    assert esp.read_file(disk, "/EFI/BOOT/none.efi", 1 << 20) is None
    probe = subprocess.run(
        ["blkid", "-p", "-O", str(1 << 20), "-o", "export", disk], capture_output=True, text=True
    )
    assert "UUID=1A2B-3C4D" in probe.stdout and "TYPE=vfat" in probe.stdout
    # The same files give the same ESP, byte for byte, a FAT time unit (2 s) later.
    time.sleep(2.1)
    (tmp_path / "again").mkdir()
    again = _disk(tmp_path / "again", 200 << 20)
    esp.build(again, 1 << 20, 128 << 20, "1A2B-3C4D", {"/EFI/BOOT/BOOTX64.EFI": b"grub"}, source)
    assert again.read_bytes() == disk.read_bytes()


@pytest.mark.parametrize("path", ["/EFI/../x", "/EFI/BOOT/a b", "EFI/BOOT/x", "/EFI/BOOT/$(x)"])
def test_esp_paths_are_plain(tmp_path: Path, path: str) -> None:
    with pytest.raises(GuestError, match="is not a path imaging writes on the ESP"):
        esp.build(_disk(tmp_path, 64 << 20), 0, 40 << 20, "1A2B-3C4D", {path: b""})
