"""Which firmware the new disk boots under, decided from the target, the request and the guest.

The target says what its machines boot (``firmware`` in parameters/targets), the request what it
asks (``--firmware``, ``auto`` by default: hybrid where the target boots both). The guest decides
the rest, from its own files:

- its kernel must have an EFI entry point (a PE/COFF stub or the EFI handover protocol in its
  bzImage header) for GRUB's x86_64-efi ``linux`` command, and its profile must not say its
  distribution cannot boot UEFI (CentOS 5);
- Secure Boot needs the guest's own signed chain, checked against Microsoft's keys and the key
  shim carries before any boot (signatures.py): shim (signed by Microsoft's UEFI CA, which
  firmware enrols by default), the distribution's GRUB signed by the key shim carries, and a
  kernel signed by it. The guest's package manager keeps them current, which a copy of the
  conversion host's binaries would never be; where the profile names the packages and they are
  missing, 20-migrate installs them in the sandbox, as ``--install`` does. A kernel without a
  signature still boots under UEFI, without Secure Boot, and the record says so.

``auto`` never fails for the guest's sake: what the guest cannot do is dropped, with the reason
recorded. A firmware asked for explicitly that the guest cannot boot is a one-line error.
"""

from __future__ import annotations

import fnmatch
import re
import struct
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

from imaging import config
from imaging.config import FIRMWARE_PLATFORMS, Firmware
from imaging.disk import esp
from imaging.disk.files import Guest
from imaging.errors import GuestError
from imaging.guest import signatures
from imaging.guest.profiles import Profile
from imaging.records import Record

# What of a kernel image is read to find its entry points and signature: the headers only.
_HEADER_BYTES = 4096
_XLF_EFI_HANDOVER_64 = 1 << 3
_KERNEL_LIMIT = 256 << 20


def _pe_header(data: bytes) -> int | None:
    """Offset of the PE signature of a PE/COFF image (an EFI-stub kernel, shim, GRUB), else None."""
    if data[:2] != b"MZ" or len(data) < 0x40:
        return None
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    return pe if pe + 24 <= len(data) and data[pe : pe + 4] == b"PE\0\0" else None


def kernel_efi_entry(data: bytes) -> str:
    """How GRUB can start this bzImage under UEFI ("EFI stub", "EFI handover"), or "" if it cannot."""
    if _pe_header(data) is not None:
        return "EFI stub"
    if len(data) >= 0x238 and data[0x202:0x206] == b"HdrS":
        version = struct.unpack_from("<H", data, 0x206)[0]
        if version >= 0x20C and struct.unpack_from("<H", data, 0x236)[0] & _XLF_EFI_HANDOVER_64:
            return "EFI handover"
    return ""


def authenticode_signed(data: bytes) -> bool:
    """Whether a PE/COFF image carries a signature (its certificate table is not empty). Whether
    the signature verifies is the firmware's and shim's to say: the boot check proves it."""
    pe = _pe_header(data)
    if pe is None:
        return False
    optional = pe + 24
    magic = struct.unpack_from("<H", data, optional)[0]
    directories = optional + (112 if magic == 0x20B else 96)  # PE32+ or PE32
    security = directories + 4 * 8  # data directory 4: the certificate table
    if security + 8 > len(data):
        return False
    _, size = struct.unpack_from("<II", data, security)
    return size > 0


@dataclass(frozen=True)
class Chain:
    """The guest's signed boot chain for Secure Boot, as paths in the guest."""

    shim: str
    grub: str
    mok: str = ""  # MokManager, which shim starts when asked to enrol a key


ESP_MOUNT = "/boot/efi"


def find_chain(g: Guest, profile: Profile, source_esp: Path | None = None) -> Chain | None:
    """The first shim and signed GRUB the profile names that the guest has: in its root, or, for
    paths under /boot/efi (where the RHEL family's packages put them), on the source's ESP that
    00-acquire copied (``source_esp``)."""
    efi = profile.efi
    on_esp = (
        [f"{ESP_MOUNT}{p}" for p in esp.files(source_esp)] if source_esp and source_esp.is_file() else []
    )

    def first(paths: list[str]) -> str:
        for pattern in paths:
            found = [p for p in sorted(g.glob(pattern)) if g.is_file(p)]
            if pattern.startswith(f"{ESP_MOUNT}/"):  # FAT: names match whatever their case
                found += [p for p in on_esp if fnmatch.fnmatch(p.lower(), pattern.lower())]
            if found:
                return found[0]
        return ""

    shim, grub = first(efi.shim), first(efi.grub)
    return Chain(shim, grub, first(efi.mok)) if shim and grub else None


