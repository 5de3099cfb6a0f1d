"""The guest's kernel for the target, and its initrd rebuilt with the target's drivers.

A Xen instance's initrd holds the Xen block and network frontends only, so on any other machine
the kernel never finds its root. The initrd is rebuilt by the guest's own tool (mkinitrd,
update-initramfs), run inside the guest (see sandbox.py), for a kernel that is not a Xen-only one.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import re
import time
from dataclasses import dataclass

from imaging.disk.bootloader import INITRD_PATTERNS, version_key
from imaging.disk.debugfs import safe_name
from imaging.errors import GuestError, ParameterError
from imaging.guest import sandbox
from imaging.guest.files import Guest
from imaging.guest.profiles import Profile
from imaging.records import Record

_VMLINUZ = re.compile(r"^(vmlinuz|vmlinux|kernel)-(.+)$")


@dataclass(frozen=True)
class GuestKernel:
    version: str
    vmlinuz: str
    xen: bool
    modules: bool  # /lib/modules/<version> exists


def kernels(guest: Guest) -> list[GuestKernel]:
    found = []
    for name in guest.listdir("/boot"):
        m = _VMLINUZ.match(name)
        if m and safe_name(name) and not name.endswith((".sig", ".hmac")):
            version = m.group(2)
            found.append(
                GuestKernel(
                    version,
                    f"/boot/{name}",
                    "xen" in version.lower(),
                    guest.exists(f"/lib/modules/{version}"),
                )
            )
    return found


def choose_kernel(guest: Guest, wanted: str = "") -> GuestKernel:
    """The kernel to boot on the target: the one asked for, or the newest that is not Xen-only
    and has its modules; a clear error when only Xen kernels are there."""
    found = kernels(guest)
    if wanted:
        for k in found:
            if k.version == wanted:
                return k
        raise ParameterError(
            f"the guest has no kernel {wanted!r} in /boot (has: {', '.join(k.version for k in found) or 'none'})"
        )
    usable = sorted(
        (k for k in found if not k.xen and k.modules), key=lambda k: version_key(k.version), reverse=True
    )
    if usable:
        return usable[0]
    if found:
        names = ", ".join(k.vmlinuz for k in found)
        raise GuestError(
            f"only Xen kernels (or kernels without modules) in the guest's /boot ({names}): a Xen-only kernel does not "
            "boot on KVM or VirtualBox; install a non-Xen kernel (packages_install: [kernel])"
        )
    raise GuestError("no kernel in the guest's /boot (looked for vmlinuz-<version>)")


def module_available(guest: Guest, version: str, module: str) -> bool:
    """A module of the kernel, as a file or built in."""
    base = f"/lib/modules/{version}"
    names = {module, module.replace("_", "-"), module.replace("-", "_")}
    for index in ("modules.dep", "modules.builtin"):
        text = guest.read_text(f"{base}/{index}") or ""
        for line in text.splitlines():
            path = line.split(":", 1)[0]
            stem = path.rsplit("/", 1)[-1].split(".ko")[0]
            if stem in names:
                return True
    return False


def list_initrd(data: bytes) -> list[str]:
    """The file names in a newc cpio initrd (plain, gzip or xz), to show what it carries."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    elif data[:6] == b"\xfd7zXZ\x00":
        data = lzma.decompress(data)
    names, pos = [], 0
    while pos + 110 <= len(data) and data[pos : pos + 6] in (b"070701", b"070702"):
        namesize = int(data[pos + 94 : pos + 102], 16)
        filesize = int(data[pos + 54 : pos + 62], 16)
        name = data[pos + 110 : pos + 110 + namesize - 1].decode(errors="replace")
        if name == "TRAILER!!!":
            break
        names.append(name)
        pos = (pos + 110 + namesize + 3) & ~3
        pos = (pos + filesize + 3) & ~3
    return names


def initrd_modules(names: list[str]) -> list[str]:
    return sorted({n.rsplit("/", 1)[-1].split(".ko")[0] for n in names if ".ko" in n})


@dataclass(frozen=True)
class Initrd(Record):
    kernel: str
    image: str
    rebuilt: bool
    tool: str
    sandbox: str
    bytes: int
    sha256: str
    modules: str  # the driver modules it carries, comma-separated


