"""Debian packages as a source of kernels, modules and busybox, fetched once and cached.

``apt-get download`` + ``dpkg-deb -x`` give a package's files without installing it. The cache
(``$IMAGING_CACHE``, by default ``~/.cache/imaging``) keeps the .deb files and the unpacked kernel
trees, so tests and demos fetch nothing the second time.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from imaging import config, tools
from imaging.errors import ImagingError


def _debs() -> Path:
    path = config.cache_dir() / "debs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_deb(package: str) -> Path | None:
    found = sorted(_debs().glob(f"{package}_*.deb"))
    return found[-1] if found else None


def fetch_deb(package: str) -> Path:
    """The .deb of ``package`` from the cache, downloading it with apt-get the first time."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", package):
        raise ImagingError(f"not a Debian package name: {package!r}")
    deb = cached_deb(package)
    if deb:
        return deb
    tools.require_tools("apt-get", reason="download Debian packages", hint="run on Debian, see make setup")
    tmp = _debs() / ".download"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tools.run(["apt-get", "download", package], cwd=tmp, timeout=900)
        got = sorted(tmp.glob(f"{package}_*.deb"))
        if not got:
            raise ImagingError(f"apt-get download {package} produced no .deb")
        dest = _debs() / got[-1].name
        got[-1].replace(dest)
        return dest
    except tools.CommandError as e:
        raise ImagingError(f"cannot download {package} (run 'apt-get update' first?): {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generic_kernel_package() -> str:
    """The versioned package behind linux-image-amd64: the generic kernel, which has AHCI and
    e1000 (the -cloud-amd64 flavour lacks both). A cached one wins, so no apt query is needed."""
    cached = sorted(p.name.split("_")[0] for p in _debs().glob("linux-image-*-amd64_*.deb"))
    cached = [c for c in cached if not c.endswith("-cloud-amd64") and c != "linux-image-amd64"]
    if cached:
        return cached[-1]
    out = tools.check_output(["apt-cache", "depends", "linux-image-amd64"], timeout=120)
    m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)", out)
    if not m:
        raise ImagingError("apt-cache cannot resolve linux-image-amd64 (run 'apt-get update' first?)")
    return m.group(1)


def release_kernel_deb(release: str, mirror: str, flavour: str = "cloud-amd64") -> Path:
    """The .deb of Debian ``release``'s kernel (``linux-image-<flavour>``'s versioned package):
    the newer kernel a guest of an older release installs from a local file, as its next kernel
    update. apt-get fetches it from ``mirror`` with a state directory of its own
    (the host's sources are left as they are); cached like the others."""
    if not (re.fullmatch(r"[a-z]+", release) and re.fullmatch(r"[a-z0-9-]+", flavour)
            and re.fullmatch(r"https?://[^\s]+", mirror)):  # fmt: skip
        raise ImagingError(
            f"not a Debian release, mirror and kernel flavour: {release!r} {mirror!r} {flavour!r}"
        )
    found = sorted(_debs().glob(f"linux-image-*+deb*-{flavour}_*.deb"))
    if found:
        return found[-1]
    state = config.cache_dir() / f"apt-{release}"
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "sources.list").write_text(f"deb {mirror} {release} main\n")
    opts = [f"-oDir::Etc::SourceList={state / 'sources.list'}", "-oDir::Etc::SourceParts=/nonexistent",
            f"-oDir::State::Lists={state / 'lists'}", f"-oDir::Cache={state}", "-oDir::Cache::pkgcache=",
            "-oDir::Cache::srcpkgcache=", "-oDebug::NoLocking=1", "-oAPT::Architecture=amd64"]  # fmt: skip
    try:
        tools.run(["apt-get", *opts, "update"], timeout=900)
        depends = tools.check_output(["apt-cache", *opts, "depends", f"linux-image-{flavour}"], timeout=120)
    except tools.CommandError as e:
        raise ImagingError(f"cannot read Debian {release}'s package index from {mirror}: {e}") from None
    m = re.search(rf"Depends:\s*(linux-image-[0-9]\S*-{re.escape(flavour)})\b", depends)
    if not m:
        raise ImagingError(f"Debian {release} has no linux-image-{flavour} kernel package")
    tmp = _debs() / ".download"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tools.run(["apt-get", *opts, "download", m.group(1)], cwd=tmp, timeout=900)
        got = sorted(tmp.glob(f"{m.group(1)}_*.deb"))
        if not got:
            raise ImagingError(f"apt-get download {m.group(1)} produced no .deb")
        return got[-1].replace(_debs() / got[-1].name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class KernelTree:
    """An unpacked kernel package: ``root/boot/vmlinuz-<version>`` and ``root/lib/modules/<version>``."""

    root: Path
    version: str

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.version

    def module_closure(self, names: list[str]) -> list[Path]:
        """The module files for ``names`` and everything they depend on, dependencies first."""
        deps: dict[str, list[str]] = {}
        for line in (self.modules / "modules.dep").read_text().splitlines():
            mod, _, rest = line.partition(":")
            deps[mod] = rest.split()
        by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
        ordered: list[str] = []

        def visit(mod: str) -> None:
            for dep in deps[mod]:
                visit(dep)
            if mod not in ordered:
                ordered.append(mod)

        for name in names:
            key = name.replace("-", "_")
            if key not in by_name:
                raise ImagingError(f"kernel {self.version} has no module {name}")
            visit(by_name[key])
        return [self.modules / m for m in ordered]


def kernel_tree(package: str | None = None) -> KernelTree:
    """Unpack (once) the kernel package and index its modules with depmod."""
    package = package or generic_kernel_package()
    version = package.removeprefix("linux-image-")
    dest = config.cache_dir() / "kernels" / version
    if (dest / ".complete").exists():
        return KernelTree(dest, version)
    deb = fetch_deb(package)
    tmp = dest.with_name(dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tools.run(["dpkg-deb", "-x", deb, tmp], timeout=600)
    # An unpacked package has no modules.dep: depmod writes it.
    tools.run(["depmod", "-b", tmp, version], timeout=600)
    (tmp / ".complete").touch()
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return KernelTree(dest, version)


def busybox() -> Path:
    """The static busybox binary from busybox-static."""
    dest = config.cache_dir() / "busybox" / "busybox"
    if dest.exists():
        return dest
    deb = fetch_deb("busybox-static")
    tmp = dest.parent.with_name("busybox.part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tools.run(["dpkg-deb", "-x", deb, tmp], timeout=300)
    shutil.rmtree(dest.parent, ignore_errors=True)
    dest.parent.mkdir(parents=True)
    (tmp / "bin" / "busybox").rename(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


def busybox_applets() -> list[str]:
    """Every applet the cached busybox provides (for a root filesystem that is all busybox)."""
    return tools.check_output([busybox(), "--list"], timeout=60).split()