@dataclass(frozen=True)
class FirmwarePlan(Record):
    """What 30-bootable builds and 50-verify boots (read from 20-migrate's record)."""

    asked: str
    firmware: str  # bios, uefi or hybrid
    platforms: list[str]  # the firmware the disk boots under: bios, uefi
    secure_boot: bool
    kernel_efi: str  # how the chosen kernel starts under UEFI ("" when it cannot)
    kernel_signed: bool
    shim: str = ""  # the guest's signed chain, when Secure Boot is on
    grub: str = ""
    mok: str = ""
    packages: list[str] = field(default_factory=list)  # installed for the chain (apply's result)
    why: list[str] = field(default_factory=list)  # what was dropped or refused, and why


def read_chain_file(g: Guest, path: str, source_esp: Path | None = None) -> bytes | None:
    """A file of the chain: from the guest's root, else (under /boot/efi) from the source's ESP."""
    if (
        g.is_file(path)
        or not path.startswith(f"{ESP_MOUNT}/")
        or source_esp is None
        or not source_esp.is_file()
    ):
        return g.read_bytes(path, limit=_KERNEL_LIMIT)
    return esp.read_file(source_esp, path.removeprefix(ESP_MOUNT))


def _read_kernel(g: Guest, vmlinuz: str) -> bytes:
    data = g.read_bytes(vmlinuz, limit=_KERNEL_LIMIT)
    if data is None:
        raise GuestError(f"the kernel {vmlinuz} cannot be read")
    return data


def plan(g: Guest, profile: Profile, vmlinuz: str, target: config.Target, asked: str, layout: str = "aligned",
         *, chain_packages: bool = True, source_esp: Path | None = None) -> FirmwarePlan:  # fmt: skip
    """Decide the firmware for this guest and kernel (see the module's docstring).
    ``chain_packages``: whether missing chain packages would be installed (the plan before
    migration says so; after, what was installed is what the guest has)."""
    chosen = config.choose_firmware(asked, target, layout)
    data = _read_kernel(g, vmlinuz)
    entry, signed = kernel_efi_entry(data[:_HEADER_BYTES]), authenticode_signed(data)
    why: list[str] = []
    cannot = ""
    if not profile.efi.boots:
        cannot = f"profile {profile.name}: {profile.efi.why or 'its kernels do not boot under UEFI'}"
    elif not entry:
        cannot = f"the kernel {vmlinuz} has no EFI entry point (no PE stub, no EFI handover in its header)"
    if cannot and "uefi" in FIRMWARE_PLATFORMS[chosen]:
        if asked not in ("", "auto"):
            raise GuestError(
                f"firmware {chosen.value} cannot boot this guest: {cannot}; use --firmware bios"
            )
        if "bios" not in target.firmware:
            raise GuestError(f"target {target.name} boots UEFI only, and {cannot}")
        why.append(f"UEFI dropped: {cannot}")
        chosen = Firmware.bios
    platforms = list(FIRMWARE_PLATFORMS[chosen])
    chain = find_chain(g, profile, source_esp) if "uefi" in platforms else None
    packages: list[str] = []
    if "uefi" in platforms and not signed:
        why.append(f"no Secure Boot: the kernel {vmlinuz} is not signed")
    elif "uefi" in platforms and chain is None:
        if chain_packages and profile.efi.packages:
            packages = list(profile.efi.packages)
        else:
            why.append(
                "no Secure Boot: the guest has no signed shim and GRUB"
                + ("" if profile.efi.packages else f" (profile {profile.name} names no packages for them)")
            )
    if "uefi" in platforms and chain is not None and signed:
        # Before any boot: would Microsoft's keys start this shim, and its key this GRUB and kernel?
        shim, grub = read_chain_file(g, chain.shim, source_esp), read_chain_file(g, chain.grub, source_esp)
        problems = signatures.chain_problems(shim or b"", grub or b"", data)
        if problems:
            why += [f"no Secure Boot: {line}" for line in problems]
            chain = None
    secure = "uefi" in platforms and bool(chain or packages) and signed
    return FirmwarePlan(
        asked=asked or "auto",
        firmware=chosen.value,
        platforms=platforms,
        secure_boot=secure,
        kernel_efi=entry,
        kernel_signed=signed,
        shim=chain.shim if chain and secure else "",
        grub=chain.grub if chain and secure else "",
        mok=chain.mok if chain and secure else "",
        packages=packages,
        why=why,
    )


def esp_volume_id(fs_uuid: str, source_esp: dict[str, object] | None = None) -> str:
    """The new ESP's FAT volume id (what fstab's UUID= names): the source ESP's, whose files it
    keeps, else one derived from the root filesystem's UUID (the same instance, the same disk)."""
    kept = str((source_esp or {}).get("uuid") or "")
    if re.fullmatch(r"[0-9A-F]{4}-[0-9A-F]{4}", kept):
        return kept
    digest = uuidlib.uuid5(uuidlib.UUID(fs_uuid), "imaging esp").hex[:8].upper()
    return f"{digest[:4]}-{digest[4:]}"
