"""The text edits of 20-migrate (and a few of 10-clean), as pure functions of a file's text.

Each takes the old text and returns the new: unit-testable without a guest, and each removes or
changes only the lines it names, so the rest of a file (the ordinary lines of rc.local, the other
settings of ifcfg-eth0) stays as it was.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable

from imaging.errors import ParameterError

XEN_MODULES = (
    "xenblk",
    "xennet",
    "xen-blkfront",
    "xen-netfront",
    "xen_blkfront",
    "xen_netfront",
    "xen-vbd",
    "xen-vnif",
)
_PSEUDO_FS = {
    "proc",
    "sysfs",
    "devpts",
    "tmpfs",
    "swap_none",
    "none",
    "usbfs",
    "binfmt_misc",
    "debugfs",
    "securityfs",
}
_CRYPT = re.compile(r"^\$(1|5|6|2[aby]|y|gy|7)\$[./A-Za-z0-9$=,+-]{8,}$")


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _with_newline(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def inittab(text: str, xen_consoles: Iterable[str], serial_getty: str | None, runlevel: int | None) -> str:
    """Drop the Xen consoles' gettys (``xvc0:2345:respawn:/sbin/mingetty xvc0``), add a getty on
    ttyS0 when asked, and change the default runlevel when asked."""
    consoles = set(xen_consoles)
    out = []
    for line in _lines(text):
        fields = line.strip().split(":")
        if len(fields) >= 4 and not line.lstrip().startswith("#"):
            words = set(re.split(r"[\s/]+", fields[3])) | {fields[0]}
            if words & consoles:
                continue
            if runlevel is not None and fields[2] == "initdefault":
                line = re.sub(r"^(\s*[^:]*:)\d(:initdefault:)", rf"\g<1>{runlevel}\g<2>", line)
        out.append(line)
    new = _with_newline("".join(out))
    if serial_getty and serial_getty not in new:
        getty_id = serial_getty.split(":", 1)[0]
        new = "".join(line for line in _lines(new) if line.split(":", 1)[0] != getty_id)
        new += f"# Login on the serial console (imaging, 20-migrate)\n{serial_getty}\n"
    return new


def securetty(text: str, tty: str = "ttyS0") -> str:
    return text if tty in text.split() else _with_newline(text) + f"{tty}\n"


def modprobe_conf(text: str, storage: list[str], nic: str, extra: list[str], target: str) -> str:
    """Xen aliases out, the target's drivers in: ``alias eth0 <nic>``, ``alias scsi_hostadapter[N]``
    for each storage driver, and the target's further lines."""
    out = []
    for line in _lines(text):
        words = line.split()
        if len(words) >= 3 and words[0] == "alias":
            if words[2] in XEN_MODULES or words[1] == "eth0" or words[1].startswith("scsi_hostadapter"):
                continue
        if line.strip() in extra:
            continue
        out.append(line)
    new = _with_newline("".join(out))
    new += f"# Drivers for the {target} target (imaging, 20-migrate)\n"
    new += f"alias eth0 {nic}\n"
    for i, module in enumerate(storage):
        new += f"alias scsi_hostadapter{i or ''} {module}\n"
    new += "".join(f"{line}\n" for line in extra)
    return new


ESP_MOUNT = "/boot/efi"


def fstab(text: str, root_uuid: str, root_label: str, target: str, merged: tuple[str, ...] = (),
          esp_uuid: str = "") -> str:  # fmt: skip
    """The root entry by UUID; entries for devices the target does not have (the Xen disks, the
    cloud's ephemeral and swap disks, LVM volumes other than the root) commented out, so the boot
    does not wait for them. Other entries on the root's own filesystem (btrfs subvolumes) stay;
    those ``merged`` into the root (a separate /boot, flatten.py) are commented out as such.
    ``esp_uuid``: the new disk's EFI system partition, mounted on /boot/efi by its volume id
    (where the guest's shim and GRUB packages put their updates)."""
    out = []
    esp_line = f"UUID={esp_uuid} {ESP_MOUNT} vfat umask=0077 0 1\n" if esp_uuid else ""
    ours_too = {f"UUID={root_uuid}", f"UUID={root_uuid.upper()}"} | (
        {f"LABEL={root_label}"} if root_label else set()
    )
    for line in _lines(text):
        fields = line.split()
        if not fields or fields[0].startswith("#") or len(fields) < 3:
            out.append(line)
            continue
        device, mountpoint, fstype = fields[0], fields[1], fields[2]
        if esp_line and posixpath.normpath(mountpoint) == ESP_MOUNT:
            out.append(esp_line if device == f"UUID={esp_uuid}" else
                       f"# the ESP is a new partition (imaging, 20-migrate): {line}" + esp_line)  # fmt: skip
            esp_line = ""
            continue
        if mountpoint == "/":
            ours = {f"UUID={root_uuid}"} | ({f"LABEL={root_label}"} if root_label else set())
            if device not in ours:
                line = line.replace(device, f"UUID={root_uuid}", 1)
        elif (
            fstype in _PSEUDO_FS
            or device in _PSEUDO_FS
            or not device.startswith(("/dev/", "UUID=", "LABEL="))
            or device in ours_too
        ):
            pass  # kept: not a disk, or the root's own filesystem (btrfs subvolumes: /home)
        elif posixpath.normpath(mountpoint) in merged:
            line = f"# merged into the root filesystem (imaging, 00-acquire): {line}"
        else:
            line = f"# not on the {target} target (imaging, 20-migrate): {line}"
        out.append(line)
    return _with_newline("".join(out)) + esp_line


