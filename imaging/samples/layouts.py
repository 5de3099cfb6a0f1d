"""``sample:debian12-xfs``, ``-btrfs`` and ``-lvm``: the Debian 12 instance of ``debian.py`` on
the partitioned disks other families' installers and image builders make.

- ``debian12-xfs``, as RHEL 8/9, Rocky, Alma and Amazon Linux 2023 cloud images: GPT, a 1 MiB
  BIOS boot partition, then the root partition, XFS v5 (``bigtime``, ``inobtcount``) labelled
  ``root``; fstab by UUID.
- ``debian12-btrfs``, as Fedora and openSUSE: MBR, one btrfs partition labelled ``fedora`` with
  subvolumes ``root`` (/, /boot) and ``home`` (/home), the top level staying the default
  subvolume, files zstd-compressed, and a read-only snapshot ``snapshots/root-1`` as a user's
  snapper or timeshift leaves one.
- ``debian12-lvm``, as Debian's and RHEL's installers do with "use entire disk and set up LVM":
  MBR, partition 1 ``/boot`` (ext2), partition 2 (type 8e) a PV of VG ``debian-vg`` with LVs
  ``root`` (ext4) and ``swap_1``; fstab as debian-installer writes it.

Every filesystem is made by the guest's own tools (mkfs.xfs, mkfs.btrfs and btrfs, mke2fs,
mkswap, run from the built tree in a sandbox); the host only mounts where a tool needs a mounted
filesystem to fill it, and writes the LVM metadata (its lvm2, with a private configuration that
sees only our loop device and activates nothing: the host's own volumes are never touched).

Each also holds what a copy that is not faithful loses (hard links, a user xattr, an SELinux
label, a POSIX ACL, a sparse file), which the guest's check verifies from inside at every boot,
with the root's filesystem type (and, on btrfs, its subvolumes).
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imaging import tools
from imaging.samples import debian
from imaging.samples.kvm import sample_uuid, write
from imaging.sparse import atomic_path, create_sparse

MIB = 1 << 20
RESULTS = "/home/debian/results"
SELINUX_LABEL = "system_u:object_r:user_home_t:s0"
SPARSE_SIZE = 1 << 30
SWAP_MIB = 128
BOOT_MIB = 256
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
EXTRA = ["attr", "acl"]  # getfattr and getfacl, for the check

# What a faithful copy keeps, seen from inside the booted guest.
DATA_CHECKS = r"""check "hard links kept" sh -c 'test "$(stat -c %i @R/run-7.log)" = "$(stat -c %i @R/latest.log)"'
check "user xattr kept" sh -c 'test "$(getfattr --only-values -n user.imaging @R/notes.txt)" = kept'
check "SELinux label kept" sh -c 'getfattr --only-values -n security.selinux @R/labelled.txt | tr -d "\000" | grep -qx @L'
check "POSIX ACL kept" sh -c 'getfacl -n @R/shared | grep -qx user:1000:rwx && getfacl -n @R/shared | grep -qx default:user:1000:rwx'
check "sparse file kept sparse" sh -c 'test "$(stat -c %s @R/sparse.img)" = 1073741824 && test "$(stat -c %b @R/sparse.img)" -lt 2048'
""".replace("@R", RESULTS).replace("@L", SELINUX_LABEL)


def _is(path: str, fstype: str) -> str:
    return f"""check "{path} is {fstype}" sh -c 'test "$(findmnt -no FSTYPE {path})" = {fstype}'\n"""


@dataclass(frozen=True)
class Layout:
    release: str  # the debian.RELEASES sample it is built like
    packages: tuple[str, ...]
    fstab: str
    checks: str
    make_disk: Callable[[Path, Path, str], None]  # (tree, disk, name)


def xfs_disk(tree: Path, disk: Path, name: str) -> None:
    """GPT: BIOS boot partition at 1 MiB (1 MiB), root from 2 MiB; mkfs.xfs on a loop device."""
    size = _fs_bytes(tree)
    create_sparse(disk, 2 * MIB + size + MIB)  # and GPT's backup at the end
    _partition(disk, f"label: gpt\nlabel-id: {_uuid(name, 'disk')}\n"
                     f"start=2048, size=2048, type={BIOS_BOOT}, uuid={_uuid(name, 'p1')}\n"
                     f"start=4096, size={size // 512}, type={LINUX_FS}, uuid={_uuid(name, 'p2')}\n")  # fmt: skip
    with loop(disk, 2 * MIB, size) as dev:
        debian.guest_tool(tree, ["/usr/sbin/mkfs.xfs", "-q", "-L", "root", "-m",
                                 f"bigtime=1,inobtcount=1,uuid={sample_uuid(name)}", dev],
                          binds=["--dev-bind", dev, dev])  # fmt: skip
        with mounted(dev, "rw") as mnt:
            _copy(tree, mnt)


def _btrfs(tree: Path, disk: Path, name: str) -> None:
    """MBR, one btrfs partition from 1 MiB: subvolumes root and home, top level the default."""
    tools.require_tools(
        "btrfs", reason="forget the sample's btrfs after filling it", hint="apt install btrfs-progs"
    )
    size = _fs_bytes(tree)
    create_sparse(disk, MIB + size)
    _partition(disk, f"label: dos\nlabel-id: {_mbr_id(name)}\nstart=2048, size={size // 512}, type=83\n")
    with loop(disk, MIB, size) as dev:
        try:
            debian.guest_tool(tree, ["/usr/sbin/mkfs.btrfs", "-q", "-L", "fedora", "-U", sample_uuid(name), dev],
                              binds=["--dev-bind", dev, dev])  # fmt: skip
            with mounted(dev, "compress=zstd:1") as top:

                def btrfs(*args: str) -> None:
                    debian.guest_tool(tree, ["/usr/bin/btrfs", "-q", *args], binds=["--bind", top, "/mnt"])

                btrfs("subvolume", "create", "/mnt/root")
                btrfs("subvolume", "create", "/mnt/home")
                _copy(tree, top / "root", "--exclude=/home/*")
                _copy(tree / "home", top / "home")
                (top / "snapshots").mkdir()
                btrfs("subvolume", "snapshot", "-r", "/mnt/root", "/mnt/snapshots/root-1")
        finally:
            forget_btrfs(dev)


def _lvm(tree: Path, disk: Path, name: str) -> None:
    """MBR: partition 1 /boot (ext2, as debian-installer's LVM recipes make it), partition 2 (8e)
    a PV from 1 MiB: VG debian-vg, LVs root (ext4) and swap_1 after it."""
    tools.require_tools("pvcreate", reason="write the sample's LVM metadata", hint="apt install lvm2")
    root_mib = -(-_fs_bytes(tree) // (4 * MIB)) * 4  # whole 4 MiB extents
    boot = BOOT_MIB * MIB
    part = MIB + (root_mib + SWAP_MIB) * MIB  # pe_start at 1 MiB, then the extents, all used
    pv = MIB + boot
    create_sparse(disk, pv + part)
    _partition(disk, f"label: dos\nlabel-id: {_mbr_id(name)}\nstart=2048, size={boot // 512}, type=83, bootable\n"
                     f"start={pv // 512}, size={part // 512}, type=8e\n")  # fmt: skip
    with loop(disk, pv, part) as dev, lvm_env(dev) as env:
        for argv in (["pvcreate", dev], ["vgcreate", "debian-vg", dev],
                     ["lvcreate", "-an", "-Zn", "-L", f"{root_mib}m", "-n", "root", "debian-vg"],
                     ["lvcreate", "-an", "-Zn", "-L", f"{SWAP_MIB}m", "-n", "swap_1", "debian-vg"]):  # fmt: skip
            tools.run(argv, env=env)
        offsets = {lv: pv + start for lv, start in lv_offsets(dev, env).items()}
    # /boot's files go to partition 1 only: the root's /boot is the empty mount point.
    kernels = tree.parent / "boot-files"
    os.rename(tree / "boot", kernels)
    (tree / "boot").mkdir(mode=0o755)
    try:
        debian.guest_tool(tree, ["/usr/sbin/mke2fs", "-q", "-F", "-t", "ext4", "-U", sample_uuid(name),
                                 "-E", f"offset={offsets['root']},root_owner=0:0,nodiscard", "-d", "/src",
                                 "/disk.img", f"{root_mib}M"],
                          binds=["--ro-bind", tree, "/src", "--bind", disk, "/disk.img"])  # fmt: skip
        debian.guest_tool(tree, ["/usr/sbin/mke2fs", "-q", "-F", "-t", "ext2", "-U", LVM_BOOT_UUID,
                                 "-E", f"offset={MIB},root_owner=0:0,nodiscard", "-d", "/src",
                                 "/disk.img", f"{BOOT_MIB}M"],
                          binds=["--ro-bind", kernels, "/src", "--bind", disk, "/disk.img"])  # fmt: skip
    finally:
        (tree / "boot").rmdir()
        os.rename(kernels, tree / "boot")
    with loop(disk, offsets["swap_1"], SWAP_MIB * MIB) as dev:
        debian.guest_tool(tree, ["/usr/sbin/mkswap", "-U", _uuid(name, "swap"), dev],
                          binds=["--dev-bind", dev, dev])  # fmt: skip


XFS_UUID, BTRFS_UUID, EXT4_UUID = (sample_uuid(f"debian12-{fs}") for fs in ("xfs", "btrfs", "lvm"))
LVM_BOOT_UUID = str(
    uuid.uuid5(uuid.NAMESPACE_URL, "imaging-sample:debian12-lvm:boot")
)  # as _uuid() makes them
# As each family's installer writes it: anaconda (RHEL), Fedora's image builders, debian-installer.
XFS_FSTAB = f"""
#
# /etc/fstab
# Created by anaconda
#
UUID={XFS_UUID} /                       xfs     defaults        0 0
"""
BTRFS_FSTAB = f"""\
UUID={BTRFS_UUID} /                       btrfs   subvol=root,compress=zstd:1 0 0
UUID={BTRFS_UUID} /home                   btrfs   subvol=home,compress=zstd:1 0 0
"""
LVM_FSTAB = f"""\
# /etc/fstab: static file system information.
#
# <file system> <mount point>   <type>  <options>       <dump>  <pass>
/dev/mapper/debian--vg-root /               ext4    errors=remount-ro 0       1
# /boot was on /dev/sda1 during installation
UUID={LVM_BOOT_UUID} /boot           ext2    defaults        0       2
/dev/mapper/debian--vg-swap_1 none            swap    sw              0       0
"""
BTRFS_CHECKS = r"""check "/ is the root subvolume" sh -c 'findmnt -no OPTIONS / | tr , "\n" | grep -qx subvol=/root'
check "/home is the home subvolume" sh -c 'findmnt -no OPTIONS /home | tr , "\n" | grep -qx subvol=/home'
"""
# What the conversion promises an LVM guest: its root flattened onto a plain partition, the
# separate /boot merged into it (the kernel there), nothing left waiting for a volume.
LVM_CHECKS = r"""check "/ is a plain partition, not a logical volume" sh -c 'findmnt -no SOURCE / | grep -qv ^/dev/mapper/'
check "/boot merged into the root" sh -c 'test "$(findmnt -no TARGET -T /boot)" = / && ls /boot/vmlinuz-*'
"""
LAYOUTS = {
    "debian12-xfs": Layout("debian12", ("xfsprogs", *EXTRA), XFS_FSTAB, _is("/", "xfs") + DATA_CHECKS, xfs_disk),
    "debian12-btrfs": Layout("debian12", ("btrfs-progs", *EXTRA), BTRFS_FSTAB,
                             _is("/", "btrfs") + _is("/home", "btrfs") + BTRFS_CHECKS + DATA_CHECKS, _btrfs),
    "debian12-lvm": Layout("debian12", ("lvm2", *EXTRA), LVM_FSTAB, _is("/", "ext4") + LVM_CHECKS + DATA_CHECKS,
                           _lvm),
}  # fmt: skip


def build(name: str, dest: Path) -> Path:
    """Build sample ``name`` (a LAYOUTS key) as the read-only disk image ``dest``."""
    layout = LAYOUTS[name]
    tools.require_tools("losetup", "mount", "rsync", "sfdisk", reason="build the sample disk",
                        hint="apt install util-linux mount rsync fdisk")  # fmt: skip
    # In the cache directory, not /tmp: the tree is half a gigabyte, /tmp may be a small tmpfs.
    with tempfile.TemporaryDirectory(prefix=f"sample-{name}-", dir=dest.parent) as tmp:
        tree = Path(tmp) / "root"
        tree.mkdir()
        debian.stage_debian_root(tree, layout.release, packages=layout.packages, fstab=layout.fstab,
                                 checks=layout.checks)  # fmt: skip
        plant(tree)
        with atomic_path(dest) as part:
            layout.make_disk(tree, part, name)
            part.chmod(0o444)
    return dest


def plant(tree: Path) -> None:
    """The user's files a faithful copy keeps: a hard-linked pair, a user xattr, an SELinux
    label, a directory with a POSIX ACL (access and default) for uid 1000, a 1 GiB sparse file."""
    results = tree / RESULTS.lstrip("/")
    write(results / "run-7.log", "step 1 ok\nstep 2 ok\n")
    os.link(results / "run-7.log", results / "latest.log")
    write(results / "notes.txt", "yield rises with temperature\n")
    os.setxattr(results / "notes.txt", "user.imaging", b"kept")
    write(results / "labelled.txt", "labelled by SELinux\n")
    os.setxattr(results / "labelled.txt", "security.selinux", SELINUX_LABEL.encode() + b"\0")
    (results / "shared").mkdir(mode=0o775)
    (results / "shared" / "README").write_text("for the group\n")
    acl = _acl((1, 7, -1), (2, 7, 1000), (4, 5, -1), (0x10, 7, -1), (0x20, 5, -1))
    os.setxattr(results / "shared", "system.posix_acl_access", acl)
    os.setxattr(results / "shared", "system.posix_acl_default", acl)
    with open(results / "sparse.img", "wb") as f:
        f.write(b"begin\n".ljust(4096, b"."))
        f.seek(SPARSE_SIZE // 2)
        f.write(b"middle\n".ljust(4096, b"."))
        f.truncate(SPARSE_SIZE)
    for dirpath, dirnames, filenames in os.walk(results):
        for entry in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.chown(entry, 1000, 1000, follow_symlinks=False)


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL as the kernel's xattr holds it: (tag, permissions, id; -1 for none) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i & 0xFFFFFFFF) for t, p, i in entries)


def _fs_bytes(tree: Path) -> int:
    """Room for ``tree`` (its allocated blocks, each inode once), whole MiB, as make_filesystem."""
    seen: set[int] = set()
    used = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for entry in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, entry))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                used += st.st_blocks * 512
    return ((int(used * 1.4) >> 20) + 384) * MIB


def _uuid(name: str, what: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"imaging-sample:{name}:{what}"))


def _mbr_id(name: str) -> str:
    return "0x" + _uuid(name, "disk")[:8]


def _partition(disk: Path, script: str) -> None:
    tools.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", disk], input=script)


@contextlib.contextmanager
def loop(disk: Path, offset: int, size: int, *, read_only: bool = False) -> Iterator[str]:
    """A loop device on ``size`` bytes of ``disk`` from ``offset`` (this kernel scans no partitions)."""
    ro = ["--read-only"] if read_only else []
    dev = tools.check_output(
        ["losetup", *ro, "--offset", offset, "--sizelimit", size, "--find", "--show", disk]
    )
    try:
        yield dev.strip()
    finally:
        tools.run(["losetup", "--detach", dev.strip()])


@contextlib.contextmanager
def mounted(dev: str, options: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="imaging-mnt-") as mnt:
        tools.run(["mount", "-o", f"nosuid,nodev,{options}", dev, mnt])
        try:
            yield Path(mnt)
        finally:
            tools.run(["umount", mnt])


def _copy(src: Path, dest: Path, *options: str) -> None:
    tools.run(["rsync", "-aHAXS", "--numeric-ids", *options, f"{src}/", f"{dest}/"], timeout=1800)


def forget_btrfs(dev: str) -> None:
    """Drop the host kernel's registration of the btrfs on ``dev`` (a mount made one)."""
    tools.run(["btrfs", "device", "scan", "--forget", dev], ok_codes=(0, 1))


_LVM_CONF = """\
devices {
    filter = [ "a|^@DEV$|", "r|.*|" ]
    global_filter = [ "a|^@DEV$|", "r|.*|" ]
    obtain_device_list_from_udev = 0
    external_device_info_source = "none"
    use_devicesfile = 0
    hints = "none"
}
global {
    activation = 0
    locking_dir = "@CONF/lock"
    event_activation = 0
    use_lvmpolld = 0
    system_id_source = "none"
    notify_dbus = 0
}
activation {
    udev_sync = 0
    udev_rules = 0
    monitoring = 0
}
backup {
    backup = 0
    archive = 0
}
"""


@contextlib.contextmanager
def lvm_env(dev: str) -> Iterator[dict[str, str]]:
    """The environment for the host's lvm2 tools to see ``dev`` only, activate nothing (there is
    no device-mapper here), and leave the host's LVM state (backups, archives, locks) alone."""
    with tempfile.TemporaryDirectory(prefix="imaging-lvm-") as conf:
        Path(conf, "lvm.conf").write_text(_LVM_CONF.replace("@DEV", dev).replace("@CONF", conf))
        yield {"LVM_SYSTEM_DIR": conf, "LVM_SUPPRESS_FD_WARNINGS": "1"}


def lv_offsets(dev: str, env: dict[str, str]) -> dict[str, int]:
    """Each linear LV's byte offset in the PV on ``dev``: pe_start plus its first extent."""
    opts = ["--noheadings", "--nosuffix", "--units", "b"]
    pe_start = int(tools.check_output(["pvs", *opts, "-o", "pe_start", dev], env=env))
    extent = int(tools.check_output(["vgs", *opts, "-o", "vg_extent_size", "debian-vg"], env=env))
    out = tools.check_output(
        ["lvs", *opts, "--segments", "-o", "lv_name,seg_pe_ranges", "debian-vg"], env=env
    )
    offsets = {}
    for line in out.splitlines():
        if line.strip():
            lv, ranges = line.split()
            offsets[lv] = pe_start + int(ranges.rsplit(":", 1)[1].split("-")[0]) * extent
    return offsets
