"""XFS and btrfs roots through acquire, the guest mounts of 10-clean/20-migrate, and placement:
made by the host's own mkfs.xfs and mkfs.btrfs, filled through a real mount, and read back the
same way. What placement promises (UUID, label, xattrs, ACLs, SELinux labels, hard links,
sparseness) is checked on the placed filesystem; what bad input gets is one line, nothing left
mounted or attached, and the source unchanged."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imaging.clouds import acquire
from imaging.disk import bootable, bootloader, btrfs, filesystems, xfs
from imaging.errors import SourceError
from imaging.guest import access
from imaging.workspace import Workspace

from .conftest import leftovers

FSTAB_XFS = "UUID={uuid} / xfs defaults 0 0\n"
FSTAB_BTRFS = "UUID={uuid} / btrfs subvol=root,compress=zstd:1 0 0\nUUID={uuid} /home btrfs subvol=home,compress=zstd:1 0 0\n"


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout


@contextmanager
def mounted(image: Path, *options: str) -> Iterator[Path]:
    mnt = image.with_suffix(".mnt")
    mnt.mkdir(exist_ok=True)
    run("mount", "-o", ",".join(["loop", *options]), image, mnt)
    try:
        yield mnt
    finally:
        run("umount", mnt)
        mnt.rmdir()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plant(root: Path, home: Path | None = None) -> None:
    """What placement must keep: a hard-linked pair, xattrs (a user one and an SELinux label),
    an ACL, a sparse file, and a guest-absolute symlink."""
    (root / "etc").mkdir(parents=True, exist_ok=True)
    data = (home or root / "home") / "debian" / "results"
    data.mkdir(parents=True)
    (data / "a.csv").write_text("run,yield\n1,0.4\n")
    os.link(data / "a.csv", data / "a-link.csv")
    (data / "x").write_text("x")
    os.setxattr(data / "x", "user.imaging", b"kept")
    os.setxattr(data / "x", "security.selinux", b"system_u:object_r:user_home_t:s0")
    run("setfacl", "-m", "u:1000:rwx", data)
    with open(data / "sparse", "wb") as f:
        f.truncate(1 << 30)
        f.write(b"head")
    (root / "etc" / "mtab").symlink_to("/proc/self/mounts")
    (root / "boot").mkdir(exist_ok=True)
    (root / "boot" / "vmlinuz-6.1.0-1-amd64").write_bytes(b"kernel")
    (root / "boot" / "initrd.img-6.1.0-1-amd64").write_bytes(b"initrd")


def check_planted(root: Path, home: Path | None = None) -> None:
    data = (home or root / "home") / "debian" / "results"
    assert os.stat(data / "a.csv").st_ino == os.stat(data / "a-link.csv").st_ino
    assert os.getxattr(data / "x", "user.imaging") == b"kept"
    assert os.getxattr(data / "x", "security.selinux").rstrip(b"\0") == b"system_u:object_r:user_home_t:s0"
    assert "user:1000:rwx" in run("getfacl", "-pn", data)
    st = os.stat(data / "sparse")
    assert st.st_size == 1 << 30 and st.st_blocks * 512 < 1 << 20
    assert os.readlink(root / "etc" / "mtab") == "/proc/self/mounts"


def make_xfs(tmp_path: Path, size: str = "400M") -> Path:
    image = tmp_path / "xfs.img"
    run("truncate", "-s", size, image)
    run("mkfs.xfs", "-q", "-L", "root", "-m", "bigtime=1,inobtcount=1", image)
    uuid = xfs.info(image).uuid
    with mounted(image) as mnt:
        plant(mnt)
        (mnt / "etc" / "fstab").write_text(FSTAB_XFS.format(uuid=uuid))
    return image


def make_btrfs(tmp_path: Path) -> Path:
    image = tmp_path / "btrfs.img"
    run("truncate", "-s", "400M", image)
    run("mkfs.btrfs", "-q", "-L", "fedora", image)
    uuid = btrfs.info(image).uuid
    with mounted(image, "compress=zstd:1") as top:
        run("btrfs", "subvolume", "create", top / "root")
        run("btrfs", "subvolume", "create", top / "home")
        plant(top / "root", top / "home")
        (top / "root" / "home").mkdir()
        (top / "root" / "etc" / "fstab").write_text(FSTAB_BTRFS.format(uuid=uuid))
        (top / "snapshots").mkdir()
        run("btrfs", "subvolume", "snapshot", "-r", top / "root", top / "snapshots" / "root-1")
    return image


def acquired(tmp_path: Path, image: Path, **options: str) -> tuple[Workspace, acquire.Instance]:
    ws = Workspace.open(tmp_path / "run")
    instance = acquire.acquire(acquire.inspect(str(image)), ws, hash_source=False, **options)
    ws.save_result("00-acquire", instance.to_dict())
    return ws, instance


def placed(ws: Workspace) -> tuple[bootable.DiskLayout, bootable.Placed, bootable.Disk]:
    instance = bootable.instance_now(ws)
    layout = bootable.plan_layout(
        int(instance["size_bytes"]),  # type: ignore[call-overload]
        int(instance["block_size"]),  # type: ignore[call-overload]
        disk_size="+200M",
    )
    done = bootable.place_filesystem(ws, instance, layout)
    return layout, done, bootable.finish_disk(ws, layout)


def test_an_xfs_root_is_acquired_cleaned_and_placed_keeping_what_it_holds(tmp_path: Path) -> None:
    image = make_xfs(tmp_path)
    before = digest(image)
    ws, instance = acquired(tmp_path, image)
    assert (instance.fs_type, instance.label) == ("xfs", "root")
    assert instance.uuid == xfs.info(image).uuid and "clean" in instance.fsck
    with access.editing(ws) as g:
        assert g.read_text("/etc/fstab") == FSTAB_XFS.format(uuid=instance.uuid)
        g.write_text("/etc/motd", "migrated\n")
    layout, done, disk = placed(ws)
    assert done.grown and disk.fs_type == "xfs" and disk.uuid == instance.uuid
    assert disk.block_count * disk.block_size > instance.size_bytes + (150 << 20)
    # The placed filesystem as a user's machine would mount it.
    with mounted(ws.disk, f"offset={layout.offset_bytes}", "ro", "nouuid") as root:
        check_planted(root)
        assert (root / "etc" / "motd").read_text() == "migrated\n"
    assert {"BIGTIME", "INOBTCNT"} <= set(
        run("xfs_db", "-r", "-c", "version", ws.instance).split("=")[1].strip().split(",")
    )
    assert digest(image) == before and leftovers(tmp_path) == []


def test_a_dirty_xfs_log_is_replayed_on_the_copy_never_on_the_source(tmp_path: Path) -> None:
    image = make_xfs(tmp_path)
    with mounted(image) as mnt:
        (mnt / "written-before-the-crash").write_text("kept\n")
        run("sync")
        (mnt / "in-the-log-only").write_text("replayed\n")
        run("xfs_io", "-x", "-c", "shutdown -f", mnt)
    assert (
        "valuable metadata changes in a log"
        in subprocess.run(["xfs_repair", "-n", "-f", image], capture_output=True, text=True).stderr
    )
    before = digest(image)
    ws, instance = acquired(tmp_path, image)
    assert digest(image) == before  # the source's log is still there, unreplayed
    with access.reading(ws) as g:
        assert g.read_text("/written-before-the-crash") == "kept\n"
    assert "clean" in instance.fsck and leftovers(tmp_path) == []


def test_an_xfs_log_that_will_not_replay_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    image = make_xfs(tmp_path)
    with mounted(image) as mnt:
        (mnt / "in-the-log-only").write_text("lost\n")
        run("xfs_io", "-x", "-c", "shutdown -f", mnt)
    start, blocks = (
        int(line.split("=")[1])
        for line in run("xfs_db", "-r", "-c", "sb 0", "-c", "print logstart logblocks", image).splitlines()
    )
    with open(image, "r+b") as f:  # the whole log overwritten with junk: no head to find
        f.seek(start * 4096)
        f.write(os.urandom(blocks * 4096))
    before = digest(image)
    ws = Workspace.open(tmp_path / "run")
    with pytest.raises(SourceError) as e:
        acquire.acquire(acquire.inspect(str(image)), ws, hash_source=False)
    assert "\n" not in str(e.value) and "XFS" in str(e.value)
    assert digest(image) == before and not ws.instance.exists() and leftovers(tmp_path) == []


def test_a_btrfs_root_keeps_its_subvolumes_and_drops_its_snapshots(tmp_path: Path) -> None:
    image = make_btrfs(tmp_path)
    before = digest(image)
    ws, instance = acquired(tmp_path, image)
    assert (instance.fs_type, instance.label, instance.subvolume) == ("btrfs", "fedora", "root")
    assert instance.snapshots_dropped == ["snapshots/root-1"]
    assert instance.write_options == ["compress=zstd:1"]
    # 10-clean and 20-migrate see the guest as it sees itself: /home is the home subvolume.
    with access.editing(ws) as g:
        assert g.read_text("/home/debian/results/a.csv") == "run,yield\n1,0.4\n"
        g.write_text("/home/debian/.bash_history", "")
        g.remove("/home/debian/.bash_history")
    layout, done, disk = placed(ws)
    assert done.grown and disk.fs_type == "btrfs" and disk.uuid == instance.uuid
    with mounted(ws.disk, f"offset={layout.offset_bytes}", "ro", "subvolid=5") as top:
        check_planted(top / "root", top / "home")
        assert sorted(p.name for p in top.iterdir()) == ["home", "root", "snapshots"]
        assert not (top / "snapshots" / "root-1").exists()
    assert digest(image) == before and leftovers(tmp_path) == []


def test_btrfs_snapshots_kept_when_asked(tmp_path: Path) -> None:
    image = make_btrfs(tmp_path)
    ws, instance = acquired(tmp_path, image, snapshots="keep")
    assert instance.snapshots_dropped == []
    with btrfs.top_level(ws.instance, writable=False) as top:
        assert "snapshots/root-1" in btrfs.subvolumes(top)
    assert leftovers(tmp_path) == []


def test_a_btrfs_over_two_devices_is_refused_in_one_line(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a, b):
        run("truncate", "-s", "300M", p)
    devices = [run("losetup", "--find", "--show", p).strip() for p in (a, b)]
    try:
        run("mkfs.btrfs", "-q", "-d", "single", "-m", "single", *devices)
    finally:
        for d in devices:
            run("losetup", "--detach", d)
    with pytest.raises(SourceError, match=r"spans 2 devices: only a single-device btrfs can be placed") as e:
        acquire.acquire(acquire.inspect(str(a)), Workspace.open(tmp_path / "run"), hash_source=False)
    assert "\n" not in str(e.value) and leftovers(tmp_path) == []


def test_a_corrupt_xfs_is_refused_by_its_read_only_check(tmp_path: Path) -> None:
    image = make_xfs(tmp_path)
    # The root directory's inode chunk: xfs_repair -n finds it, a mount might not.
    ino = int(run("xfs_db", "-r", "-c", "sb 0", "-c", "print rootino", image).split("=")[1])
    with open(image, "r+b") as f:
        f.seek(ino * 512 + 512)  # the inodes after the root's, in the same chunk
        f.write(os.urandom(4096))
    before = digest(image)
    with pytest.raises(SourceError) as e:
        acquired(tmp_path, image)
    assert "\n" not in str(e.value) and ("xfs_repair" in str(e.value) or "XFS" in str(e.value))
    assert digest(image) == before and leftovers(tmp_path) == []


def test_every_filesystem_module_has_the_whole_interface() -> None:
    for name, module in filesystems.FILESYSTEMS.items():
        for attr in ("TYPES", "GRUB_MODULE", "KERNEL_MODULE", "READ_ONLY_OPTIONS", "info", "check", "tidy",
                     "grow", "mount_options"):  # fmt: skip
            assert hasattr(module, attr), (name, attr)
        assert name in module.TYPES


def test_a_corrupt_btrfs_is_refused_by_its_read_only_check(tmp_path: Path) -> None:
    image = tmp_path / "btrfs.img"
    run("truncate", "-s", "300M", image)
    run("mkfs.btrfs", "-q", "-m", "single", image)  # one copy of the metadata: nothing to heal from
    with mounted(image) as top:
        (top / "etc").mkdir()
        (top / "etc" / "fstab").write_text("LABEL=x / btrfs defaults 0 0\n")
        for i in range(200):
            (top / "etc" / f"f{i}").write_text(str(i))
    tree = run("btrfs", "inspect-internal", "dump-tree", "-t", "fs", image).split()
    logical = int(tree[tree.index("node" if "node" in tree else "leaf") + 1])
    physical = int(run("btrfs-map-logical", "-l", logical, image).split("physical ")[1].split()[0])
    with open(image, "r+b") as f:  # the filesystem tree's root block, past its header
        f.seek(physical + 300)
        f.write(b"\xff" * 64)
    before = digest(image)
    with pytest.raises(SourceError) as e:
        acquired(tmp_path, image)
    assert "\n" not in str(e.value) and "btrfs" in str(e.value)
    assert digest(image) == before and leftovers(tmp_path) == []


def test_a_root_that_is_the_default_subvolume_is_not_pinned(tmp_path: Path) -> None:
    # openSUSE: the root is a snapshot made the default subvolume; fstab names no subvol for /,
    # and snapper's rollback works by changing the default.
    image = tmp_path / "suse.img"
    run("truncate", "-s", "300M", image)
    run("mkfs.btrfs", "-q", image)
    with mounted(image) as top:
        run("btrfs", "subvolume", "create", top / "@")
        (top / "@" / ".snapshots").mkdir()
        run("btrfs", "subvolume", "create", top / "@" / ".snapshots" / "1")
        run("btrfs", "subvolume", "create", top / "@" / ".snapshots" / "1" / "snapshot")
        root = top / "@" / ".snapshots" / "1" / "snapshot"
        plant(root)
        (root / "etc" / "fstab").write_text(f"UUID={btrfs.info(image).uuid} / btrfs defaults 0 0\n")
        run("btrfs", "subvolume", "set-default", root)
    ws, instance = acquired(tmp_path, image)
    assert (instance.subvolume, instance.subvolume_is_default) == ("@/.snapshots/1/snapshot", True)
    assert bootloader.root_args(instance.to_dict()) == []
    assert bootloader.root_args({"subvolume": "root", "subvolume_is_default": False}) == [
        "rootflags=subvol=root"
    ]
    with access.reading(ws) as g:
        assert g.read_text("/home/debian/results/a.csv") == "run,yield\n1,0.4\n"
    assert leftovers(tmp_path) == []