def rebuild(
    guest: Guest, profile: Profile, kernel: GuestKernel, modules: list[str], storage: list[str]
) -> Initrd:
    """Rebuild the kernel's initrd with ``modules`` using the guest's own tool, in the sandbox.

    A profile without a tool (a KVM-style guest) keeps its initrd: it then only has to reach
    the disk, through one of the ``storage`` drivers built in or carried."""
    tool = profile.initrd
    if tool is None:
        return _check_only(guest, kernel, storage)
    missing = [m for m in modules if not module_available(guest, kernel.version, m)]
    if missing:
        raise GuestError(f"kernel {kernel.version} in the guest has no module {', '.join(missing)}")
    if not guest.exists(tool.tool):
        raise GuestError(f"the guest has no {tool.tool} to rebuild its initrd (profile {profile.name})")
    image = tool.image.format(version=kernel.version)
    if tool.modules_file:
        old = guest.read_text(tool.modules_file) or ""
        wanted = [m for m in modules if m not in old.split()]
        if wanted:
            guest.write_text(
                tool.modules_file,
                old + ("" if not old or old.endswith("\n") else "\n") + "\n".join(wanted) + "\n",
            )
    argv: list[str] = []
    for item in tool.argv:
        if "{module}" in item:
            argv += [item.format(module=m) for m in modules]
        else:
            argv.append(item.format(version=kernel.version, image=image))
    before = time.time()
    sandbox.run(guest.root, argv)
    st = guest.lstat(image)
    if st is None or st.st_size == 0 or st.st_mtime < before - 2:
        raise GuestError(f"{tool.tool} ran but did not write {image}")
    return _describe(guest, kernel, image, True, " ".join(argv))


def _describe(guest: Guest, kernel: GuestKernel, image: str, rebuilt: bool, tool: str) -> Initrd:
    data = guest.read_bytes(image, limit=512 << 20) or b""
    carried = initrd_modules(list_initrd(data))
    return Initrd(kernel.version, image, rebuilt, tool, sandbox.describe() if rebuilt else "", len(data),
                  hashlib.sha256(data).hexdigest(), ", ".join(carried))  # fmt: skip


def _check_only(guest: Guest, kernel: GuestKernel, storage: list[str]) -> Initrd:
    names = set(guest.listdir("/boot"))
    image = next(
        (
            f"/boot/{p.format(v=kernel.version)}"
            for p in INITRD_PATTERNS
            if p.format(v=kernel.version) in names
        ),
        None,
    )
    builtin = (guest.read_text(f"/lib/modules/{kernel.version}/modules.builtin") or "").split()
    builtin_names = {b.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_") for b in builtin}
    wanted = {m.replace("-", "_") for m in storage}
    if image is None:
        # A kernel with its disk driver built in needs no initrd to find its root.
        if builtin_names & wanted:
            return Initrd(kernel.version, "", False, "(none: the storage driver is built into the kernel)",
                          "", 0, "", "")  # fmt: skip
        raise GuestError(
            f"kernel {kernel.version} has no initrd nor any of {', '.join(storage)} built in, "
            "and this profile cannot make an initrd"
        )
    described = _describe(guest, kernel, image, False, "(not rebuilt: the profile has no initrd tool)")
    carried = set(described.modules.split(", "))
    # An initrd we cannot list (zstd, say) gets the benefit of the doubt; the boot test decides.
    if described.modules and not (carried | builtin_names) & wanted:
        raise GuestError(
            f"the initrd {image} holds none of {', '.join(storage)}, and this profile cannot rebuild it"
        )
    return described


def check_package(name: str) -> str:
    """A package name that the guest's package manager takes as one plain argument."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9+._:@-]{0,99}", name):
        raise ParameterError(f"not a package name: {name!r}")
    return name


def run_packages(guest: Guest, profile: Profile, install: list[str], remove: list[str]) -> list[str]:
    """Remove, then install packages with the guest's package manager (before anything else
    changes, as the original did: removing after installing takes dependencies with it)."""
    done = []
    for names, verb in ((remove, "remove"), (install, "install")):
        if not names:
            continue
        if profile.packages is None:
            raise ParameterError(f"profile {profile.name} has no package manager for {verb}")
        for name in names:
            check_package(name)
        prefix = profile.packages.remove if verb == "remove" else profile.packages.install
        # Installing needs the network (the guest's own repositories); removing does not.
        sandbox.run(guest.root, [*prefix, *names], network=verb == "install")
        done.append(f"{verb} {' '.join(names)}")
    return done
