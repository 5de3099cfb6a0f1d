"""A new distro profile proposed from what an unknown guest holds, for a person to review.

When no profile knows a guest, 10-clean stops and says so. :func:`propose` looks where 20-migrate
would look (init system and its consoles, module configuration, the initrd tool, kernels, GRUB
legacy, the package manager, SELinux, rc.local) and writes a profile YAML whose every line says
what it was based on or that it is a guess. A guest a family's profile only half knows (a new
release, a rebuild known by its ID_LIKE) gets a short profile built on that family's instead
(``base: rhel``), naming the guest's os-release ID and version, so that it is known from then on.
It validates against :class:`~imaging.guest.profiles.Profile` before it is returned; it is never
saved or used by itself.

Text from the guest reaches the YAML only as JSON-quoted scalars or after matching a strict
pattern: an image cannot add keys or lines to the proposal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import yaml

from imaging import config
from imaging.disk.files import Guest
from imaging.errors import GuestError
from imaging.guest import initrd, osrelease, profiles

_GETTY = re.compile(r"^([A-Za-z0-9]{1,4}):([0-9sS]*):respawn:(\S*getty)\s+(.*)$")
_TTY = re.compile(r"^(tty[A-Za-z]*\d+|xvc\d+|hvc\d+|console)$")
_XEN_TTY = re.compile(r"^(xvc|hvc)\d+$")
_WORD = re.compile(r"[^a-z0-9]+")

# (tool, argv template, image templates the tool writes by default, modules file); dracut as the
# rhel profile runs it (a generic initrd; see there), /sbin/dracut as RHEL 6's (no --no-hostonly).
_DRACUT = ["--force", "--no-hostonly", "--add-drivers", "{modules}", "{image}", "{version}"]
_INITRD_TOOLS = [
    ("/usr/sbin/update-initramfs", ["{tool}", "-u", "-k", "{version}"], "/boot/initrd.img-{version}",
     "/etc/initramfs-tools/modules"),
    ("/usr/bin/dracut", ["{tool}", *_DRACUT], "/boot/initramfs-{version}.img", None),
    ("/sbin/dracut", ["{tool}", "-f", "--add-drivers", "{modules}", "{image}", "{version}"],
     "/boot/initramfs-{version}.img", None),
    ("/sbin/mkinitrd", ["{tool}", "-f", "--with={module}", "{image}", "{version}"], "/boot/initrd-{version}.img",
     None),
]  # fmt: skip
_IMAGE_NAMES = ["/boot/initrd-{version}.img", "/boot/initramfs-{version}.img", "/boot/initrd.img-{version}",
                "/boot/initrd-{version}"]  # fmt: skip
# (path, argv prefix, refresh, cleanup)
_PACKAGE_MANAGERS = [
    ("/usr/bin/dnf", ["dnf", "-y"], ["dnf", "-y", "makecache"], ["dnf", "clean", "packages"]),
    ("/usr/bin/yum", ["yum", "-y"], ["yum", "-y", "makecache"], ["yum", "clean", "packages"]),
    ("/usr/bin/apt-get", ["apt-get", "-y"], ["apt-get", "update"], ["apt-get", "clean"]),
    ("/usr/bin/zypper", ["zypper", "--non-interactive"], ["zypper", "--non-interactive", "refresh"],
     ["zypper", "--non-interactive", "clean"]),
]  # fmt: skip


@dataclass
class _Yaml:
    """Profile fields in order, each with the comment that says where it came from."""

    lines: list[str] = field(default_factory=list)

    def put(self, key: str, value: object, why: str) -> None:
        self.lines.append(f"# {why}")
        self.lines.append(f"{key}: {json.dumps(value)}")

    def note(self, why: str) -> None:
        self.lines.append(f"# {why}")


def _release(g: Guest) -> tuple[str, str, str, object]:
    """(profile name, description, "detect" or "os_release", its value) from the guest's own
    word for what it is: os-release's ID and major version (detection's first choice), else the
    release files of the distros before os-release."""
    info = osrelease.read(g)
    if info.id:
        version = info.version.split(".")[0]
        ids = {info.id: [version] if version else []}  # no VERSION_ID: a rolling release
        return (
            _slug(f"{info.id}-{version}" if version else info.id),
            info.name or info.id,
            "os_release",
            {"ids": ids},
        )
    text = _text(g, "/etc/redhat-release")
    if text and (m := re.search(r"^([A-Za-z][A-Za-z ]*?) (?:Linux )?release (\d+)", text)):
        rules = [{"file": "/etc/redhat-release", "matches": f"release {m.group(2)}"}]
        return _slug(f"{m.group(1)}-{m.group(2)}"), text.splitlines()[0].strip(), "detect", rules
    if g.is_file("/etc/debian_version"):
        return (
            "debian-like",
            "Debian-like (/etc/debian_version)",
            "detect",
            [{"file": "/etc/debian_version"}],
        )
    return "proposed", "Unknown Linux", "detect", [{"file": "/etc/fstab"}]


def _slug(text: str) -> str:
    return _WORD.sub("-", text.lower()).strip("-")[:40].strip("-") or "proposed"


def _text(g: Guest, path: str) -> str:
    return (g.read_text(path) or "") if g.is_file(path) else ""


def _init_system(g: Guest) -> str:
    init = g.realpath("/sbin/init")
    if "systemd" in init or (not g.is_file("/etc/inittab") and g.is_dir("/etc/systemd/system")):
        return "systemd"
    if g.is_file("/sbin/initctl") and g.is_dir("/etc/init"):
        return "upstart"
    return (
        "sysvinit"
        if re.search(r"^[^#]*:initdefault:", _text(g, "/etc/inittab"), re.MULTILINE)
        else "unknown"
    )


def _consoles(g: Guest) -> tuple[list[str], list[str]]:
    """(consoles with a getty, the inittab getty lines' runlevels) from inittab and systemd."""
    ttys: set[str] = set()
    levels = []
    for line in _text(g, "/etc/inittab").splitlines():
        if m := _GETTY.match(line.strip()):
            ttys |= {w for w in m.group(4).split() if _TTY.fullmatch(w)}
            levels.append(m.group(2))
    for unit in g.listdir("/etc/systemd/system/getty.target.wants"):
        if m := re.fullmatch(r"(?:serial-)?getty@(.+)\.service", unit):
            ttys |= {m.group(1)} if _TTY.fullmatch(m.group(1)) else set()
    return sorted(ttys), levels


def _add_init(out: _Yaml, g: Guest) -> None:
    init = _init_system(g)
    ttys, levels = _consoles(g)
    xen = [t for t in ttys if _XEN_TTY.fullmatch(t)]
    out.note(f"init system: {init}; consoles with a getty: {', '.join(ttys) or 'none found'}")
    if init == "sysvinit":
        out.put("inittab", "/etc/inittab", "found: its getty lines are what 20-migrate edits")
        agetty = next((p for p in ("/sbin/agetty", "/usr/sbin/agetty", "/sbin/getty") if g.is_file(p)), None)
        level = next((lv for lv in levels if lv), "2345")
        if agetty:
            out.put("serial_getty", f"S0:{level}:respawn:{agetty} ttyS0 115200 vt100",
                    f"guessed: a login on ttyS0 with the guest's {agetty}, in the runlevels of its other gettys")  # fmt: skip
        else:
            out.note("no agetty found: no serial_getty (use xen_console: remove, or add one)")
    else:
        out.note(f"{init}: no inittab to edit; its serial console comes from the kernel's console=ttyS0")
    if xen:
        out.put("xen_consoles", xen, "found: gettys on these Xen consoles")
    else:
        out.put(
            "xen_consoles", ["xvc0", "hvc0"], "guessed: no getty on a Xen console found; the usual names"
        )
    if g.is_file("/etc/securetty"):
        out.put("securetty", "/etc/securetty", "found: ttyS0 is added so root may log in there")


def _add_files(out: _Yaml, g: Guest) -> None:
    if g.is_file("/etc/modprobe.conf"):
        out.put("modprobe_conf", "/etc/modprobe.conf", "found: single-file module configuration (aliases)")
    elif g.is_dir("/etc/modprobe.d"):
        out.put(
            "modprobe_d",
            "/etc/modprobe.d/imaging-target.conf",
            "found /etc/modprobe.d: a file of our own there",
        )
    else:
        out.note("no /etc/modprobe.conf or /etc/modprobe.d: module aliases are not edited")
    if g.is_file("/etc/selinux/config"):
        out.put("selinux_config", "/etc/selinux/config", "found: SELinux is configured")
    rc_local = next((p for p in ("/etc/rc.local", "/etc/rc.d/rc.local") if g.exists(p)), None)
    if rc_local:
        out.put("rc_local", rc_local, "found: the cloud's boot hooks are removed from it")
    grub = next((p for p in ("/boot/grub/grub.conf", "/boot/grub/menu.lst") if g.is_file(p)), None)
    if grub and re.search(r"^\s*title\s", _text(g, grub), re.MULTILINE):
        out.put("grub_legacy_conf", grub, "found a GRUB legacy menu: rewritten for the guest's own tools")
        out.put("grub_dir", "/boot/grub2", "GRUB 2 beside GRUB legacy, as in the centos5 profile")
    else:
        out.put("grub_dir", "/boot/grub", "no GRUB legacy menu found: GRUB 2 in its usual place")


def _add_initrd(out: _Yaml, g: Guest) -> None:
    found = initrd.kernels(g)
    listed = ", ".join(f"{k.version}{' (Xen-only)' if k.xen else ''}{'' if k.modules else ' (no modules)'}"
                       for k in found)  # fmt: skip
    out.note(f"kernels in /boot: {listed or 'none'}")
    for tool, argv, default_image, modules_file in _INITRD_TOOLS:
        if not g.is_file(tool):
            continue
        # The image name the guest already uses for one of its kernels, else the tool's default.
        image = next((t for t in _IMAGE_NAMES for k in found if g.exists(t.format(version=k.version))),
                     default_image)  # fmt: skip
        spec: dict[str, object] = {
            "tool": tool,
            "image": image,
            "argv": [a.replace("{tool}", tool) for a in argv],
        }
        if modules_file:
            spec["modules_file"] = modules_file
        out.put("initrd", spec, f"found {tool}; argv guessed from its usual command line: check it")
        return
    out.note("no initrd tool found (mkinitrd, dracut, update-initramfs): the initrd is kept as it is")


def _add_packages(out: _Yaml, g: Guest) -> None:
    for path, prefix, refresh, cleanup in _PACKAGE_MANAGERS:
        if g.is_file(path):
            spec = {"install": [*prefix, "install"], "remove": [*prefix, "remove"], "refresh": refresh,
                    "cleanup": cleanup}  # fmt: skip
            out.put("packages", spec, f"found {path}")
            out.note(
                "no mirrors: an install reaches only package_mirrors (defaults.yaml) until you name the distro's"
            )
            return
    out.note("no package manager found (dnf, yum, apt-get, zypper): packages cannot be changed")


def _half_known(g: Guest) -> profiles.Detected | None:
    """The family's profile detection takes for the guest, with what it assumed; None when the
    guest is one a profile knows, or none takes it."""
    try:
        detected = profiles.detect(g)
    except GuestError:
        return None
    return detected if detected.assumed and detected.profile.name != "generic" else None


def _based_on(out: _Yaml, family: profiles.Detected, key: str, value: object) -> None:
    out.note(f"Detection took this guest for {family.profile.name} and warns: {family.assumed}")
    out.put("base", family.profile.name, f"{family.profile.name}'s files and tools; add what differs below")
    out.put(key, value, "the guest's os-release: detection's first choice from now on "
                        f"(or add this to {family.profile.name}'s os_release instead)")  # fmt: skip


def propose(g: Guest, name: str = "") -> str:
    """A profile YAML for the guest, every line commented with what it is based on."""
    found, description, key, value = _release(g)
    family = _half_known(g) if key == "os_release" else None
    if found in config.available("profiles"):  # Debian sid is "debian": not to be saved over it
        found = f"{found}-guest"
    out = _Yaml()
    out.note("Proposed by imaging from what the guest holds: review every line, then save it as")
    out.note(f"parameters/profiles/{name or found}.yaml (20-migrate acts on exactly what it names).")
    out.put("name", name or found, "from the guest's release file")
    out.put("description", description[:100], "the guest's own name for itself")
    if family is not None:
        _based_on(out, family, key, value)
        return _checked(out)
    if key == "os_release":
        out.put(key, value, "the guest's os-release ID and major version: no other distro gives them")
    else:
        out.put(key, value, "the release file and version: make sure no other distro matches them")
    _add_init(out, g)
    _add_files(out, g)
    _add_initrd(out, g)
    _add_packages(out, g)
    out.put("clean", ["defaults"], "the default clean operations")
    return _checked(out)


def _checked(out: _Yaml) -> str:
    text = "\n".join(out.lines) + "\n"
    profiles.build(yaml.safe_load(text))  # a proposal that would not load is our bug, not the guest's
    return text
