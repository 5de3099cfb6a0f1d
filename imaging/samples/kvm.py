"""Built-in sample instances: small root filesystem images like the ones clouds keep.

``sample:kvm`` is a partitionless ext3 root filesystem, as Eucalyptus, AWS or OpenStack store an
instance's root disk, holding busybox, the generic Debian kernel, only the modules it needs, and
an initrd that already carries the IDE/SATA and virtio drivers (a KVM-style instance needs no Xen
migration). Its init prints a marker on the serial console and powers off, so a boot check can
tell "booted all the way into this root filesystem" from anything less.

Everything is made from Debian packages without mounting: the tree is staged in a directory,
the initrd is a cpio archive, and ``mke2fs -d`` writes the filesystem.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from imaging import config, tools
from imaging.errors import ParameterError
from imaging.samples import packages as debian
from imaging.sparse import atomic_path

MARKER = "IMAGING-SAMPLE-OK"
_BUILDER_VERSION = "1"
_EPOCH = 1_700_000_000  # fixed mtimes: the same packages give the same sample

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

SAMPLES = ("kvm", "xen")

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


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)


def _install_busybox(root: Path, busybox: Path) -> None:
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    for applet in _APPLETS:
        (root / "bin" / applet).symlink_to("busybox")


def _install_modules(root: Path, kernel: debian.KernelTree, names: list[str]) -> None:
    dest = root / "lib" / "modules" / kernel.version
    for module in kernel.module_closure(names):
        target = dest / module.relative_to(kernel.modules)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module, target)
    for index in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        shutil.copy2(kernel.modules / index, dest / index)
    tools.run(["depmod", "-b", root, kernel.version], timeout=300)


def _fix_times(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.utime(os.path.join(dirpath, name), (_EPOCH, _EPOCH), follow_symlinks=False)
    os.utime(root, (_EPOCH, _EPOCH))


def make_initrd(dest: Path, kernel: debian.KernelTree, busybox: Path, modules: list[str]) -> None:
    """A gzip'd newc cpio initrd with busybox, the modules and an init that mounts root=."""
    with tempfile.TemporaryDirectory(prefix="initrd-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        _install_busybox(root, busybox)
        _install_modules(root, kernel, modules)
        _write(root / "init", INITRD_INIT, 0o755)
        _write(root / "etc" / "modules", "\n".join(modules) + "\n")
        _fix_times(root)
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
    kernel = debian.kernel_tree()
    bb = debian.busybox()
    _install_busybox(root, bb)
    for d in ("sbin", "dev", "proc", "sys", "run", "tmp", "root", "var/log", "mnt", "home", "boot"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    _install_modules(root, kernel, ROOT_MODULES)
    shutil.copy2(kernel.vmlinuz, root / "boot" / f"vmlinuz-{kernel.version}")
    shutil.copy2(
        kernel.root / "boot" / f"config-{kernel.version}", root / "boot" / f"config-{kernel.version}"
    )
    make_initrd(root / "boot" / f"initrd.img-{kernel.version}", kernel, bb, INITRD_MODULES)
    _write(root / "sbin" / "init", ROOT_INIT.replace("__MARKER__", MARKER), 0o755)
    _write(root / "etc" / "hostname", f"imaging-sample-{name}\n")
    _write(root / "etc" / "fstab", f"UUID={sample_uuid(name)}\t/\text3\tdefaults,errors=remount-ro\t0 1\n")
    _write(
        root / "etc" / "os-release",
        'NAME="imaging sample"\nID=imaging-sample\nPRETTY_NAME="imaging sample (busybox)"\n',
    )
    _write(root / "etc" / "passwd", "root:x:0:0:root:/root:/bin/sh\n")
    _write(root / "etc" / "group", "root:x:0:\n")
    _write(root / "var" / "log" / "messages", "sample log line\n")


def _key(name: str) -> str:
    """What a sample is made of: any change to its builder or its packages makes a new one."""
    from imaging.samples import xen as sample_xen

    parts = [
        _BUILDER_VERSION,
        name,
        debian.generic_kernel_package(),
        INITRD_INIT,
        ROOT_INIT,
        " ".join(ROOT_MODULES),
    ]
    if name == "xen":
        parts += [sample_xen.MKINITRD, sample_xen.CHECKS, sample_xen.YUM, sample_xen.RC_LOCAL, sample_xen.INITTAB,
                  sample_xen.SUDOERS, sample_xen.SSHD_CONFIG, " ".join(sample_xen.MODULES)]  # fmt: skip
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def ensure_sample(name: str = "kvm", size_mib: int = 512) -> Path:
    """Path of the sample instance image ``name``, building it (once, cached) if needed."""
    if name not in SAMPLES:
        raise ParameterError(f"unknown sample {name!r} (known: {', '.join(SAMPLES)})")
    out_dir = config.cache_dir() / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / f"{name}-{_key(name)}.img"
    if dest.exists():
        return dest
    tools.require_tools(
        "mke2fs",
        "cpio",
        "depmod",
        "dpkg-deb",
        reason="build the sample instance",
        hint="apt install e2fsprogs cpio kmod dpkg",
    )
    with tempfile.TemporaryDirectory(prefix=f"sample-{name}-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        if name == "xen":
            from imaging.samples.xen import stage_xen_root

            stage_xen_root(root, name)
        else:
            stage_kvm_root(root, name)
        _fix_times(root)
        with atomic_path(dest) as part:
            tools.run(
                ["mke2fs", "-q", "-F", "-t", "ext3", "-b", "4096", "-I", "256",
                 "-L", f"sample-{name}", "-U", sample_uuid(name),
                 "-E", f"root_owner=0:0,hash_seed={sample_uuid(name)}",
                 "-d", root, part, f"{size_mib}M"],
                env={"E2FSPROGS_FAKE_TIME": str(_EPOCH)},
                timeout=600,
            )  # fmt: skip
            part.chmod(0o444)  # a source: the pipeline must never write to it
    return dest


def resolve(source: str) -> Path:
    """``sample:<name>`` -> the sample's image; anything else is a path."""
    if source.startswith("sample:"):
        return ensure_sample(source.removeprefix("sample:"))
    return Path(source)


def marker_for(source: str) -> str:
    return MARKER if source.startswith("sample:") else ""