def selinux(text: str, mode: str) -> str:
    if mode == "keep":
        return text
    if re.search(r"^\s*SELINUX\s*=", text, re.MULTILINE):
        return re.sub(r"^(\s*SELINUX\s*=\s*)\S*", rf"\g<1>{mode}", text, flags=re.MULTILINE)
    return _with_newline(text) + f"SELINUX={mode}\n"


_OPENS = re.compile(r"(^\s*(while|until|for|if|case)\b)|(\b(do|then)\s*$)|(\{\s*$)")
_CLOSES = re.compile(r"^\s*(done|fi|esac|\})\b")


def without_hooks(text: str, patterns: list[str]) -> str:
    """Remove the shell lines matching ``patterns`` from a boot script; when such a line opens a
    compound command (``until wget ...; do``), the whole command goes, to its ``done``."""
    if not patterns:
        return text
    hook = re.compile("|".join(f"(?:{p})" for p in patterns))
    out, depth = [], 0
    for line in _lines(text):
        if depth:
            if _OPENS.search(line) and not _CLOSES.search(line):
                depth += 1
            elif _CLOSES.search(line):
                depth -= 1
            continue
        if hook.search(line) and not line.lstrip().startswith("#"):
            if _OPENS.search(line) and not re.search(r"\b(done|fi)\b", line):
                depth = 1
            continue
        out.append(line)
    return "".join(out)


def check_crypt_hash(value: str) -> str:
    value = value.strip()
    if not _CRYPT.fullmatch(value):
        raise ParameterError(
            "the root password must be given as a crypt(3) hash ($6$..., $5$..., $y$...), not as text"
        )
    return value


def shadow_root(text: str, crypt_hash: str, days_since_epoch: int) -> str:
    """root's hash in /etc/shadow set to ``crypt_hash`` (and its last-change day to today)."""
    out, found = [], False
    for line in _lines(text):
        fields = line.rstrip("\n").split(":")
        if fields[0] == "root" and len(fields) >= 3:
            fields[1] = crypt_hash
            fields[2] = str(days_since_epoch)
            line = ":".join(fields) + "\n"
            found = True
        out.append(line)
    if not found:
        raise ParameterError("the guest's /etc/shadow has no root entry")
    return "".join(out)


def redact_shadow(text: str) -> str:
    """shadow/gshadow with every password hash replaced, for diffs and logs."""
    out = []
    for line in _lines(text):
        fields = line.rstrip("\n").split(":")
        if len(fields) >= 2 and len(fields[1]) > 2:
            fields[1] = "<hash>"
            line = ":".join(fields) + ("\n" if line.endswith("\n") else "")
        out.append(line)
    return "".join(out)


def grub_legacy(
    kernels: list[tuple[str, str, str | None]], uuid: str, title: str, args: str, timeout: int = 3
) -> str:
    """GRUB legacy's grub.conf for ``(version, vmlinuz path, initrd path)``, as the original
    procedure wrote it, with root by UUID and the serial console."""
    lines = [
        "# Written by imaging (20-migrate). GRUB 2 boots this disk (see /boot/imaging-grub/grub.cfg) and offers",
        "# this menu too; the guest's own tools (grubby, new-kernel-pkg) keep editing this file.",
        "default=0",
        f"timeout={timeout}",
        "serial --unit=0 --speed=115200",
        "terminal --timeout=3 serial console",
    ]
    for version, vmlinuz, initrd in kernels:
        lines += [
            f"title {title} ({version})",
            "\troot (hd0,0)",
            f"\tkernel {vmlinuz} root=UUID={uuid} {args}".rstrip(),
        ]
        if initrd:
            lines.append(f"\tinitrd {initrd}")
    return "\n".join(lines) + "\n"
