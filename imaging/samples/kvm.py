"""``sample:kvm``, the base of the built-in samples: a small root filesystem image like the ones
clouds keep.

It is a partitionless ext3 root filesystem, as Eucalyptus, AWS or OpenStack store an
instance's root disk, holding busybox, the generic Debian kernel, only the modules it needs, and
an initrd that already carries the IDE/SATA and virtio drivers (a KVM-style instance needs no Xen
migration). Its init prints a marker on the serial console and powers off, so a boot check can
tell "booted all the way into this root filesystem" from anything less.

Everything is made from Debian packages without mounting: the tree is staged in a directory,
the initrd is a cpio archive, and ``mke2fs -d`` writes the filesystem.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from imaging import tools
from imaging.samples import packages

MARKER = "IMAGING-SAMPLE-OK"
EPOCH = 1_700_000_000  # fixed mtimes: the same packages give the same sample

# Storage drivers the initrd loads (IDE/SATA for VirtualBox, virtio for KVM/OpenStack), and the
# ext4 driver that mounts ext2/3/4 (a module in the generic kernel; it needs crc32c at mount).
INITRD_MODULES = [
    "ata_piix",
    "ahci",
    "sd_mod",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "crc32c_generic",
    "ext4",
]
# Also in the root filesystem: the NIC drivers of the targets.
ROOT_MODULES = [*INITRD_MODULES, "e1000", "virtio_net"]
_APPLETS = (
    "sh ash cat echo ls mkdir mount umount sleep poweroff reboot uname grep sed awk tr cut "
    "findfs switch_root modprobe insmod sync head tail wc ip hostname"
).split()

INITRD_INIT = r"""#!/bin/sh
# initrd of the imaging sample: load the storage drivers, find root=, switch to it.
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules); do modprobe "$m" 2>/dev/null; done
root=
for arg in $(cat /proc/cmdline); do
  case "$arg" in root=*) root="${arg#root=}" ;; esac
done
echo "initrd: looking for root $root"
i=0
while :; do
  case "$root" in
    UUID=*|LABEL=*) dev=$(findfs "$root" 2>/dev/null) ;;
    *) dev="$root"; [ -b "$dev" ] || dev= ;;
  esac
  [ -n "$dev" ] && break
  i=$((i + 1))
  if [ "$i" -gt 100 ]; then
    echo "initrd: root $root not found; block devices: $(ls /sys/class/block | tr '\n' ' ')"
    poweroff -f
  fi
  sleep 0.1
done
echo "initrd: root $root is $dev"
if ! mount -o ro "$dev" /newroot; then
  echo "initrd: cannot mount $dev"
  poweroff -f
fi
umount /sys /proc
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/init
"""

ROOT_INIT = r"""#!/bin/sh
# init of the imaging sample: report what booted, then power off.
export PATH=/bin:/sbin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
root=$(awk '$2 == "/" && $1 != "rootfs" { print $1 }' /proc/mounts | tail -n 1)
echo "imaging-sample: kernel $(uname -r), root $root, $(tr ' ' '\n' < /proc/cmdline | grep '^root=')"
echo "__MARKER__ $(cat /etc/hostname)"
sync
poweroff -f
"""


def sample_uuid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"imaging-sample:{name}"))


def write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)


def install_busybox(root: Path, busybox: Path) -> None:
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    for applet in _APPLETS:
        (root / "bin" / applet).symlink_to("busybox")


def install_modules(root: Path, kernel: packages.KernelTree, names: list[str]) -> None:
    dest = root / "lib" / "modules" / kernel.version
    for module in kernel.module_closure(names):
        target = dest / module.relative_to(kernel.modules)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module, target)
    for index in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        shutil.copy2(kernel.modules / index, dest / index)
    tools.run(["depmod", "-b", root, kernel.version], timeout=300)


def fix_times(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.utime(os.path.join(dirpath, name), (EPOCH, EPOCH), follow_symlinks=False)
    os.utime(root, (EPOCH, EPOCH))


def make_initrd(dest: Path, kernel: packages.KernelTree, busybox: Path, modules: list[str]) -> None:
    """A gzip'd newc cpio initrd with busybox, the modules and an init that mounts root=."""
    with tempfile.TemporaryDirectory(prefix="initrd-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        install_busybox(root, busybox)
        install_modules(root, kernel, modules)
        write(root / "init", INITRD_INIT, 0o755)
        write(root / "etc" / "modules", "\n".join(modules) + "\n")
        fix_times(root)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        archive = Path(tmp) / "initrd.cpio"
        tools.run(
            ["cpio", "--create", "--format=newc", "--reproducible", "--quiet", f"--file={archive}"],
            input="\n".join(names) + "\n",
            cwd=root,
            timeout=300,
        )
        with open(archive, "rb") as src, open(dest, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as out:
                shutil.copyfileobj(src, out)


def stage_kvm_root(root: Path, name: str) -> None:
    kernel = packages.kernel_tree()
    bb = packages.busybox()
    install_busybox(root, bb)
    for d in ("sbin", "dev", "proc", "sys", "run", "tmp", "root", "var/log", "mnt", "home", "boot"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    install_modules(root, kernel, ROOT_MODULES)
    shutil.copy2(kernel.vmlinuz, root / "boot" / f"vmlinuz-{kernel.version}")
    shutil.copy2(
        kernel.root / "boot" / f"config-{kernel.version}", root / "boot" / f"config-{kernel.version}"
    )
    make_initrd(root / "boot" / f"initrd.img-{kernel.version}", kernel, bb, INITRD_MODULES)
    write(root / "sbin" / "init", ROOT_INIT.replace("__MARKER__", MARKER), 0o755)
    write(root / "etc" / "hostname", f"imaging-sample-{name}\n")
    write(root / "etc" / "fstab", f"UUID={sample_uuid(name)}\t/\text3\tdefaults,errors=remount-ro\t0 1\n")
    write(
        root / "etc" / "os-release",
        'NAME="imaging sample"\nID=imaging-sample\nPRETTY_NAME="imaging sample (busybox)"\n',
    )
    write(root / "etc" / "passwd", "root:x:0:0:root:/root:/bin/sh\n")
    write(root / "etc" / "group", "root:x:0:\n")
    write(root / "var" / "log" / "messages", "sample log line\n")
