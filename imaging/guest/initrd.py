"""The guest's kernel for the target, and its initrd rebuilt with the target's drivers.

A Xen instance's initrd holds the Xen block and network frontends only, so on any other machine
the kernel never finds its root. The initrd is rebuilt by the guest's own tool (mkinitrd,
update-initramfs), run inside the guest (see sandbox.py), for a kernel that is not a Xen-only one.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import zstandard

from imaging.disk.bootloader import INITRD_PATTERNS, version_key
from imaging.disk.debugfs import safe_name
from imaging.disk.files import Guest
from imaging.errors import CommandError, GuestError, ParameterError
from imaging.guest import sandbox
from imaging.guest.profiles import Profile
from imaging.records import Record, human_bytes

if TYPE_CHECKING:
    from imaging.config import Target

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
        m = _VMLINUZ.fullmatch(name)
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


def choose_kernel(guest: Guest, wanted: str = "", drivers: list[str] | None = None) -> GuestKernel:
    """The kernel to boot on the target: the one asked for, or the newest that is not Xen-only
    and has its modules, among them first those that have every one of ``drivers`` (a cloud
    kernel beside the generic one: the generic one has AHCI and e1000); a clear error when
    only Xen kernels are there."""
    found = kernels(guest)
    if wanted:
        for k in found:
            if k.version == wanted:
                return k
        raise ParameterError(
            f"the guest has no kernel {wanted!r} in /boot (has: {', '.join(k.version for k in found) or 'none'})"
        )

    def fits(k: GuestKernel) -> bool:
        return all(module_available(guest, k.version, m) for m in drivers or [])

    usable = sorted(
        (k for k in found if not k.xen and k.modules),
        key=lambda k: (fits(k), version_key(k.version)),
        reverse=True,
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


# The compressions initramfs tools use, by their magic bytes.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2"}
_CPIO = (b"070701", b"070702")
# What listing an initrd may decompress: real ones are a few hundred MiB at most; a few MB of
# compressed zeros would otherwise become tens of GB in this process.
LIST_CAP = 1 << 30
_CHUNK = 1 << 20


class _Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Capped(io.RawIOBase):
    """A decompressing reader that refuses to produce more than ``cap`` bytes."""

    def __init__(self, inner: _Reader, cap: int, what: str) -> None:
        self.inner, self.left, self.cap, self.what = inner, cap, cap, what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.inner.read(min(len(buffer), self.left + 1))
        if len(data) > self.left:
            raise GuestError(f"{self.what} decompresses to more than {self.cap >> 20} MiB: refused")
        self.left -= len(data)
        buffer[: len(data)] = data
        return len(data)


def _decompressing(kind: str, data: Any) -> _Reader:  # any binary file object
    if kind == "gzip":
        return gzip.GzipFile(fileobj=data)
    if kind == "xz":
        return lzma.LZMAFile(data)
    if kind == "bzip2":
        return bz2.BZ2File(data)
    reader: _Reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
    return reader


def _read(stream: _Reader, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = stream.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def _skip(stream: _Reader, n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, _CHUNK))
        if not chunk:
            return
        n -= len(chunk)


def _cpio_names(stream: _Reader, names: list[str]) -> bytes:
    """Append the names of one newc archive; return what follows its trailer (a few bytes, to
    recognise the next segment), or b"" at the end."""
    while True:
        header = _read(stream, 110)
        if len(header) < 110 or header[:6] not in _CPIO:
            return b""
        try:
            namesize = int(header[94:102], 16)
            filesize = int(header[54:62], 16)
        except ValueError:
            return b""
        if namesize > 4096:  # PATH_MAX: a longer name is no real archive's
            return b""
        name = _read(stream, namesize)[:-1].decode(errors="replace")
        _skip(stream, (-(110 + namesize)) % 4)
        if name == "TRAILER!!!":
            # Archives are padded with zeros to a block; the next segment starts after them.
            while (word := _read(stream, 4)) == b"\0\0\0\0":
                pass
            return word
        names.append(name)
        _skip(stream, filesize + (-filesize) % 4)


def list_initrd(data: bytes | BinaryIO, cap: int = LIST_CAP) -> list[str]:
    """The file names in an initrd (its bytes, or a file to stream): newc cpio archives one after
    another (an uncompressed one first for early microcode, as Debian's are), plain or
    compressed with gzip, xz, zstd or bzip2, read as streams with a cap on the bytes
    decompressed."""
    names: list[str] = []
    stream: _Reader = io.BytesIO(data) if isinstance(data, bytes) else data
    head = _read(stream, 6)
    while head:
        kind = next((k for magic, k in _COMPRESSED.items() if head.startswith(magic)), None)
        rest = io.BufferedReader(_RestOf(head, stream))  # the bytes already read, then the rest
        if kind:
            stream = io.BufferedReader(_Capped(_decompressing(kind, rest), cap, "the initrd"), _CHUNK)
        elif head[:6] in _CPIO:
            stream = io.BufferedReader(_Capped(rest, cap, "the initrd"), _CHUNK)
        else:
            break
        try:
            head = _cpio_names(stream, names)
            if head and len(head) < 6:
                head += _read(stream, 6 - len(head))
        # A damaged stream (found by the fuzzed-images campaign): each library says so its own
        # way, gzip's and bz2's as an OSError, a cut one as EOFError.
        except (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError) as e:
            raise GuestError(
                f"the initrd is corrupt: its {kind or 'cpio'} data cannot be read ({e}): refused"
            ) from None
    return names


class _RestOf(io.RawIOBase):
    def __init__(self, head: bytes, stream: _Reader) -> None:
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


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
    # Where each of the target's drivers is: in the initrd, built into the kernel, or a module of
    # the kernel that the initrd does not carry (loaded from the root filesystem, if at all).
    drivers: dict[str, str] = field(default_factory=dict)


# Where a driver is, as the 20-migrate record says it.
IN_INITRD = "initrd"
BUILT_IN = "built into the kernel"
ON_ROOT = "kernel module, not in the initrd"
MISSING = "missing"
UNLISTED = "unknown: the initrd could not be listed"


def _norm(module: str) -> str:
    return module.replace("-", "_")


def builtin_modules(guest: Guest, version: str) -> set[str]:
    text = guest.read_text(f"/lib/modules/{version}/modules.builtin") or ""
    return {_norm(line.rsplit("/", 1)[-1].split(".ko")[0]) for line in text.split()}


def driver_places(
    guest: Guest, kernel: GuestKernel, target: Target, carried: list[str], listed: bool = True
) -> dict[str, str]:
    """Where each driver the target names is, for the record (and the check that follows).
    ``listed``: whether the initrd's files could be listed at all."""
    inside, builtin = {_norm(m) for m in carried}, builtin_modules(guest, kernel.version)
    places = {}
    for module in dict.fromkeys([*target.initrd_required, *target.initrd_modules, target.nic_module]):
        if _norm(module) in inside:
            places[module] = IN_INITRD
        elif _norm(module) in builtin:
            places[module] = BUILT_IN
        elif not listed:
            places[module] = UNLISTED
        else:
            places[module] = ON_ROOT if module_available(guest, kernel.version, module) else MISSING
    return places


def check_required(image: str, target: Target, described: Initrd) -> None:
    """The drivers the target needs in the initrd (its disk and NIC where QEMU cannot show them:
    NVMe and ENA, the Hyper-V drivers, gVNIC) must be in its listing, or built into the kernel."""
    missing = [m for m in target.initrd_required if described.drivers.get(m) not in (IN_INITRD, BUILT_IN)]
    if not missing:
        return
    needs = f"which target {target.name} needs in it ({target.disk_controller} disk, {target.nic} NIC)"
    if not image:
        raise GuestError(f"kernel {described.kernel} has no initrd to carry {', '.join(missing)}, {needs}")
    if any(described.drivers.get(m) == UNLISTED for m in missing):
        raise GuestError(
            f"the initrd {image} could not be listed to check that it carries {', '.join(missing)}, {needs}"
        )
    raise GuestError(
        f"the initrd {image} does not carry {', '.join(missing)}, {needs}; the kernel "
        f"{described.kernel} has {'them' if len(missing) > 1 else 'it'} only as a module on the root filesystem"
    )


def check_drivers(guest: Guest, profile: Profile, kernel: GuestKernel, target: Target) -> None:
    """The kernel must drive the target's disk and NIC: else one line naming the package that does."""
    wanted = [*target.initrd_modules, target.nic_module]
    missing = [m for m in dict.fromkeys(wanted) if not module_available(guest, kernel.version, m)]
    if missing:
        fix = (f"install a kernel that has them: --install {profile.kernel_package}" if profile.kernel_package
               else "install a kernel that has them (--install PACKAGE)")  # fmt: skip
        raise GuestError(
            f"kernel {kernel.version} in the guest has no module {', '.join(missing)}, which target "
            f"{target.name} needs ({target.disk_controller} disk, {target.nic} NIC): {fix}"
        )


def rebuild(guest: Guest, profile: Profile, kernel: GuestKernel, target: Target) -> Initrd:
    """Rebuild the kernel's initrd with the target's modules using the guest's own tool, in the
    sandbox.

    A profile without a tool (a KVM-style guest) keeps its initrd: it then only has to reach
    the disk, through one of the target's storage drivers built in or carried."""
    tool = profile.initrd
    if tool is None:
        described = _check_only(guest, kernel, target)
        check_required(described.image, target, described)
        return described
    modules = target.initrd_modules
    check_drivers(guest, profile, kernel, target)
    path = next((p for p in (tool.tool, *tool.alternatives) if guest.exists(p)), None)
    if path is None:
        also = f" (nor {', '.join(tool.alternatives)})" if tool.alternatives else ""
        raise GuestError(
            f"the guest has no {tool.tool}{also} to rebuild its initrd (profile {profile.name})"
        )
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
            argv.append(
                item.format(version=kernel.version, image=image, tool=path, modules=" ".join(modules))
            )
    before = time.time()
    sandbox.run(guest.root, argv)
    st = guest.lstat(image)
    if st is None or st.st_size == 0 or st.st_mtime < before - 2:
        raise GuestError(f"{path} ran but did not write {image}")
    described = _describe(guest, kernel, image, True, " ".join(argv), target)
    check_required(image, target, described)
    return described


def _describe(
    guest: Guest, kernel: GuestKernel, image: str, rebuilt: bool, tool: str, target: Target
) -> Initrd:
    # Streamed from the file, hashed then listed: an initrd is tens of MiB, a hostile one any size.
    with open(guest.open_file(image), "rb") as f:
        if (size := os.fstat(f.fileno()).st_size) > LIST_CAP:
            raise GuestError(
                f"the initrd {image} in the guest is {human_bytes(size)}: more than the {LIST_CAP >> 20} MiB "
                "an initrd may be: refused"
            )
        digest = hashlib.file_digest(f, "sha256")
        size = f.tell()
        f.seek(0)
        names = list_initrd(f)
    carried = initrd_modules(names)
    return Initrd(kernel.version, image, rebuilt, tool, sandbox.describe() if rebuilt else "", size,
                  digest.hexdigest(), ", ".join(carried),
                  driver_places(guest, kernel, target, carried, listed=bool(names)))  # fmt: skip


def _check_only(guest: Guest, kernel: GuestKernel, target: Target) -> Initrd:
    storage = target.storage_modules
    names = set(guest.listdir("/boot"))
    image = next(
        (
            f"/boot/{p.format(v=kernel.version)}"
            for p in INITRD_PATTERNS
            if p.format(v=kernel.version) in names
        ),
        None,
    )
    builtin_names = builtin_modules(guest, kernel.version)
    wanted = {_norm(m) for m in storage}
    if image is None:
        # A kernel with its disk driver built in needs no initrd to find its root.
        if builtin_names & wanted:
            return Initrd(kernel.version, "", False, "(none: the storage driver is built into the kernel)",
                          "", 0, "", "", driver_places(guest, kernel, target, []))  # fmt: skip
        raise GuestError(
            f"kernel {kernel.version} has no initrd nor any of {', '.join(storage)} built in, "
            "and this profile cannot make an initrd"
        )
    described = _describe(
        guest, kernel, image, False, "(not rebuilt: the profile has no initrd tool)", target
    )
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
    changes, as the original did: removing after installing takes dependencies with it). The
    package index is fetched first (cloud images ship without one)."""
    done = []
    for names, verb in ((remove, "remove"), (install, "install")):
        if not names:
            continue
        if profile.packages is None:
            raise ParameterError(f"profile {profile.name} has no package manager for {verb}")
        for name in names:
            check_package(name)
        manager = profile.packages
        if verb == "install" and manager.refresh:
            went = _package_tool(guest, manager.refresh, manager.env, "the guest's package index could not be fetched",
                                 mirror_list=manager.mirrors)  # fmt: skip
            done.append(" ".join(manager.refresh) + went)
        prefix = manager.remove if verb == "remove" else manager.install
        # Installing needs the network (the guest's own repositories); removing does not.
        went = _package_tool(guest, [*prefix, *names], manager.env, f"{verb} {' '.join(names)} failed in the guest",
                             network=verb == "install", mirror_list=manager.mirrors)  # fmt: skip
        done.append(f"{verb} {' '.join(names)}" + went)
        if verb == "install" and manager.cleanup:
            _package_tool(guest, manager.cleanup, manager.env, "the downloaded packages could not be removed",
                          network=False)  # fmt: skip
            done.append(" ".join(manager.cleanup))
    return done


# The line of a package manager's output that says what went wrong (apt's "E: ...", yum's "No package").
_PACKAGE_ERROR = re.compile(
    r"^(E: .*|Err:.*|No package .*|No Match for argument.*|Error: .*)$", re.MULTILINE
)


def _package_tool(guest: Guest, argv: list[str], env: dict[str, str], what: str, *, network: bool = True,
                  mirror_list: list[str] | None = None) -> str:  # fmt: skip
    """Run the package manager in the sandbox; return where it went (" (mirrors reached: ...)")."""
    reached: list[str] = []
    try:
        sandbox.run(
            guest.root, argv, network=network, env=env, mirror_list=mirror_list or [], reached=reached
        )
        return f" ({reached[0]})" if reached else ""
    except sandbox.LimitReached as e:
        raise GuestError(f"{what} ({' '.join(argv)}: {e})") from None
    except CommandError as e:
        output = f"{getattr(e.result, 'stdout', '')}\n{getattr(e.result, 'stderr', '')}"
        found = _PACKAGE_ERROR.findall(output)
        # apt's first "E:" says why ("Failed to fetch ... Connection refused", "Unable to locate").
        found = [f for f in found if f.startswith("E: ")] or found
        detail = found[0] if found else (output.strip().splitlines() or ["no output"])[-1]
        if "No space left on device" in output:
            detail = "no space left in the guest's filesystem: give it more with --packages-room"
        raise GuestError(f"{what} ({' '.join(argv)}: {detail.strip()[:200]})") from None
