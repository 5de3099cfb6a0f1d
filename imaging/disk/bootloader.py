"""Stage 30-bootable, part 2: GRUB 2 from the conversion host, installed without mounting anything.

The original procedure's biggest headache was GRUB legacy's stage files, which a cloud instance
never had. We use the host's GRUB 2 instead: ``grub-mkimage`` builds a core image that finds the
root filesystem by UUID; the MBR gets boot.img's first 440 bytes (the partition table and disk
signature after them stay), the core image goes into the gap before partition 1 (sector 1, where
boot.img looks for it by default), and GRUB's modules and a grub.cfg go into a directory of
their own in the guest's /boot (through debugfs, or a mount for XFS and btrfs). The menu's
default entry follows the guest's kernel updates (kernel_links.py); then one entry per kernel
found in the guest's /boot, with root=UUID and consoles on tty0 and ttyS0.

On a GPT disk (``--firmware`` uefi or hybrid) there is no gap before partition 1: the BIOS core
image goes into the BIOS boot partition, whose first sector boot.img is told (as grub-install's
grub-setup does), and what boots under UEFI goes into the EFI system partition (uefi.py, esp.py).
Both read the one grub.cfg.
"""

from __future__ import annotations

import difflib
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from imaging import tools
from imaging.config import check_kernel_args
from imaging.disk import esp as esp_partition
from imaging.disk import filesystems, uefi
from imaging.disk.bootable import DiskLayout
from imaging.disk.debugfs import READ_LIMIT, ExtGuest, safe_name
from imaging.disk.filesystems import MountedFiles
from imaging.errors import GuestError
from imaging.records import Record
from imaging.sparse import part_path
from imaging.tables import Table
from imaging.workspace import Workspace

GRUB_PC = Path("/usr/lib/grub/i386-pc")
# This GRUB's own directory, which no tool of the guest writes: its update-grub or grub2-mkconfig
# rewrite /boot/grub/grub.cfg or /boot/grub2/grub.cfg for the guest's own GRUB build (RHEL's with
# a blscfg command the host's lacks; Ubuntu's with the source disk's PARTUUID), so the menu this
# GRUB reads must not be there. The guest's kernel updates reach it through kernel_links.py.
GRUB_DIR = "/boot/imaging-grub"
# Built into the core image: enough to read the partition and find the root filesystem (with
# the filesystem's own module, filesystems.py); the rest (normal, linux, ...) loads from
# GRUB_DIR/i386-pc.
CORE_MODULES = ["biosdisk", "part_msdos", "part_gpt", "search_fs_uuid"]
# Where boot.img keeps the sector of the core image's first sector, and where that first sector
# (diskboot.img) keeps the blocklist of the rest (GRUB's boot.S and diskboot.S).
_BOOT_KERNEL_SECTOR = 0x5C
_DISKBOOT_BLOCKLIST = 0x200 - 12
# What read_back reads of a kernel or an initrd: real ones are tens of MiB, a few hundred at most.
BOOT_FILE_LIMIT = 1 << 30
_SAFE_PREFIX = re.compile(r"(/[A-Za-z0-9._+@-]+)+")
INITRD_PATTERNS = ("initrd.img-{v}", "initrd-{v}.img", "initramfs-{v}.img", "initrd-{v}", "initrd-{v}.gz")


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: str
    initrd: str | None

    @property
    def xen(self) -> bool:
        return "xen" in self.version.lower()


def version_key(version: str) -> list[tuple[int, int | str]]:
    # Numeric parts compare as numbers: 2.6.18-348 > 2.6.18-92.
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-_+~]", version)]


def find_kernels(guest: ExtGuest | MountedFiles) -> list[Kernel]:
    """Kernels and their initrds in the guest's /boot, newest first, Xen-only kernels last."""
    try:
        entries = guest.entries("/boot")
    except GuestError:
        raise GuestError("the guest has no /boot directory, so no kernel to boot") from None
    names = {e.name for e in entries if (e.is_file or e.is_symlink) and safe_name(e.name)}
    kernels = []
    for name in sorted(names):
        m = re.fullmatch(r"(vmlinuz|vmlinux|kernel)-(.+)", name)
        if not m or name.endswith((".sig", ".hmac")):
            continue
        version = m.group(2)
        initrd = next((p.format(v=version) for p in INITRD_PATTERNS if p.format(v=version) in names), None)
        kernels.append(Kernel(version, f"/boot/{name}", f"/boot/{initrd}" if initrd else None))
    if not kernels:
        raise GuestError("no kernel in the guest's /boot (looked for vmlinuz-<version>)")
    kernels.sort(key=lambda k: version_key(k.version), reverse=True)
    # A Xen-only kernel does not boot as a KVM or VirtualBox guest: offered only if nothing else is.
    return [k for k in kernels if not k.xen] or kernels


