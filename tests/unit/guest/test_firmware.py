"""The firmware a disk gets: the target's, the request's and the guest's say, read from the
guest's own kernel and signed chain."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from imaging import config
from imaging.disk.files import Guest
from imaging.errors import GuestError, ParameterError
from imaging.guest import firmware
from imaging.guest.profiles import load_profile

SIGNED_KERNEL = sorted(Path.home().glob(".cache/imaging/kernels/*/boot/vmlinuz-*"))


def bzimage(version: int, xloadflags: int = 0) -> bytes:
    """A bzImage's setup header, as an old (2.6.18: protocol 2.05) or newer kernel has it."""
    data = bytearray(0x1000)
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, version)
    struct.pack_into("<H", data, 0x236, xloadflags)
    return bytes(data)


def pe(signed: bool) -> bytes:
    """A PE32+ image: MZ, the PE header, a certificate table when signed."""
    data = bytearray(0x400)
    data[:2] = b"MZ"
    struct.pack_into("<I", data, 0x3C, 0x80)
    data[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<H", data, 0x80 + 24, 0x20B)
    if signed:
        struct.pack_into("<II", data, 0x80 + 24 + 112 + 32, 0x300, 0x100)
    return bytes(data)


def test_how_grub_can_start_a_kernel_under_uefi() -> None:
    assert firmware.kernel_efi_entry(pe(False)) == "EFI stub"
    assert firmware.kernel_efi_entry(bzimage(0x20C, 1 << 3)) == "EFI handover"
    assert firmware.kernel_efi_entry(bzimage(0x20C)) == ""
    assert firmware.kernel_efi_entry(bzimage(0x205)) == ""  # CentOS 5's 2.6.18
    assert firmware.authenticode_signed(pe(True)) and not firmware.authenticode_signed(pe(False))


@pytest.mark.skipif(not SIGNED_KERNEL, reason="no Debian kernel in the cache (make test fetches one)")
def test_debians_kernel_is_an_efi_stub_and_signed() -> None:
    data = SIGNED_KERNEL[0].read_bytes()
    assert firmware.kernel_efi_entry(data[:4096]) == "EFI stub" and firmware.authenticode_signed(data)


def guest(root: Path, kernel: bytes, chain: bool) -> Path:
    (root / "boot").mkdir(parents=True)
    (root / "boot/vmlinuz-6.1.0-9-amd64").write_bytes(kernel)
    if chain:
        for path in ("usr/lib/shim/shimx64.efi.signed", "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(pe(True))
    return root


def plan(
    root: Path, profile: str, target: str = "kvm", asked: str = "auto", **kw: object
) -> firmware.FirmwarePlan:
    with Guest(root) as g:
        return firmware.plan(g, load_profile(profile), "/boot/vmlinuz-6.1.0-9-amd64", config.load_target(target),
                             asked, **kw)  # type: ignore[arg-type]  # fmt: skip


HOST_CHAIN = (
    Path("/usr/lib/shim/shimx64.efi.signed"),
    Path("/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"),
)


@pytest.mark.skipif(
    not SIGNED_KERNEL or not all(p.is_file() for p in HOST_CHAIN), reason="needs make setup's chain"
)
def test_a_guest_with_its_signed_chain_boots_hybrid_with_secure_boot(tmp_path: Path) -> None:
    root = guest(tmp_path, SIGNED_KERNEL[0].read_bytes(), chain=True)
    for path in HOST_CHAIN:  # Debian's real shim and GRUB, in the guest's places
        (root / str(path).lstrip("/")).write_bytes(path.read_bytes())
    found = plan(root, "debian")
    assert (found.firmware, found.platforms, found.secure_boot) == ("hybrid", ["bios", "uefi"], True)
    assert found.shim == "/usr/lib/shim/shimx64.efi.signed" and not found.packages and not found.why


def test_a_chain_microsofts_keys_would_refuse_is_no_secure_boot(tmp_path: Path) -> None:
    # Signed-looking, but by nobody the firmware trusts: checked before any boot, said in the record.
    found = plan(guest(tmp_path, pe(True), chain=True), "debian")
    assert found.platforms == ["bios", "uefi"] and not found.secure_boot and not found.shim
    assert found.why and all(line.startswith("no Secure Boot: ") for line in found.why)


def test_a_missing_chain_is_installed_by_the_guests_packages(tmp_path: Path) -> None:
    found = plan(guest(tmp_path, pe(True), chain=False), "debian")
    assert found.packages == ["shim-signed", "grub-efi-amd64-signed"] and found.secure_boot
    # After migration the guest has what it has: no chain, no Secure Boot, and the record says why.
    after = plan(tmp_path, "debian", chain_packages=False)
    assert after.platforms == ["bios", "uefi"] and not after.secure_boot
    assert after.why == ["no Secure Boot: the guest has no signed shim and GRUB"]


def test_an_unsigned_kernel_boots_uefi_without_secure_boot(tmp_path: Path) -> None:
    found = plan(guest(tmp_path, pe(False), chain=True), "debian", asked="uefi")
    assert (found.firmware, found.secure_boot, found.packages) == ("uefi", False, [])
    assert "not signed" in found.why[0]


def test_centos5_boots_bios_and_says_why_when_uefi_is_asked(tmp_path: Path) -> None:
    root = guest(tmp_path, pe(True), chain=False)
    found = plan(root, "centos5")
    assert found.platforms == ["bios"] and "do not boot under UEFI" in found.why[0]
    with pytest.raises(GuestError) as e:
        plan(root, "centos5", asked="uefi")
    assert str(e.value) == ("firmware uefi cannot boot this guest: profile centos5: CentOS 5's kernels (2.6.18) "
                            "do not boot under UEFI; use --firmware bios")  # fmt: skip


def test_a_kernel_without_an_efi_entry_point_is_bios_only(tmp_path: Path) -> None:
    root = guest(tmp_path, bzimage(0x20A), chain=False)
    assert plan(root, "rhel6").platforms == ["bios"]
    with pytest.raises(GuestError, match="has no EFI entry point"):
        plan(root, "rhel6", asked="hybrid")
    with pytest.raises(GuestError, match="target azure-gen2 boots UEFI only"):
        plan(root, "rhel6", target="azure-gen2")


def test_the_target_and_layout_decide_first() -> None:
    azure, kvm = config.load_target("azure"), config.load_target("kvm")
    assert config.choose_firmware("auto", azure) is config.Firmware.bios
    assert config.choose_firmware("auto", kvm, "legacy") is config.Firmware.bios
    with pytest.raises(ParameterError, match="target azure does not boot UEFI"):
        config.choose_firmware("hybrid", azure)
    with pytest.raises(ParameterError, match="layout legacy is the original MBR layout"):
        config.choose_firmware("uefi", kvm, "legacy")


def test_the_esp_keeps_the_sources_volume_id_or_gets_one_of_its_own() -> None:
    uuid = "0b6b0a36-4a4c-4b0c-8a5a-2f1e0c7e6d5a"
    assert firmware.esp_volume_id(uuid, {"uuid": "1A2B-3C4D"}) == "1A2B-3C4D"
    own = firmware.esp_volume_id(uuid)
    assert own == firmware.esp_volume_id(uuid, {"uuid": "not; a volume id"}) and len(own) == 9


@pytest.mark.skipif(
    not SIGNED_KERNEL or not all(p.is_file() for p in HOST_CHAIN), reason="needs make setup's chain"
)
def test_the_rhel_familys_chain_is_found_on_the_sources_esp(tmp_path: Path) -> None:
    # shim-x64 and grub2-efi-x64 install into /boot/efi/EFI/<vendor>/: on the ESP 00-acquire
    # copied aside, not in the root filesystem. (Debian's signed binaries stand in for Rocky's.)
    import subprocess

    root = guest(tmp_path / "root", SIGNED_KERNEL[0].read_bytes(), chain=False)
    source = tmp_path / "esp.raw"
    with open(source, "wb") as f:
        f.truncate(40 << 20)
    subprocess.run(["mkfs.vfat", "-F", "32", source], check=True, capture_output=True)
    subprocess.run(["mmd", "-i", source, "::/EFI", "::/EFI/rocky"], check=True)
    for path, name in zip(HOST_CHAIN, ("SHIMX64.EFI", "grubx64.efi"), strict=True):
        subprocess.run(["mcopy", "-i", source, path, f"::/EFI/rocky/{name}"], check=True)
    found = plan(root, "rhel", source_esp=source)
    assert found.secure_boot and not found.packages and not found.why
    assert (found.shim, found.grub) == ("/boot/efi/EFI/rocky/SHIMX64.EFI", "/boot/efi/EFI/rocky/grubx64.efi")
    with Guest(root) as g:
        assert firmware.read_chain_file(g, found.grub, source) == HOST_CHAIN[1].read_bytes()
    # Without the ESP the chain is not there, and dnf would be asked for it.
    assert plan(root, "rhel").packages == ["shim-x64", "grub2-efi-x64"]
