"""The partitioned samples' definitions, without building them (tests/integration/test_sample_layouts.py
builds and inspects them): each is its own cache entry, checks its own root's type from inside
the guest, and plants the files a faithful copy keeps."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from imaging.samples import catalog, debian, layouts


def test_each_layout_is_a_sample_with_its_own_cache_key() -> None:
    assert set(layouts.LAYOUTS) == {"debian12-xfs", "debian12-btrfs", "debian12-lvm"} <= set(catalog.SAMPLES)
    keys = {name: catalog._key(name) for name in catalog.SAMPLES if name.startswith("debian")}
    assert len(set(keys.values())) == len(keys)
    assert all(catalog._key(name) == key for name, key in keys.items())  # stable


@pytest.mark.parametrize(("name", "fstype"), [("debian12-xfs", "xfs"), ("debian12-btrfs", "btrfs"),
                                              ("debian12-lvm", "ext4")])  # fmt: skip
def test_the_guest_checks_its_root_and_the_planted_files(name: str, fstype: str) -> None:
    checks = layouts.LAYOUTS[name].checks
    assert f"""findmnt -no FSTYPE /)" = {fstype}'""" in checks
    for what in (
        "hard links kept",
        "user xattr kept",
        "SELinux label kept",
        "POSIX ACL kept",
        "sparse file",
    ):
        assert f'check "{what}' in checks
    # Inserted before the verdict, so a failure of any of them fails the sample's check.
    check = debian.CHECK.replace(debian._VERDICT, checks + debian._VERDICT)
    assert check.index(checks) < check.index('if [ -z "$fail" ]')


def test_fstabs_are_the_installers() -> None:
    assert (
        f"UUID={layouts.XFS_UUID} /" in layouts.XFS_FSTAB
        and " xfs     defaults        0 0" in layouts.XFS_FSTAB
    )
    assert layouts.BTRFS_FSTAB.count("subvol=") == 2 and "compress=zstd:1" in layouts.BTRFS_FSTAB
    assert "/dev/mapper/debian--vg-root /" in layouts.LVM_FSTAB
    assert "/dev/mapper/debian--vg-swap_1 none" in layouts.LVM_FSTAB


def test_the_acl_is_the_kernels_xattr_for_user_1000_rwx() -> None:
    # As getfattr shows setfacl -m u:1000:rwx's result on a 0775 directory.
    acl = layouts._acl((1, 7, -1), (2, 7, 1000), (4, 5, -1), (0x10, 7, -1), (0x20, 5, -1))
    assert acl == base64.b64decode("AgAAAAEABwD/////AgAHAOgDAAAEAAUA/////xAABwD/////IAAFAP////8=")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to uid 1000 and security.* xattrs need root")
def test_plant(tmp_path: Path) -> None:
    layouts.plant(tmp_path)
    results = tmp_path / "home" / "debian" / "results"
    assert (results / "run-7.log").stat().st_nlink == 2
    assert os.getxattr(results / "notes.txt", "user.imaging") == b"kept"
    sparse = (results / "sparse.img").stat()
    assert sparse.st_size == 1 << 30 and sparse.st_blocks < 2048