def kernel_table(kernels: list[Kernel]) -> Table:
    return Table(
        [(k.version, k.vmlinuz, k.initrd or "(none)", k.xen) for k in kernels],
        ["version", "kernel", "initrd", "xen"],
    )


def root_args(instance: dict[str, object]) -> list[str]:
    """What the kernel needs to mount the root: a btrfs root in a subvolume that is not the default
    one is named (Fedora's ``root``); the default one is not, so a rollback that changes the
    default (snapper on openSUSE) still chooses what boots."""
    subvolume = str(instance.get("subvolume") or "")
    return (
        [f"rootflags=subvol={subvolume}"] if subvolume and not instance.get("subvolume_is_default") else []
    )


def instance_kernels(ws: Workspace) -> list[Kernel]:
    """:func:`find_kernels` of the acquired instance, read-only."""
    instance = ws.result("00-acquire")
    with filesystems.files(ws.instance, str(instance["fs_type"]), subvolume=str(instance.get("subvolume") or ""),
                           writable=False) as guest:  # fmt: skip
        return find_kernels(guest)


def _title(guest: ExtGuest | MountedFiles) -> str:
    text = guest.read_text("/etc/os-release") or ""
    m = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', text, re.MULTILINE)
    name = re.sub(r"[^A-Za-z0-9 ._()+/-]", "", m.group(1) if m else "")[:60].strip()
    return name or "Linux"


def grub_config(
    kernels: list[Kernel],
    uuid: str,
    *,
    title: str = "Linux",
    timeout: int = 1,
    kernel_args: str = "",
    legacy_menu: str | None = None,
    prefix: str = "",
    follow: tuple[str, str] | None = None,
) -> str:
    """grub.cfg for the kernels, root by UUID, menu and kernel consoles on both screen and serial.
    ``prefix``: where the guest's / is as GRUB reads the filesystem (a btrfs root subvolume's
    path from the top level, which GRUB starts from). The default entry is the one that follows
    the guest's own kernel updates: ``follow``'s (kernel, initrd) links, else the guest's GRUB
    legacy menu (which its grubby keeps), else the first kernel."""
    if not re.fullmatch(r"[0-9a-fA-F-]{36}", uuid):
        raise GuestError(f"filesystem UUID {uuid!r} is not a UUID")
    check_kernel_args(kernel_args)
    for path in follow or ():
        if not _SAFE_PREFIX.fullmatch(path):
            raise GuestError(f"the kernel link {path!r} has a name GRUB's menu cannot carry")
    args = " ".join(["ro", "console=tty0", "console=ttyS0,115200n8", *kernel_args.split()])
    lines = [
        "# Written by imaging (30-bootable) for the GRUB it installed, which reads this file only: the",
        "# guest's own /boot/grub or /boot/grub2 is not read. The first entry boots the kernel the guest",
        "# installed last (through the links its kernel tools keep, or its own GRUB legacy menu); then",
        "# one entry per kernel found in /boot at conversion, the one chosen for the target first.",
        "# Kernel arguments: edit the linux lines here.",
        "# Root is found by filesystem UUID, so the disk boots on any controller (IDE, SATA, virtio).",
        "serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1",
        "terminal_input serial console",
        "terminal_output serial console",
        "set default=0",
        f"set timeout={int(timeout)}",
        f"search --no-floppy --fs-uuid --set=root {uuid}",
        "",
    ]
    entries = [(f"{title} ({k.version})", k.vmlinuz, k.initrd) for k in kernels]
    if follow:
        entries.insert(0, (f"{title} (newest installed kernel: {follow[0]})", *follow))
    for name, vmlinuz, initrd in entries:
        lines += [
            f"menuentry '{name}' {{",
            f"\tsearch --no-floppy --fs-uuid --set=root {uuid}",
            f"\tlinux {prefix}{vmlinuz} root=UUID={uuid} {args}",
        ]
        if initrd:
            lines.append(f"\tinitrd {prefix}{initrd}")
        lines += ["}", ""]
    if legacy_menu:
        # The menu the guest's own tools keep (GRUB legacy syntax, which GRUB 2 can read): first
        # when nothing else follows the guest's kernel updates.
        legacy = [
            f"menuentry 'Boot menu of the guest ({legacy_menu})' {{",
            f"\tlegacy_configfile {prefix}{legacy_menu}",
            "}",
            "",
        ]
        at = len(lines) if follow else lines.index("") + 1
        lines[at:at] = legacy
    return "\n".join(lines)


