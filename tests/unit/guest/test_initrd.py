from __future__ import annotations

import bz2
import gzip
import lzma
import subprocess
from pathlib import Path

import pytest

from imaging.config import load_target
from imaging.disk.debugfs import safe_name
from imaging.disk.files import Guest
from imaging.errors import GuestError
from imaging.guest import initrd
from imaging.guest.profiles import load_profile


def test_list_initrd_reads_newc_cpio(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "lib" / "modules" / "6.1" / "kernel").mkdir(parents=True)
    (root / "lib" / "modules" / "6.1" / "kernel" / "virtio_blk.ko").write_bytes(b"x" * 1001)
    (root / "init").write_text("#!/bin/sh\n")
    names = "\n".join(str(p.relative_to(root)) for p in sorted(root.rglob("*"))) + "\n"
    archive = tmp_path / "a.cpio"
    subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", f"--file={archive}"], input=names, text=True, cwd=root,
                   check=True)  # fmt: skip
    listed = initrd.list_initrd(gzip.compress(archive.read_bytes()))
    assert "init" in listed and "lib/modules/6.1/kernel/virtio_blk.ko" in listed
    assert initrd.initrd_modules(listed) == ["virtio_blk"]
    assert initrd.list_initrd(b"not an initrd") == []


def _kvm_guest(tmp_path: Path, builtin: str = "") -> Path:
    root = tmp_path / "guest"
    mods = root / "lib" / "modules" / "6.1"
    (mods / "kernel").mkdir(parents=True)
    (mods / "kernel" / "virtio_blk.ko").write_bytes(b"x")
    (mods / "modules.dep").write_text("kernel/virtio_blk.ko:\n")
    (mods / "modules.builtin").write_text(builtin)
    (root / "boot").mkdir()
    (root / "boot" / "vmlinuz-6.1").write_bytes(b"k")
    names = (
        "lib\nlib/modules\nlib/modules/6.1\nlib/modules/6.1/kernel\nlib/modules/6.1/kernel/virtio_blk.ko\n"
    )
    archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=names.encode(), cwd=root,
                             capture_output=True, check=True).stdout  # fmt: skip
    (root / "boot" / "initrd.img-6.1").write_bytes(gzip.compress(archive))
    return root


def test_kept_initrd_needs_only_a_storage_driver(tmp_path: Path) -> None:
    generic = load_profile("generic")
    with Guest(_kvm_guest(tmp_path)) as g:
        kernel = initrd.choose_kernel(g)
        # virtio_balloon is neither in the kernel nor needed to reach the disk: no reason to stop.
        kept = initrd.rebuild(g, generic, kernel, load_target("kvm"))
        assert (kept.rebuilt, kept.image, kept.modules) == (False, "/boot/initrd.img-6.1", "virtio_blk")
        with pytest.raises(GuestError, match=r"initrd /boot/initrd.img-6.1 holds none of ata_piix, ahci"):
            initrd.rebuild(g, generic, kernel, load_target("virtualbox"))


def test_kept_initrd_may_rely_on_a_built_in_driver(tmp_path: Path) -> None:
    with Guest(_kvm_guest(tmp_path, builtin="kernel/drivers/ata/ahci.ko\n")) as g:
        kept = initrd.rebuild(g, load_profile("generic"), initrd.choose_kernel(g), load_target("virtualbox"))
        assert not kept.rebuilt


def test_no_initrd_is_fine_when_the_disk_driver_is_built_in(tmp_path: Path) -> None:
    root = _kvm_guest(tmp_path, builtin="kernel/drivers/block/virtio_blk.ko\n")
    (root / "boot" / "initrd.img-6.1").unlink()
    generic = load_profile("generic")
    with Guest(root) as g:
        kernel = initrd.choose_kernel(g)
        kept = initrd.rebuild(g, generic, kernel, load_target("kvm"))
        assert (kept.image, kept.rebuilt) == ("", False) and "built into the kernel" in kept.tool
        with pytest.raises(GuestError, match=r"kernel 6.1 has no initrd nor any of ata_piix, ahci built in"):
            initrd.rebuild(g, generic, kernel, load_target("virtualbox"))


def _cpio(root: Path, names: list[str]) -> bytes:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"x" * 100)
    listing = "\n".join(names) + "\n"
    return subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=listing.encode(), cwd=root,
                          capture_output=True, check=True).stdout  # fmt: skip


def test_debian_style_initrds_are_listed(tmp_path: Path) -> None:
    import zstandard

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    early = _cpio(tmp_path / "a", ["kernel/x86/microcode/GenuineIntel.bin"])
    main = _cpio(
        tmp_path / "b",
        ["usr/lib/modules/6.1/kernel/drivers/ata/ahci.ko", "usr/lib/modules/6.1/kernel/e1000.ko.xz"],
    )
    # An uncompressed early archive padded to a block, then the zstd one, as update-initramfs writes.
    data = early + bytes(-len(early) % 512) + zstandard.ZstdCompressor().compress(main)
    names = initrd.list_initrd(data)
    assert names[0] == "kernel/x86/microcode/GenuineIntel.bin"
    assert initrd.initrd_modules(names) == ["ahci", "e1000"]
    for compress in (lzma.compress, bz2.compress):
        assert initrd.initrd_modules(initrd.list_initrd(compress(main))) == ["ahci", "e1000"]


