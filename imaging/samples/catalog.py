"""The built-in sample instances: which there are, building each once (cached, keyed by what it
is made of), and ``sample:NAME`` sources resolved to their image."""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import tempfile
from pathlib import Path

from imaging import config, tools
from imaging.errors import ParameterError
from imaging.samples import amazon, debian, kvm, layouts, packages, rhel, suse, ubuntu, xen
from imaging.sparse import atomic_path

MARKER = kvm.MARKER
# kvm and xen are busybox guests (seconds to build and boot); xen-nogrub is the Xen one without
# /boot/grub, as clouds that boot their own kernel leave it; debian12 and debian13 are real
# Debian cloud instances (about a minute each to build, from Debian's mirror); debian12-xfs,
# -btrfs and -lvm are debian12 on the partitioned disks of RHEL's, Fedora's and the LVM
# installers' layouts (layouts.py); rocky9-like is Debian 12's userland with Rocky Linux 9's
# layout, files and tools (rhel.py: dracut, NetworkManager, /boot/grub2, BLS, XFS on GPT);
# ubuntu24-like is Debian 13's with Ubuntu 24.04's cloud image's (ubuntu.py: netplan for
# networkd, Ubuntu's /boot links, a separate /boot and an ESP on GPT); opensuse-like is Debian
# 12's with openSUSE Leap 16's (suse.py: btrfs subvolumes with the system in snapper's first
# snapshot, dracut at SUSE's names, NetworkManager, /boot/grub2, ESP on GPT); amazon2023-like
# is Debian 12's with Amazon Linux 2023's (amazon.py: systemd-networkd configured for EC2's NICs
# only, the AMIs' GPT with an ESP, one kernel).
# The other families' samples: the module that builds each, then the modules all of it is code
# and text in (packages, files, checks, the disk), besides debian and layouts.
FAMILIES = {rhel.NAME: (rhel, rhel), ubuntu.NAME: (ubuntu, ubuntu), suse.NAME: (suse, rhel, suse),
            amazon.NAME: (amazon, rhel, amazon)}  # fmt: skip
SAMPLES = ("kvm", "xen", "xen-nogrub", "debian12", "debian13", *layouts.LAYOUTS, *FAMILIES)
_BUILDER_VERSION = "1"


def _key(name: str) -> str:
    """What a sample is made of: any change to its builder or its packages makes a new one."""

    if name in FAMILIES:
        modules = (debian, layouts, *FAMILIES[name][1:])
        parts = [_BUILDER_VERSION, name, debian.MIRROR, debian.CHECK, debian.CHECK_UNIT,
                 *(inspect.getsource(m) for m in modules)]  # fmt: skip
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]
    if name in debian.RELEASES or name in layouts.LAYOUTS:
        parts = [_BUILDER_VERSION, name, debian.MIRROR, " ".join(debian.PACKAGES), debian.CHECK, debian.CHECK_UNIT,
                 debian.INSTANCE_ID, debian.INJECTED_KEY, debian.DATA]  # fmt: skip
        if name in layouts.LAYOUTS:
            # The layout's packages, fstab and checks, and all the code that stages and lays it out.
            layout = layouts.LAYOUTS[name]
            parts += [layout.release, " ".join(layout.packages), layout.fstab, layout.checks,
                      inspect.getsource(debian), inspect.getsource(layouts)]  # fmt: skip
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]
    parts = [
        _BUILDER_VERSION,
        name,
        packages.generic_kernel_package(),
        kvm.INITRD_INIT,
        kvm.ROOT_INIT,
        " ".join(kvm.ROOT_MODULES),
    ]
    if name.startswith("xen"):
        parts += [xen.MKINITRD, xen.CHECKS, xen.YUM, xen.RC_LOCAL, xen.INITTAB,
                  xen.SUDOERS, xen.SSHD_CONFIG, " ".join(xen.MODULES)]  # fmt: skip
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
    # Two runs (or test workers) asking for a sample not built yet: one builds, the other waits
    # for it rather than building it again (a Debian sample is a minute of mmdebstrap).
    with open(out_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.exists():
            return dest
        return _build(name, dest, size_mib)


def _build(name: str, dest: Path, size_mib: int) -> Path:
    if name in debian.RELEASES:
        return _build_debian(name, dest)
    if name in layouts.LAYOUTS:
        return layouts.build(name, dest)
    if name in FAMILIES:
        return FAMILIES[name][0].build(dest)
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
        if name.startswith("xen"):
            xen.stage_xen_root(root, name, grub_dir=name != "xen-nogrub")
        else:
            kvm.stage_kvm_root(root, name)
        kvm.fix_times(root)
        with atomic_path(dest) as part:
            tools.run(
                ["mke2fs", "-q", "-F", "-t", "ext3", "-b", "4096", "-I", "256",
                 "-L", f"sample-{name}", "-U", kvm.sample_uuid(name),
                 "-E", f"root_owner=0:0,hash_seed={kvm.sample_uuid(name)}",
                 "-d", root, part, f"{size_mib}M"],
                env={"E2FSPROGS_FAKE_TIME": str(kvm.EPOCH)},
                timeout=600,
            )  # fmt: skip
            part.chmod(0o444)  # a source: the pipeline must never write to it
    return dest


def _build_debian(name: str, dest: Path) -> Path:
    # In the cache directory, not /tmp: the tree is half a gigabyte, /tmp may be a small tmpfs.
    with tempfile.TemporaryDirectory(prefix=f"sample-{name}-", dir=dest.parent) as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        debian.stage_debian_root(root, name)
        with atomic_path(dest) as part:
            debian.make_filesystem(root, part, f"sample-{name}", kvm.sample_uuid(name))
            part.chmod(0o444)
    return dest


def resolve(source: str) -> Path:
    """``sample:<name>`` -> the sample's image; anything else is a path."""
    if source.startswith("sample:"):
        return ensure_sample(source.removeprefix("sample:"))
    return Path(source)


def profile_for(source: str) -> str:
    """The profile a built-in sample is known to need: the KVM one is no distro, only busybox."""
    return "generic" if source == "sample:kvm" else "auto"


def marker_for(source: str) -> str:
    return kvm.MARKER if source.startswith("sample:") else ""