@dataclass(frozen=True)
class GrubInstall(Record):
    grub: str
    core_image_bytes: int
    core_image_room: int
    modules: int
    config_path: str
    entries: int
    default_kernel: str
    config_diff: str
    read_back: str = ""  # what GRUB's own filesystem driver read of the placed disk (read_back)
    firmware: str = "bios"
    uefi: str = ""  # what boots the disk under UEFI: the guest's signed chain, or this host's GRUB
    secure_boot: bool = False
    esp: dict[str, object] = field(default_factory=dict)  # the EFI system partition made (esp.py)


def _crc(disk: Path, path: str, part: str = "msdos1") -> str:
    result = tools.run(
        ["grub-fstest", disk, "crc", f"(loop0,{part}){path}"], ok_codes=range(256), timeout=300
    )
    crc = result.stdout.strip()
    if result.exit_code != 0 or not re.fullmatch(r"[0-9a-f]{8}", crc):
        detail = result.stderr_tail(1).removeprefix("grub-fstest: ") or f"exit {result.exit_code}"
        raise GuestError(f"this host's GRUB cannot read {path} from the placed filesystem: {detail}")
    return crc


def read_back(
    disk: Path,
    paths: list[str],
    config_path: str,
    config: str,
    follow: list[str] | None = None,
    part: str = "msdos1",
) -> str:
    """Read the boot files of partition 1 through GRUB's own filesystem drivers (grub-fstest, in
    user space): a filesystem feature this host's GRUB cannot read (an XFS or btrfs newer than
    it) is one line here, not a disk that stops at GRUB's prompt in the boot check. ``follow``:
    links GRUB must resolve, each to the same bytes as the path of ``paths`` at its place."""
    tools.require_tools("grub-fstest", reason="read the disk as GRUB does", hint="apt install grub-common")
    crcs = [_crc(disk, path, part) for path in paths]
    found = [f"{path} (crc {crc})" for path, crc in zip(paths, crcs, strict=True)]
    for link, path, crc in zip(follow or [], paths, crcs, strict=False):
        if _crc(disk, link, part) != crc:
            raise GuestError(f"GRUB does not read {link} as {path}: the link leads elsewhere")
        found.append(f"{link} = {path}")
    written = tools.run(["grub-fstest", disk, "cat", f"(loop0,{part}){config_path}"], ok_codes=range(256),
                        timeout=60, max_output=READ_LIMIT)  # fmt: skip
    if written.exit_code != 0 or written.stdout != config:
        raise GuestError(f"GRUB does not read back {config_path} as it was written")
    return "; ".join([*found, f"{config_path} as written"])


def _grub_version() -> str:
    return tools.check_output(["grub-mkimage", "--version"], timeout=30).strip()


