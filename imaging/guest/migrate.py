"""Stage 20-migrate: an instance that ran under Xen (or any cloud) made bootable on the target.

The original procedure's step 1, file by file: inittab (the Xen console's getty), securetty,
modprobe.conf (Xen aliases out, the target's drivers in), fstab (root by UUID; the cloud's other
disks commented out), a guest-side grub.conf with menu.lst and grub.cfg links, SELinux, the
cloud's boot hooks in rc.local, root's password from a crypt hash, packages, and the initrd
rebuilt by the guest's own tool with the target's drivers. :func:`plan` shows every edit as a
diff without changing anything; :func:`apply` makes them on a copy of the instance, which takes
the instance's place only when all went well.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from imaging import config
from imaging.disk import ext, filesystems
from imaging.disk.bootloader import INITRD_PATTERNS, version_key
from imaging.disk.files import Guest, unified_diff
from imaging.errors import GuestError, ParameterError
from imaging.guest import access, edits, firmware, firstboot, initrd, kernel_links
from imaging.guest.profiles import Profile, load_platform, resolve
from imaging.records import Record
from imaging.tables import Table
from imaging.workspace import Workspace


class MigrateOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str = "auto"
    platforms: list[str] = ["atmosphere", "eucalyptus"]
    xen_console: Literal["serial", "remove"] = "serial"  # its getty moved to ttyS0, or just removed
    runlevel: int | None = Field(default=None, ge=1, le=5)  # None: keep (the original set 5, for X11)
    selinux: Literal["disabled", "permissive", "keep"] = "disabled"
    enforcing_arg: bool = False  # enforcing=0 on the kernel line
    root_password_hash_file: str = ""  # a file holding a crypt(3) hash; never plain text
    packages_install: list[str] = []
    packages_remove: list[str] = []
    packages_room: str = "2G"  # the filesystem grows by this before packages are installed
    kernel: str = ""  # a kernel version; "" = the newest that is not Xen-only
    firmware: str = "auto"  # bios, uefi, hybrid; auto: hybrid where the target and guest allow
    layout: str = "aligned"  # 30-bootable's: legacy is MBR, BIOS only


@dataclass(frozen=True)
class Change:
    path: str
    what: str
    diff: str = field(repr=False)
    apply: Callable[[Guest], None] = field(repr=False, compare=False)


@dataclass(frozen=True)
class MigrationPlan(Record):
    profile: str
    profile_reason: str
    target: str
    kernel: str
    initrd_modules: list[str]
    kernel_args: str
    grub_dir: str
    packages: list[str]
    first_boot: dict[str, object]
    changes: list[Change] = field(repr=False)
    # The links GRUB's default entry follows to the kernel the guest installs next (kernel_links.py).
    kernel_links: dict[str, str] = field(default_factory=dict)
    # What detection took for granted (a version or distro the profile was not written for).
    profile_assumed: str = ""
    # The firmware the disk will boot under, and the guest's signed chain (guest/firmware.py).
    firmware: dict[str, object] = field(default_factory=dict)

    def table(self) -> Table:
        rows = [(c.path, c.what, _count(c.diff, "-"), _count(c.diff, "+")) for c in self.changes]
        return Table(rows, ["path", "change", "lines removed", "lines added"])

    def diff(self) -> str:
        return "".join(c.diff for c in self.changes)

    def summary(self) -> Table:
        return Record.table(self)

    def to_dict(self) -> dict[str, object]:
        data = {k: v for k, v in super().to_dict().items() if k != "changes"}
        data["changes"] = [{"path": c.path, "what": c.what, "diff": c.diff} for c in self.changes]
        return data


def _count(diff: str, sign: str) -> int:
    return sum(1 for line in diff.splitlines() if line.startswith(sign) and not line.startswith(sign * 3))


def _edit(g: Guest, path: str | None, what: str, change: Callable[[str], str],
          redact: Callable[[str], str] | None = None) -> list[Change]:  # fmt: skip
    """A Change for an existing file whose text ``change`` alters (none if it does not)."""
    if not path or not g.exists(path):
        return []
    old = g.read_text(path)
    if old is None:
        return []
    new = change(old)
    if new == old:
        return []
    show = redact or (lambda t: t)
    diff = unified_diff(path, show(old), show(new), g.realpath(path))
    return [Change(path, what, diff, lambda guest: guest.write_text(path, new))]


def _title(g: Guest) -> str:
    text = g.read_text("/etc/redhat-release") or g.read_text("/etc/system-release") or ""
    words = re.sub(r"[^A-Za-z0-9 .()-]", "", text.strip().split(" release")[0])[:40].strip()
    return words or "Linux"


def _grub_legacy(
    g: Guest, profile: Profile, kernel: initrd.GuestKernel, uuid: str, args: str
) -> list[Change]:
    if not profile.grub_legacy_conf:
        return []
    names = set(g.listdir("/boot"))
    entries = []
    usable = [k for k in initrd.kernels(g) if not k.xen and k.modules]
    # The kernel chosen for the target first: grub.conf's default=0 is what boots.
    newest_first = sorted(usable, key=lambda k: version_key(k.version), reverse=True)
    for k in sorted(newest_first, key=lambda k: k.version != kernel.version):
        found = (f"/boot/{p.format(v=k.version)}" for p in INITRD_PATTERNS if p.format(v=k.version) in names)
        image = next(found, None)
        if profile.initrd and k.version == kernel.version:  # the initrd this stage rebuilds
            image = profile.initrd.image.format(version=k.version)
        entries.append((k.version, k.vmlinuz, image))
    conf = profile.grub_legacy_conf
    new = edits.grub_legacy(entries, uuid, _title(g), args)
    old = g.read_text(conf) if g.exists(conf) and not g.is_symlink(conf) else ""
    changes = []
    if new != old:
        changes.append(Change(conf, "GRUB legacy menu for the guest's own tools", unified_diff(conf, old or "", new),
                              lambda guest: guest.write_text(conf, new)))  # fmt: skip
    directory, name = conf.rsplit("/", 1)
    for link in ("menu.lst", "grub.cfg"):
        path = f"{directory}/{link}"
        if link == name or (g.is_symlink(path) and g.readlink(path) == name):
            continue
        changes.append(Change(path, f"symlink to {name}, as the original procedure advises",
                              f"--- a{path}\n+++ b{path}\n@@ symlink @@\n+{path} -> {name}\n",
                              lambda guest, p=path: guest.symlink(name, p)))  # type: ignore[misc]  # fmt: skip
    return changes


def _password(profile: Profile, options: MigrateOptions, g: Guest) -> list[Change]:
    if not options.root_password_hash_file:
        return []
    try:
        crypt_hash = edits.check_crypt_hash(Path(options.root_password_hash_file).read_text())
    except OSError as e:
        raise ParameterError(f"cannot read the root password hash file: {e.strerror}") from None
    today = int(time.time() // 86400)
    return _edit(g, profile.shadow, "root password set from the given crypt hash",
                 lambda t: edits.shadow_root(t, crypt_hash, today), redact=edits.redact_shadow)  # fmt: skip


def _first_boot(g: Guest, profile: Profile, found: firstboot.Facts) -> list[Change]:
    """What the first boot on the target needs and the guest does not do itself."""
    changes: list[Change] = []
    if network := found.networkd_eth0:
        changes.append(Change(firstboot.NETWORKD_ETH0, "eth0 by DHCP (networkd's own files match only other NICs)",
                              unified_diff(firstboot.NETWORKD_ETH0, "", network),
                              lambda guest: guest.write_text(firstboot.NETWORKD_ETH0, network)))  # fmt: skip
    unit = firstboot.ssh_keygen_unit(g, found, profile.ssh_host_keys)
    if unit is None:
        return changes
    path = firstboot.SSH_KEYGEN_UNIT
    link = f"/etc/systemd/system/multi-user.target.wants/{posixpath.basename(path)}"
    old = g.read_text(path) if g.is_file(path) else ""
    if old != unit:
        changes.append(Change(path, "SSH host keys made on the first boot (the source's were removed)",
                              unified_diff(path, old or "", unit), lambda guest: guest.write_text(path, unit)))  # fmt: skip
    if not (g.is_symlink(link) and g.readlink(link) == path):
        changes.append(Change(link, "that unit enabled", f"--- a{link}\n+++ b{link}\n@@ symlink @@\n+{link} -> {path}\n",
                              lambda guest: guest.symlink(path, link)))  # fmt: skip
    return changes


def _initrd_of(g: Guest, profile: Profile, kernel: initrd.GuestKernel) -> str | None:
    """The initrd the chosen kernel boots with after 20-migrate: the one the profile's tool
    rebuilds, else the one the guest has."""
    if profile.initrd:
        return profile.initrd.image.format(version=kernel.version)
    names = set(g.listdir("/boot"))
    return next((f"/boot/{p.format(v=kernel.version)}" for p in INITRD_PATTERNS if p.format(v=kernel.version) in names),
                None)  # fmt: skip


def _follow(g: Guest, profile: Profile, kernel: initrd.GuestKernel) -> tuple[list[Change], dict[str, str]]:
    planned, followed = kernel_links.plan(g, profile, kernel.vmlinuz, _initrd_of(g, profile, kernel))
    return [Change(e.path, e.what, e.diff, e.apply) for e in planned], dataclasses.asdict(followed)


def _kernel_args(options: MigrateOptions, found: firstboot.Facts) -> list[str]:
    """Arguments for every kernel line: SELinux as asked, NIC names that match the configuration."""
    return (["enforcing=0"] if options.enforcing_arg else []) + firstboot.kernel_args(found)


def _esp_mount(g: Guest, esp_uuid: str) -> list[Change]:
    if not esp_uuid or g.is_dir(edits.ESP_MOUNT):
        return []
    return [Change(edits.ESP_MOUNT, "the ESP's mount point", "", lambda g: g.makedirs(edits.ESP_MOUNT))]


def _changes(g: Guest, profile: Profile, target: config.Target, options: MigrateOptions,
             instance: dict[str, object], kernel: initrd.GuestKernel,
             found: firstboot.Facts, esp_uuid: str) -> tuple[list[Change], str]:  # fmt: skip
    uuid, label = str(instance["uuid"]), str(instance.get("label", ""))
    merged = tuple(str(m).split(":", 1)[0] for m in instance.get("merged") or [])  # type: ignore[attr-defined]
    args = " ".join(["ro", "console=tty0", "console=ttyS0,115200n8", *_kernel_args(options, found)])
    hooks = [h for p in options.platforms for h in load_platform(p).boot_hooks]
    getty = profile.serial_getty if options.xen_console == "serial" else None
    changes = [
        *_edit(g, profile.inittab, "Xen console getty " + ("moved to ttyS0" if getty else "removed"),
               lambda t: edits.inittab(t, profile.xen_consoles, getty, options.runlevel)),
        *_edit(g, profile.securetty, "root may log in on ttyS0", edits.securetty),
        *_edit(g, profile.modprobe_conf, f"Xen aliases replaced by {target.name}'s drivers",
               lambda t: edits.modprobe_conf(t, target.storage_modules, target.nic_module, target.modprobe_extra, target.name)),
        *_edit(g, profile.fstab, "root by UUID; the cloud's other disks commented out"
               + ("; the new ESP on /boot/efi" if esp_uuid else ""),
               lambda t: edits.fstab(t, uuid, label, target.name, merged, esp_uuid)),
        *_esp_mount(g, esp_uuid),
        *_edit(g, profile.selinux_config, f"SELinux {options.selinux}", lambda t: edits.selinux(t, options.selinux)),
        *_edit(g, profile.rc_local, "the cloud's boot hooks removed", lambda t: edits.without_hooks(t, hooks)),
        *_grub_legacy(g, profile, kernel, uuid, args),
        *_password(profile, options, g),
        *_first_boot(g, profile, found),
    ]  # fmt: skip
    return changes, args


def _with_root_module(target: config.Target, ws: Workspace) -> config.Target:
    """The target's initrd modules and the root filesystem's (xfs, btrfs), which initrd tools
    only add when they see the root mounted, and a sandbox's root is not the guest's device."""
    fs = filesystems.of(str(ws.result("00-acquire").get("fs_type") or "ext4"))
    if fs.KERNEL_MODULE in ext.TYPES or fs.KERNEL_MODULE in target.initrd_modules:
        return target
    return target.model_copy(update={"initrd_modules": [*target.initrd_modules, fs.KERNEL_MODULE]})


def _plan(g: Guest, ws: Workspace, target_name: str, options: MigrateOptions,
          fw: firmware.FirmwarePlan | None = None) -> MigrationPlan:  # fmt: skip
    target = _with_root_module(config.load_target(target_name), ws)
    detected = resolve(g, options.profile)
    profile = detected.profile
    kernel = initrd.choose_kernel(g, options.kernel, [*target.initrd_modules, target.nic_module])
    found = firstboot.facts(g, target.nic_module)
    instance = ws.result("00-acquire")
    fw = fw or firmware.plan(g, profile, kernel.vmlinuz, target, options.firmware, options.layout,
                             source_esp=_source_esp(ws))  # fmt: skip
    esp = instance.get("esp") or {}
    esp_uuid = firmware.esp_volume_id(str(instance["uuid"]), esp) if "uefi" in fw.platforms else ""
    changes, args = _changes(g, profile, target, options, instance, kernel, found, esp_uuid)
    follow, followed = _follow(g, profile, kernel)
    packages = [f"remove {' '.join(options.packages_remove)}"] * bool(options.packages_remove)
    packages += [f"install {' '.join(options.packages_install)}"] * bool(options.packages_install)
    return MigrationPlan(
        profile=profile.name,
        profile_reason=detected.reason,
        target=target.name,
        kernel=kernel.version,
        initrd_modules=target.initrd_modules,
        kernel_args=" ".join(_kernel_args(options, found)),
        grub_dir=profile.grub_dir,
        packages=packages,
        first_boot={"ssh": found.sshd, "dhcp": found.dhcp, "why": found.why},
        changes=[*changes, *follow],
        kernel_links=followed,
        profile_assumed=detected.assumed,
        firmware={**fw.to_dict(), "esp_uuid": esp_uuid},
    )


def plan(ws: Workspace, target: str, options: MigrateOptions | None = None) -> MigrationPlan:
    """Every change migration would make, as diffs; nothing is changed."""
    with access.reading(ws) as g:
        return _plan(g, ws, target, options or MigrateOptions())


@dataclass(frozen=True)
class Migrated(Record):
    profile: str
    target: str
    kernel: str
    files_changed: int
    packages: str
    initrd: str
    initrd_modules: str
    initrd_bytes: int
    drivers: dict[str, str]  # each of the target's drivers: in the initrd, built in, on the root fs
    sandbox: str
    kernel_args: str
    grub_dir: str
    grub_legacy_conf: str
    first_boot: dict[str, object]  # what 50-verify requires of the boot: sshd, DHCP (and why)
    skipped: list[str] = field(default_factory=list)  # paths a symlink loop made unreachable
    profile_assumed: str = ""  # as the plan's: what detection took for granted
    kernel_links: dict[str, str] = field(default_factory=dict)  # as the plan's
    firmware: dict[str, object] = field(default_factory=dict)  # as the plan's, once the chain is installed


def apply(
    ws: Workspace, target: str, options: MigrateOptions | None = None
) -> tuple[MigrationPlan, Migrated]:
    """Migrate a copy of the instance and put it in the instance's place."""
    options = options or MigrateOptions()
    tgt = _with_root_module(config.load_target(target), ws)
    room = config.parse_disk_size(options.packages_room)[1] if options.packages_install else 0
    if not room and plan(ws, target, options).firmware.get("packages"):
        room = _CHAIN_ROOM
    with access.editing(ws, grow=room) as g:
        profile = resolve(g, options.profile).profile
        # Packages first: what they install (a kernel, mkinitrd) is what the edits then see.
        packages = initrd.run_packages(g, profile, options.packages_install, options.packages_remove)
        ran, installed, failed = _secure_boot_chain(g, ws, tgt, profile, options)
        packages += ran
        now = _firmware_now(g, ws, tgt, profile, options)
        fw = dataclasses.replace(now, packages=installed, why=[*failed, *now.why])
        done = _plan(g, ws, target, options, fw)
        for change in done.changes:
            change.apply(g)
        kernel = initrd.choose_kernel(g, options.kernel, [*tgt.initrd_modules, tgt.nic_module])
        made = initrd.rebuild(g, profile, kernel, tgt)
        if not g.exists(kernel.vmlinuz):
            raise GuestError(f"the kernel {kernel.vmlinuz} vanished during migration")
        skipped = list(g.skipped)
    return done, Migrated(
        profile=done.profile,
        target=done.target,
        kernel=kernel.version,
        files_changed=len(done.changes),
        packages="; ".join(packages) or "(none)",
        initrd=made.image + (" (rebuilt)" if made.rebuilt else " (kept)") if made.image else made.tool,
        initrd_modules=made.modules,
        initrd_bytes=made.bytes,
        drivers=made.drivers,
        sandbox=made.sandbox,
        kernel_args=done.kernel_args,
        grub_dir=done.grub_dir,
        grub_legacy_conf=profile.grub_legacy_conf or "",
        first_boot=done.first_boot,
        skipped=skipped,
        profile_assumed=done.profile_assumed,
        kernel_links=done.kernel_links,
        firmware=done.firmware,
    )


