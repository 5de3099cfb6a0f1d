"""Reading an unmounted guest through debugfs: bounded, regular files only."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from imaging.disk.debugfs import ExtGuest
from imaging.errors import GuestError


def test_reads_are_bounded_and_regular_files_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "boot" / "grub").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("guest\n")
    (root / "etc" / "link").symlink_to("hostname")
    os.mkfifo(root / "etc" / "fifo")
    with open(root / "boot" / "grub" / "grub.cfg", "wb") as f:
        f.truncate(1 << 40)  # debugfs cat would stream a TiB of zeros
    image = tmp_path / "fs.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", root, image, "32M"], check=True)
    guest = ExtGuest(image)
    assert guest.read_text("/etc/hostname") == "guest\n"
    assert guest.read_text("/etc/link") is None and guest.read_text("/etc/fifo") is None
    assert guest.read_text("/etc/none") is None
    with pytest.raises(GuestError) as e:
        guest.read_text("/boot/grub/grub.cfg")
    assert str(e.value) == (
        "/boot/grub/grub.cfg in the guest is 1.0 TiB: more than the 8.0 MiB read from a guest file: refused"
    )
