from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest

from imaging.errors import GuestError
from imaging.guest import initrd
from imaging.guest.files import Guest
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
        kept = initrd.rebuild(g, generic, kernel, ["virtio_blk", "virtio_balloon"], ["virtio_blk"])
        assert (kept.rebuilt, kept.image, kept.modules) == (False, "/boot/initrd.img-6.1", "virtio_blk")
        with pytest.raises(GuestError, match=r"initrd /boot/initrd.img-6.1 holds none of ata_piix, ahci"):
            initrd.rebuild(g, generic, kernel, ["ata_piix", "ahci"], ["ata_piix", "ahci"])


def test_kept_initrd_may_rely_on_a_built_in_driver(tmp_path: Path) -> None:
    with Guest(_kvm_guest(tmp_path, builtin="kernel/drivers/ata/ahci.ko\n")) as g:
        kept = initrd.rebuild(
            g, load_profile("generic"), initrd.choose_kernel(g), ["ahci"], ["ata_piix", "ahci"]
        )
        assert not kept.rebuilt


def test_no_initrd_is_fine_when_the_disk_driver_is_built_in(tmp_path: Path) -> None:
    root = _kvm_guest(tmp_path, builtin="kernel/drivers/block/virtio_blk.ko\n")
    (root / "boot" / "initrd.img-6.1").unlink()
    generic = load_profile("generic")
    with Guest(root) as g:
        kernel = initrd.choose_kernel(g)
        kept = initrd.rebuild(g, generic, kernel, ["virtio_blk"], ["virtio_blk"])
        assert (kept.image, kept.rebuilt) == ("", False) and "built into the kernel" in kept.tool
        with pytest.raises(GuestError, match=r"kernel 6.1 has no initrd nor any of ahci built in"):
            initrd.rebuild(g, generic, kernel, ["ahci"], ["ahci"])