def install_grub(
    ws: Workspace,
    layout: DiskLayout | int,
    uuid: str,
    *,
    timeout: int = 1,
    kernel_args: str = "",
) -> GrubInstall:
    """Install GRUB 2 on the disk being built (``work/.disk.raw.part``) for the firmware its
    layout boots under (an int: an MBR disk whose partition 1 starts at that sector)."""
    platforms: tuple[str, ...]
    if isinstance(layout, int):
        start_sector, scheme, platforms = layout, "dos", ("bios",)
    else:
        start_sector, scheme, platforms = layout.start_sector, layout.scheme, layout.platforms
    tools.require_tools(
        "grub-mkimage",
        "debugfs",
        reason="install GRUB",
        hint="apt install grub-pc-bin grub-common e2fsprogs",
    )
    if not (GRUB_PC / "boot.img").exists():
        raise GuestError(f"{GRUB_PC}/boot.img is missing (apt install grub-pc-bin)")
    disk = part_path(ws.disk)
    instance = ws.result("00-acquire") if ws.has_result("00-acquire") else {}
    fs_type = str(instance.get("fs_type") or "ext4")
    subvolume = str(instance.get("subvolume") or "")
    prefix = f"/{subvolume}" if subvolume else ""
    if prefix and not _SAFE_PREFIX.fullmatch(prefix):
        raise GuestError(f"the btrfs root subvolume {subvolume!r} has a name GRUB's menu cannot carry")
    # 20-migrate (when it ran) says which arguments the guest needs and what GRUB follows.
    migration = ws.result("20-migrate") if ws.has_result("20-migrate") else {}
    grub_dir = GRUB_DIR
    legacy = migration.get("grub_legacy_conf") or None
    args = " ".join(
        a for a in (*root_args(instance), str(migration.get("kernel_args") or ""), kernel_args) if a
    )
    # The kernel 20-migrate chose for the target (it has the target's drivers) boots by default.
    chosen = str(migration.get("kernel") or "")
    links = migration.get("kernel_links") or {}
    assert isinstance(links, dict)
    follow = (str(links["kernel"]), str(links["initrd"])) if links.get("kernel") else None
    fw = migration.get("firmware") or {}
    assert isinstance(fw, dict)
    secure = bool(fw.get("secure_boot")) and "uefi" in platforms
    cfg_path = f"{grub_dir}/grub.cfg"
    fs_module = filesystems.of(fs_type).GRUB_MODULE
    core_bytes = b""
    if "bios" in platforms:
        with tempfile.TemporaryDirectory(prefix="grub-") as tmp:
            early = Path(tmp) / "early.cfg"
            early.write_text(f"search.fs_uuid {uuid} root\nset prefix=($root){prefix}{grub_dir}\n")
            core = Path(tmp) / "core.img"
            tools.run(["grub-mkimage", "-O", "i386-pc", "-o", core, "-c", early, "-p", f"{prefix}{grub_dir}",
                       *CORE_MODULES, fs_module], timeout=120)  # fmt: skip
            core_bytes = core.read_bytes()
    if isinstance(layout, DiskLayout) and layout.bios_boot_sectors:
        core_at, room = layout.bios_boot_start, layout.bios_boot_sectors * 512
        where = "the BIOS boot partition"
    else:
        core_at, room = 1, (start_sector - 1) * 512
        where = "the gap before partition 1 (the aligned layout has room for it)"
    if len(core_bytes) > room:
        raise GuestError(
            f"GRUB's core image for {fs_type} ({len(core_bytes)} bytes) does not fit in the {room} bytes of {where}"
        )
    modules = {}
    if "bios" in platforms:
        modules.update({f"{grub_dir}/i386-pc/{p.name}": p.read_bytes() for p in sorted(GRUB_PC.iterdir())
                        if p.suffix in (".mod", ".lst") and safe_name(p.name)})  # fmt: skip
    if "uefi" in platforms and not secure:
        modules.update({f"{grub_dir}/x86_64-efi/{name}": data for name, data in uefi.modules().items()
                        if safe_name(name)})  # fmt: skip
    directories = [grub_dir, *sorted({p.rsplit("/", 1)[0] for p in modules})]
    written = [str(o) for o in instance.get("write_options") or []]
    esp_files: dict[str, bytes] = {}
    with filesystems.files(disk, fs_type, offset=start_sector * 512, subvolume=subvolume, options=written,
                           writable=True) as guest:  # fmt: skip
        kernels = find_kernels(guest)
        sizes = {f"/boot/{e.name}": e.size for e in guest.entries("/boot") if e.is_file}
        kernels.sort(key=lambda k: k.version != chosen)
        config = grub_config(kernels, uuid, title=_title(guest), timeout=timeout, kernel_args=args,
                             legacy_menu=legacy, prefix=prefix, follow=follow)  # fmt: skip
        old = guest.read_text(cfg_path)
        guest.install_files({**modules, cfg_path: config.encode()}, directories=directories)
        if "uefi" in platforms:
            esp_files, how = _uefi_files(guest, ws, fw, secure, uuid, f"{prefix}{grub_dir}", fs_module)
    if core_bytes:
        _write_bios_boot(disk, core_bytes, core_at)
    esp_made: dict[str, object] = {}
    if esp_files and isinstance(layout, DiskLayout):
        source = ws.esp if instance.get("esp") else None
        made = esp_partition.build(disk, layout.esp_start * 512, layout.esp_sectors * 512,
                                   str(fw.get("esp_uuid") or ""), esp_files, source)  # fmt: skip
        esp_made = made.to_dict()
    diff = "".join(
        difflib.unified_diff(
            (old or "").splitlines(keepends=True),
            config.splitlines(keepends=True),
            f"a{cfg_path}" if old is not None else "/dev/null",
            f"b{cfg_path}",
        )
    )
    default = kernels[0]
    boot_files = [default.vmlinuz, *([default.initrd] if default.initrd else [])]
    for path in boot_files:
        if sizes.get(path, 0) > BOOT_FILE_LIMIT:
            raise GuestError(
                f"{path} in the guest is {sizes[path]:,} bytes: more than a kernel or initrd can be"
            )
    read = read_back(disk, [f"{prefix}{p}" for p in boot_files], f"{prefix}{cfg_path}", config,
                     [f"{prefix}{p}" for p in follow or ()], part="gpt1" if scheme == "gpt" else "msdos1")  # fmt: skip
    return GrubInstall(
        grub=_grub_version(),
        core_image_bytes=len(core_bytes),
        core_image_room=room,
        modules=len(modules),
        config_path=cfg_path,
        entries=len(kernels),
        default_kernel=f"{follow[0]} (now {kernels[0].vmlinuz})" if follow else kernels[0].vmlinuz,
        config_diff=diff,
        read_back=read,
        firmware=layout.firmware if isinstance(layout, DiskLayout) else "bios",
        uefi=how if esp_files else "",
        secure_boot=secure,
        esp=esp_made,
    )