def test_a_decompression_bomb_is_refused(tmp_path: Path) -> None:
    # A valid header announcing a 4 GiB file of zeros: a few MB compressed.
    header = b"070701" + b"0" * 48 + b"%08X" % 0xFFFFFFFF + b"0" * 32 + b"%08X" % 2 + b"00000000" + b"x\0"
    bomb = gzip.compress(header + bytes(64 << 20), compresslevel=1)
    with pytest.raises(GuestError, match="decompresses to more than"):
        initrd.list_initrd(bomb, cap=16 << 20)


def test_a_kernel_file_name_with_a_newline_is_not_a_kernel(tmp_path: Path) -> None:
    # "vmlinuz-6.1\n" would reach grub.cfg as two lines.
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / "vmlinuz-6.1\n").write_bytes(b"k")
    (tmp_path / "boot" / "vmlinuz-6.2").write_bytes(b"k")
    with Guest(tmp_path) as g:
        assert [k.version for k in initrd.kernels(g)] == ["6.2"]
    assert not safe_name("vmlinuz-6.1\n") and safe_name("vmlinuz-6.1")


def _nitro_guest(tmp_path: Path, *, ena: bool, ena_in_initrd: bool) -> Path:
    """A kernel with nvme built in (as Debian's are) and ena as a module, or without ena at all."""
    root = tmp_path / "nitro"
    mods = root / "lib" / "modules" / "6.1"
    (mods / "kernel").mkdir(parents=True)
    (mods / "modules.builtin").write_text(
        "kernel/drivers/nvme/host/nvme-core.ko\nkernel/drivers/nvme/host/nvme.ko\n"
    )
    (mods / "modules.dep").write_text("kernel/drivers/net/ethernet/amazon/ena/ena.ko.xz:\n" if ena else "")
    (root / "boot").mkdir()
    (root / "boot" / "vmlinuz-6.1").write_bytes(b"k")
    names = "lib\nlib/modules\nlib/modules/6.1\n" + (
        "lib/modules/6.1/kernel/ena.ko.xz\n" if ena_in_initrd else ""
    )
    (mods / "kernel" / "ena.ko.xz").write_bytes(b"x")
    archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=names.encode(), cwd=root,
                             capture_output=True, check=True).stdout  # fmt: skip
    (root / "boot" / "initrd.img-6.1").write_bytes(gzip.compress(archive))
    return root


def test_a_clouds_drivers_must_be_in_the_initrd_or_built_in(tmp_path: Path) -> None:
    aws, generic = load_target("aws"), load_profile("generic")
    with Guest(_nitro_guest(tmp_path / "a", ena=True, ena_in_initrd=True)) as g:
        kept = initrd.rebuild(g, generic, initrd.choose_kernel(g), aws)
        assert kept.drivers == {"nvme": "built into the kernel", "ena": "initrd"}
    with Guest(_nitro_guest(tmp_path / "b", ena=True, ena_in_initrd=False)) as g:
        with pytest.raises(GuestError) as e:
            initrd.rebuild(g, generic, initrd.choose_kernel(g), aws)
        assert str(e.value) == (
            "the initrd /boot/initrd.img-6.1 does not carry ena, which target aws needs in it (nvme disk, ena NIC); "
            "the kernel 6.1 has it only as a module on the root filesystem"
        )
    # A kernel without the driver at all: the one line that names the package which has it.
    with Guest(_nitro_guest(tmp_path / "c", ena=False, ena_in_initrd=False)) as g:
        with pytest.raises(GuestError, match=r"^kernel 6.1 in the guest has no module ena, which target aws needs "
                           r"\(nvme disk, ena NIC\): install a kernel that has them: --install linux-image-amd64$"):  # fmt: skip
            initrd.rebuild(g, load_profile("debian"), initrd.choose_kernel(g), aws)


def test_a_damaged_initrd_is_refused_in_one_line(tmp_path: Path) -> None:
    """A byte changed or the end cut off, in each compression: a GuestError naming it, never the
    library's own exception (a fuzzed image's initrd ended 20-migrate with zlib's)."""
    main = _cpio(tmp_path, [f"usr/lib/modules/6.1/kernel/m{i}.ko" for i in range(200)])
    for compress in (gzip.compress, lzma.compress, bz2.compress):
        packed = compress(main)
        damaged = bytearray(packed)
        damaged[len(packed) // 2] ^= 0xFF
        for data in (bytes(damaged), packed[: len(packed) // 2]):
            with pytest.raises(
                GuestError, match=r"^the initrd is corrupt: its \w+ data cannot be read \(.*\): refused$"
            ):
                initrd.list_initrd(data)
