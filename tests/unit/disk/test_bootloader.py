from __future__ import annotations

import subprocess
import zlib
from pathlib import Path

import pytest

from imaging.disk import bootloader
from imaging.disk.debugfs import Entry
from imaging.errors import GuestError

UUID = "31ef4e9d-d0cd-50d7-b697-b34b26b83c9c"


class FakeGuest:
    def __init__(self, names: list[str]) -> None:
        self.names = names

    def entries(self, path: str) -> list[Entry]:
        assert path == "/boot"
        return [Entry(n, i + 12, 0o100644, 0, 0, 1) for i, n in enumerate(self.names)]


def kernels(names: list[str]) -> list[bootloader.Kernel]:
    return bootloader.find_kernels(FakeGuest(names))  # type: ignore[arg-type]


def test_kernels_newest_first_with_their_initrds() -> None:
    found = kernels(
        ["vmlinuz-2.6.18-92.el5", "initrd-2.6.18-92.el5.img", "vmlinuz-2.6.18-348.3.1.el5",
         "initrd-2.6.18-348.3.1.el5.img", "config-2.6.18-92.el5", "vmlinuz-2.6.18-400.el5"]
    )  # fmt: skip
    assert [k.version for k in found] == ["2.6.18-400.el5", "2.6.18-348.3.1.el5", "2.6.18-92.el5"]
    assert found[0].initrd is None
    assert found[1].initrd == "/boot/initrd-2.6.18-348.3.1.el5.img"


def test_xen_only_kernels_are_left_out_when_another_exists() -> None:
    found = kernels(["vmlinuz-2.6.18-400.el5xen", "vmlinuz-2.6.18-92.el5", "initramfs-2.6.18-92.el5.img"])
    assert [(k.version, k.xen) for k in found] == [("2.6.18-92.el5", False)]
    assert found[0].initrd == "/boot/initramfs-2.6.18-92.el5.img"
    assert [k.xen for k in kernels(["vmlinuz-2.6.18-400.el5xen"])] == [True]


def _entries(cfg: str) -> list[str]:
    return [line.split("'")[1] for line in cfg.splitlines() if line.startswith("menuentry ")]


def test_grub_config_offers_the_guests_legacy_menu_first() -> None:
    # The guest's grubby keeps its grub.conf: that menu is what follows its kernel updates.
    cfg = bootloader.grub_config(kernels(["vmlinuz-6.1"]), UUID, legacy_menu="/boot/grub/grub.conf")
    assert "legacy_configfile /boot/grub/grub.conf" in cfg
    assert _entries(cfg) == ["Boot menu of the guest (/boot/grub/grub.conf)", "Linux (6.1)"]


def test_the_default_entry_follows_the_guests_kernel_links() -> None:
    found = kernels(["vmlinuz-6.1.0-9-amd64", "initrd.img-6.1.0-9-amd64"])
    cfg = bootloader.grub_config(found, UUID, title="Debian", follow=("/vmlinuz", "/initrd.img"), prefix="/@",
                                 legacy_menu="/boot/grub/grub.conf")  # fmt: skip
    assert _entries(cfg) == ["Debian (newest installed kernel: /vmlinuz)", "Debian (6.1.0-9-amd64)",
                             "Boot menu of the guest (/boot/grub/grub.conf)"]  # fmt: skip
    first = cfg.split("menuentry ")[1]
    assert f"\tlinux /@/vmlinuz root=UUID={UUID} ro " in first and "\tinitrd /@/initrd.img\n" in first
    assert "set default=0" in cfg
    with pytest.raises(GuestError, match="kernel link"):
        bootloader.grub_config(found, UUID, follow=("/boot/vmlinuz*", "/initrd.img"))


def test_unsafe_names_are_never_offered_to_grub() -> None:
    found = kernels(
        ["vmlinuz-1;reboot", "vmlinuz-6.1 x", "vmlinuz-6.1.0-1-amd64", "initrd.img-6.1.0-1-amd64"]
    )
    assert [k.version for k in found] == ["6.1.0-1-amd64"]


def test_no_kernel_is_a_clear_error() -> None:
    with pytest.raises(GuestError, match="no kernel in the guest's /boot"):
        kernels(["config-6.1", "grub"])


def test_grub_config() -> None:
    found = kernels(["vmlinuz-6.1.0-2-amd64", "initrd.img-6.1.0-2-amd64", "vmlinuz-6.1.0-1-amd64"])
    cfg = bootloader.grub_config(found, UUID, title="Debian GNU/Linux 12", timeout=3, kernel_args="quiet")
    assert "set timeout=3" in cfg
    assert "serial --unit=0 --speed=115200" in cfg and "terminal_output serial console" in cfg
    assert cfg.index("6.1.0-2-amd64") < cfg.index("6.1.0-1-amd64")
    assert (f"\tlinux /boot/vmlinuz-6.1.0-2-amd64 root=UUID={UUID} ro console=tty0 console=ttyS0,115200n8 quiet"
            in cfg)  # fmt: skip
    assert "\tinitrd /boot/initrd.img-6.1.0-2-amd64" in cfg
    assert cfg.count("menuentry ") == 2 and cfg.count("initrd ") == 1
    assert f"search --no-floppy --fs-uuid --set=root {UUID}" in cfg


def test_grub_config_refuses_injection() -> None:
    from imaging.errors import ParameterError

    found = kernels(["vmlinuz-6.1"])
    with pytest.raises(GuestError, match="not a UUID"):
        bootloader.grub_config(found, "x' ; reboot")
    with pytest.raises(ParameterError):
        bootloader.grub_config(found, UUID, kernel_args="}; menuentry x {")


def test_grub_reads_back_what_is_on_the_disk(tmp_path: Path) -> None:
    # A partition 1 at 1 MiB holding an ext4 made with its files, as placement leaves it.
    tree = tmp_path / "tree"
    (tree / "boot" / "grub").mkdir(parents=True)
    kernel = bytes(range(256)) * 4096
    (tree / "boot" / "vmlinuz-6.1.0-9-amd64").write_bytes(kernel)
    (tree / "boot" / "grub" / "grub.cfg").write_text("set default=0\n")
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", disk], input="label: dos\nstart=2048, type=83\n", text=True, check=True)
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-d", tree, "-E", "offset=1048576", disk, "32M"], check=True
    )
    read = bootloader.read_back(
        disk, ["/boot/vmlinuz-6.1.0-9-amd64"], "/boot/grub/grub.cfg", "set default=0\n"
    )
    assert (
        read == f"/boot/vmlinuz-6.1.0-9-amd64 (crc {zlib.crc32(kernel):08x}); /boot/grub/grub.cfg as written"
    )
    with pytest.raises(
        GuestError, match=r"^this host's GRUB cannot read /boot/vmlinuz-9 from the placed filesystem: "
    ):
        bootloader.read_back(disk, ["/boot/vmlinuz-9"], "/boot/grub/grub.cfg", "set default=0\n")
    with pytest.raises(GuestError, match="does not read back /boot/grub/grub.cfg as it was written"):
        bootloader.read_back(disk, [], "/boot/grub/grub.cfg", "set default=1\n")
