"""The built-in sample instances: which there are, building each once (cached, keyed by what it
is made of), and ``sample:NAME`` sources resolved to their image."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from imaging import config, tools
from imaging.errors import ParameterError
from imaging.samples import kvm, packages, xen
from imaging.sparse import atomic_path

MARKER = kvm.MARKER
SAMPLES = ("kvm", "xen")
_BUILDER_VERSION = "1"


def _key(name: str) -> str:
    """What a sample is made of: any change to its builder or its packages makes a new one."""

    parts = [
        _BUILDER_VERSION,
        name,
        packages.generic_kernel_package(),
        kvm.INITRD_INIT,
        kvm.ROOT_INIT,
        " ".join(kvm.ROOT_MODULES),
    ]
    if name == "xen":
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
            xen.stage_xen_root(root, name)
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


def resolve(source: str) -> Path:
    """``sample:<name>`` -> the sample's image; anything else is a path."""
    if source.startswith("sample:"):
        return ensure_sample(source.removeprefix("sample:"))
    return Path(source)


def marker_for(source: str) -> str:
    return kvm.MARKER if source.startswith("sample:") else ""
