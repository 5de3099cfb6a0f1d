"""Stage 30-bootable, part 3: what boots the disk under UEFI, as files of its EFI system partition.

Two ways, decided in 20-migrate (guest/firmware.py):

- **Secure Boot**: the guest's own signed chain. Its shim (signed by Microsoft's UEFI CA) goes to
  the removable path ``\\EFI\\BOOT\\BOOTX64.EFI`` and to its distribution's directory, with its
  signed GRUB beside it (shim loads ``grubx64.efi`` from its own directory) and MokManager. A
  signed GRUB is one image with its modules built in; it reads ``grub.cfg`` from the ESP
  directory compiled into it as its prefix (``/EFI/debian``, ``/EFI/redhat``...), which is read
  out of the image itself, and from the directory it was started from. That grub.cfg only finds
  the root filesystem by UUID and reads the same menu as the BIOS GRUB, in /boot/imaging-grub.
  No fallback (``fbx64.efi``) is copied: with empty NVRAM it would only add a reboot.
- **Without Secure Boot**: the conversion host's GRUB for x86_64-efi, built as the BIOS core image
  is (grub-mkimage, the root found by UUID, the modules in /boot/imaging-grub/x86_64-efi).
"""

from __future__ import annotations

import posixpath
import struct
import tempfile
from pathlib import Path

from imaging import tools
from imaging.errors import GuestError

GRUB_EFI = Path("/usr/lib/grub/x86_64-efi")
REMOVABLE = "/EFI/BOOT"
CORE_MODULES = ["part_gpt", "part_msdos", "search_fs_uuid"]
# grub-mkimage's module list in a PE image: a "mods" section that starts with this header.
_MODULE_MAGIC = 0x676D696D  # "mimg"
_OBJ_PREFIX = 3


def _sections(data: bytes) -> dict[bytes, tuple[int, int]]:
    """A PE/COFF image's sections: name -> (file offset, size)."""
    if data[:2] != b"MZ" or len(data) < 0x40:
        raise GuestError("not a PE/COFF (EFI) image")
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if data[pe : pe + 4] != b"PE\0\0":
        raise GuestError("not a PE/COFF (EFI) image")
    count, optional = struct.unpack_from("<H", data, pe + 6)[0], struct.unpack_from("<H", data, pe + 20)[0]
    table = pe + 24 + optional
    found = {}
    for i in range(min(count, 96)):
        name, _, _, size, offset = struct.unpack_from("<8sIIII", data, table + 40 * i)
        found[name.rstrip(b"\0")] = (offset, size)
    return found


def grub_prefix(data: bytes) -> str:
    """The prefix compiled into a GRUB EFI image (``/EFI/debian``): where it reads grub.cfg."""
    offset, size = _sections(data).get(b"mods", (0, 0))
    if not size or offset + 24 > len(data):
        raise GuestError("the GRUB image has no module section (is it GRUB?)")
    magic, _, objects, total = struct.unpack_from("<IIQQ", data, offset)
    if magic != _MODULE_MAGIC or total > size:
        raise GuestError("the GRUB image's module section is not GRUB's")
    at, end = offset + objects, offset + total
    while at + 8 <= end:
        kind, length = struct.unpack_from("<II", data, at)
        if length < 8:
            break
        if kind == _OBJ_PREFIX:
            prefix = data[at + 8 : at + length].split(b"\0", 1)[0].decode("ascii", "replace")
            if not prefix.startswith("/EFI/") or not all(c.isalnum() or c in "/_.-" for c in prefix):
                raise GuestError(f"the signed GRUB's prefix {prefix!r} is not a directory of the ESP")
            return prefix.rstrip("/")
        at += length
    raise GuestError("the signed GRUB has no prefix: it would not know where its grub.cfg is")


def stub_config(uuid: str, grub_dir: str) -> str:
    """The ESP's grub.cfg: the root by UUID, then the menu the BIOS GRUB reads too."""
    return (
        "# Written by imaging (30-bootable): the menu is the one in the root filesystem.\n"
        f"search --no-floppy --fs-uuid --set=root {uuid}\n"
        f"set prefix=($root){grub_dir}\n"
        "configfile $prefix/grub.cfg\n"
    )


def signed_chain_files(
    shim: bytes, grub: bytes, mok: bytes | None, uuid: str, grub_dir: str
) -> dict[str, bytes]:
    """The ESP's files for the guest's signed chain, at the removable path and the prefix's."""
    prefix = grub_prefix(grub)
    cfg = stub_config(uuid, grub_dir).encode()
    files: dict[str, bytes] = {}
    for folder, boot in ((REMOVABLE, "BOOTX64.EFI"), (prefix, "shimx64.efi")):
        files[f"{folder}/{boot}"] = shim
        files[f"{folder}/grubx64.efi"] = grub
        files[f"{folder}/grub.cfg"] = cfg
        if mok:
            files[f"{folder}/mmx64.efi"] = mok
    return files


def host_grub_image(uuid: str, grub_dir: str, fs_module: str) -> bytes:
    """This host's GRUB for x86_64-efi: finds the root by UUID, loads its modules from grub_dir."""
    tools.require_tools("grub-mkimage", reason="build GRUB for UEFI", hint="apt install grub-efi-amd64-bin")
    if not (GRUB_EFI / "kernel.img").exists():
        raise GuestError(
            f"{GRUB_EFI} is missing: UEFI needs this host's GRUB for x86_64-efi (apt install grub-efi-amd64-bin)"
        )
    with tempfile.TemporaryDirectory(prefix="grub-efi-") as tmp:
        early = Path(tmp) / "early.cfg"
        early.write_text(f"search.fs_uuid {uuid} root\nset prefix=($root){grub_dir}\n")
        image = Path(tmp) / "grubx64.efi"
        tools.run(["grub-mkimage", "-O", "x86_64-efi", "-o", image, "-c", early, "-p", grub_dir,
                   *CORE_MODULES, fs_module], timeout=120)  # fmt: skip
        return image.read_bytes()


def host_grub_files(image: bytes, vendor: str) -> dict[str, bytes]:
    """The host GRUB's image at the removable path and at a directory named after the guest."""
    return {f"{REMOVABLE}/BOOTX64.EFI": image, f"/EFI/{vendor}/grubx64.efi": image}


def modules() -> dict[str, bytes]:
    """The host GRUB's x86_64-efi modules, for grub_dir/x86_64-efi."""
    return {p.name: p.read_bytes() for p in sorted(GRUB_EFI.iterdir()) if p.suffix in (".mod", ".lst")}


def vendor_of(path: str) -> str:
    return posixpath.basename(posixpath.dirname(path))
