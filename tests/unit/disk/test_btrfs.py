from __future__ import annotations

from imaging.disk import btrfs

FEDORA = """\
UUID=5a2d199f-4836-548f-ba33-3e5660bb15d3 /                       btrfs   subvol=root,compress=zstd:1 0 0
UUID=5a2d199f-4836-548f-ba33-3e5660bb15d3 /home                   btrfs   subvol=/home,compress=zstd:1 0 0
UUID=0e4d1b7a-0f4c-4c1e-9a55-3f0b8f1f2d11 /boot                   ext4    defaults        1 2
# UUID=x /old btrfs subvol=old 0 0
"""
SUSE = """\
UUID=9e3c-7a / btrfs defaults 0 0
UUID=9e3c-7a /.snapshots btrfs subvol=/@/.snapshots 0 0
UUID=9e3c-7a /var btrfs subvol=/@/var,compress-force=lzo 0 0
"""


def test_the_root_entrys_subvolume() -> None:
    assert btrfs.root_entry_subvolume(FEDORA) == "root"
    assert btrfs.root_entry_subvolume(SUSE) == ""  # the default subvolume is mounted
    assert btrfs.root_entry_subvolume("UUID=x /home btrfs subvol=home 0 0\n") is None
    # A hostile path stays a path from the top level.
    assert btrfs.root_entry_subvolume("UUID=x / btrfs subvol=/../../etc 0 0\n") == "etc"


def test_the_subvolumes_fstab_mounts() -> None:
    assert btrfs.fstab_subvolumes(FEDORA) == {"/": "root", "/home": "home"}
    assert btrfs.fstab_subvolumes(SUSE) == {"/.snapshots": "@/.snapshots", "/var": "@/var"}


def test_the_compression_the_guest_writes_with() -> None:
    assert btrfs.compression(FEDORA) == ["compress=zstd:1"]
    assert btrfs.compression(SUSE) == []  # only the root entry's counts
    assert btrfs.compression("UUID=x / btrfs compress-force=zlib:3,noatime 0 0\n") == [
        "compress-force=zlib:3"
    ]
    # Anything else in the options never reaches a mount.
    assert btrfs.compression("UUID=x / btrfs compress=zstd;reboot,ssd 0 0\n") == []