# What the signed chain's packages take (shim, GRUB's EFI build and its modules): tens of MiB.
_CHAIN_ROOM = 512 << 20


def _source_esp(ws: Workspace) -> Path | None:
    """The source's ESP (00-acquire's copy), where the RHEL family keeps its signed chain."""
    return ws.esp if ws.has_result("00-acquire") and ws.result("00-acquire").get("esp") else None


def _firmware_now(g: Guest, ws: Workspace, target: config.Target, profile: Profile,
                  options: MigrateOptions) -> firmware.FirmwarePlan:  # fmt: skip
    kernel = initrd.choose_kernel(g, options.kernel, [*target.initrd_modules, target.nic_module])
    return firmware.plan(g, profile, kernel.vmlinuz, target, options.firmware, options.layout,
                         chain_packages=False, source_esp=_source_esp(ws))  # fmt: skip


def _secure_boot_chain(g: Guest, ws: Workspace, target: config.Target, profile: Profile,
                       options: MigrateOptions) -> tuple[list[str], list[str], list[str]]:  # fmt: skip
    """Install the guest's signed shim and GRUB where the disk boots UEFI and the guest lacks them.
    A failed install costs Secure Boot, not the run: the disk still boots UEFI, and the record
    says why not with Secure Boot."""
    kernel = initrd.choose_kernel(g, options.kernel, [*target.initrd_modules, target.nic_module])
    wanted = firmware.plan(g, profile, kernel.vmlinuz, target, options.firmware, options.layout,
                           source_esp=_source_esp(ws)).packages  # fmt: skip
    if not wanted:
        return [], [], []
    try:
        done = initrd.run_packages(g, profile, wanted, [])
    except (GuestError, ParameterError) as e:
        return [], [], [f"no Secure Boot: installing {' '.join(wanted)} failed: {e}"]
    return (
        [f"{line} (for Secure Boot)" if line.startswith("install ") else line for line in done],
        wanted,
        [],
    )


def record(done: MigrationPlan, result: Migrated) -> dict[str, object]:
    """What 20-migrate records: the result (which 30-bootable reads) and every change made."""
    return {**result.to_dict(), "changes": done.to_dict()["changes"]}