def _write_bios_boot(disk: Path, core: bytes, core_at: int) -> None:
    """boot.img's code into sector 0 (the partition table and disk signature after it stay), told
    where the core image starts; the core image at ``core_at``, its blocklist told where the rest
    of it follows (grub-setup's two patches)."""
    boot = bytearray((GRUB_PC / "boot.img").read_bytes()[:440])
    struct.pack_into("<Q", boot, _BOOT_KERNEL_SECTOR, core_at)
    patched = bytearray(core)
    start, length = struct.unpack_from("<QH", patched, _DISKBOOT_BLOCKLIST)
    if start != 2 or length * 512 + 512 < len(core) - 511:
        raise GuestError(f"grub-mkimage's core image has an unexpected blocklist ({start}, {length})")
    struct.pack_into("<Q", patched, _DISKBOOT_BLOCKLIST, core_at + 1)
    with open(disk, "r+b") as f:
        f.write(boot)
        f.seek(core_at * 512)
        f.write(patched)


def _uefi_files(guest: ExtGuest | MountedFiles, ws: Workspace, fw: dict[str, object], secure: bool, uuid: str,
                grub_dir: str, fs_module: str) -> tuple[dict[str, bytes], str]:  # fmt: skip
    """The ESP's boot files, and a line saying what boots under UEFI."""
    if secure:
        found = {}
        for role in ("shim", "grub", "mok"):
            path = str(fw.get(role) or "")
            data = _chain_file(guest, ws, path) if path else None
            if data is None and role != "mok":
                raise GuestError(
                    f"the guest's signed {role} {path or '(none)'} cannot be read from the placed disk"
                )
            found[role] = data
        files = uefi.signed_chain_files(found["shim"], found["grub"], found["mok"], uuid, grub_dir)  # type: ignore[arg-type]
        return files, f"the guest's shim ({fw.get('shim')}) and signed GRUB ({fw.get('grub')}): Secure Boot"
    vendor = re.sub(r"[^a-z0-9._-]", "", _os_id(guest))[:20] or "linux"
    image = uefi.host_grub_image(uuid, grub_dir, fs_module)
    return uefi.host_grub_files(
        image, vendor
    ), f"this host's GRUB for x86_64-efi ({_grub_version()}): no Secure Boot"


def _chain_file(guest: ExtGuest | MountedFiles, ws: Workspace, path: str) -> bytes | None:
    """A file of the guest's signed chain: in its root, or on the source's ESP (/boot/efi/...)."""
    data = guest.read_bytes(path, limit=64 << 20)
    source = ws.esp if ws.has_result("00-acquire") and ws.result("00-acquire").get("esp") else None
    if data is None and path.startswith("/boot/efi/") and source is not None and source.is_file():
        data = esp_partition.read_file(source, path.removeprefix("/boot/efi"))
    return data


def _os_id(guest: ExtGuest | MountedFiles) -> str:
    text = guest.read_text("/etc/os-release") or ""
    m = re.search(r'^ID="?([A-Za-z0-9._-]+)"?', text, re.MULTILINE)
    return m.group(1).lower() if m else ""
