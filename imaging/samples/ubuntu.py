"""``sample:ubuntu24-like``: an Ubuntu 24.04 LTS cloud instance as far as a conversion can see,
built from Debian 13's packages (no Ubuntu mirror is reachable here; Debian 13's ages are
Noble's: systemd 257 against 255, initramfs-tools, netplan, cloud-init).

The userland is Debian's (mmdebstrap), laid out and configured as Canonical's cloud image
(``noble-server-cloudimg-amd64.img``) is:

- os-release of Ubuntu 24.04.1 LTS (``ID=ubuntu``, ``ID_LIKE=debian``, ``VERSION_CODENAME`` and
  ``UBUNTU_CODENAME`` noble), ``/etc/lsb-release``, ``/etc/debian_version`` ``trixie/sid`` (Ubuntu
  has one too, naming the Debian it forked from), ``/etc/cloud/build.info``;
- the image's disk: GPT, partition 14 BIOS boot, 15 the ESP (FAT32 ``UEFI``, GRUB's stub config
  in ``EFI/ubuntu``), 16 ``/boot`` (ext4 ``BOOT``, XBOOTLDR type, as 24.04 has a separate /boot),
  and partition 1 the root (ext4 ``cloudimg-rootfs``) at the end, at the image's own offsets;
  fstab by LABEL, as the image has it. Every filesystem is made by the guest's own tools;
- netplan (Debian's ``netplan.io``) rendering for systemd-networkd, with cloud-init's
  ``/etc/netplan/50-cloud-init.yaml`` (mode 600, DHCP on eth0, pinned to the cloud's MAC with
  ``match`` and ``set-name``); no ifupdown, no dhclient; systemd-resolved;
- two kernels, Debian's cloud one (standing for ``-virtual``/``-kvm``: no AHCI, no e1000) and the
  generic one (for ``-generic``), initramfs-tools' initrds, and Ubuntu's kernel links in /boot
  (``vmlinuz``, ``initrd.img`` and their ``.old``), made by the guest's own linux-update-symlinks
  from Ubuntu's ``/etc/kernel-img.conf`` (``link_in_boot``): the generic kernel was installed
  first, then the cloud one, which the links name; none in /;
- GRUB's settings as the image has them (``/etc/default/grub``, ``grub.d/50-cloudimg-settings.cfg``
  with ``console=tty1 console=ttyS0``, ``40-force-partuuid.cfg``) and ``/boot/grub/grub.cfg`` as
  update-grub writes it there (paths relative to the /boot filesystem, root by PARTUUID);
- the cloud user ``ubuntu`` (uid 1000) with cloud-init's sudoers file, ``/var/log/auth.log``,
  cloud-init's dhcpcd lease (networkd keeps its own leases in /run only, never on the disk).

What 00-acquire must do: find the root among four partitions (partition 1, last on the disk),
merge the BOOT filesystem into it (fstab names it by LABEL), copy the ESP aside; 20-migrate
comments out the /boot entry, and the ESP's too unless the disk boots UEFI (then the new ESP's
by its volume id), and keeps the root's LABEL.

The guest's check at every boot (debian.py's) adds: eth0 configured by systemd-networkd from
netplan's file, with networkd's lease; no ifupdown; /boot's files on the root and nothing
mounted on /boot; the ESP mounted on /boot/efi exactly when fstab says; Ubuntu's /boot links
resolving; initramfs-tools' initrd for the running kernel; the root ext4.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from imaging import tools
from imaging.errors import ImagingError
from imaging.samples import debian, layouts
from imaging.samples.kvm import sample_uuid, write
from imaging.sparse import atomic_path, create_sparse

NAME = "ubuntu24-like"
ROOT_UUID = sample_uuid(NAME)
BOOT_UUID = sample_uuid(f"{NAME}:boot")
ESP_ID = sample_uuid(f"{NAME}:esp")[:8].upper()
ROOT_PARTUUID = layouts._uuid(NAME, "p1")
# debian.PACKAGES without ifupdown and dhclient (netplan renders for networkd, whose DHCP client is
# its own) and with what the image has besides: netplan, resolved, initramfs-tools, the ESP's
# mkfs (dosfstools), the generic kernel beside the cloud one, and the signed shim and GRUB that
# Ubuntu's cloud images ship for Secure Boot (Debian's here: signed by Microsoft and Debian).
BASE = ("systemd-sysv", "linux-image-cloud-amd64", "linux-image-amd64", "initramfs-tools", "netplan.io",
        "systemd-resolved", "cloud-init", "openssh-server", "iproute2", "sudo", "netbase", "e2fsprogs",
        "dosfstools", "shim-signed", "grub-efi-amd64-signed")  # fmt: skip
MAC = "fa:16:3e:4c:2b:91"  # the cloud's; cloud-init pins the interface to it (10-clean un-pins it)
NETPLAN_PATH = "/etc/netplan/50-cloud-init.yaml"
# As cloud-init 24 writes it on Noble (keys sorted, four spaces).
NETPLAN = f"""\
# This file is generated from information provided by the datasource.  Changes
# to it will not persist across an instance reboot.  To disable cloud-init's
# network configuration capabilities, write a file
# /etc/cloud/cloud.cfg.d/99-disable-network-config.cfg with the following:
# network: {{config: disabled}}
network:
    ethernets:
        eth0:
            dhcp4: true
            match:
                macaddress: {MAC}
            set-name: eth0
    version: 2
"""
INSTANCE = debian.Instance(
    user="ubuntu",
    gecos="Ubuntu",
    base=BASE,
    network=((NETPLAN_PATH, NETPLAN, 0o600),),
    # Noble's cloud-init gets its first address with dhcpcd, whose lease stays on the disk.
    lease=("/var/lib/dhcpcd/eth0.lease", "lease eth0 ip_address=10.31.7.19\n"),
)
# As the image has it (livecd-rootfs writes it): all by LABEL.
FSTAB = """\
LABEL=cloudimg-rootfs\t/\t ext4\tdiscard,commit=30,errors=remount-ro\t0 1
LABEL=BOOT\t/boot\text4\tdefaults\t0 2
LABEL=UEFI\t/boot/efi\tvfat\tumask=0077\t0 1
"""
OS_RELEASE = """\
PRETTY_NAME="Ubuntu 24.04.1 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
VERSION="24.04.1 LTS (Noble Numbat)"
VERSION_CODENAME=noble
ID=ubuntu
ID_LIKE=debian
HOME_URL="https://www.ubuntu.com/"
SUPPORT_URL="https://help.ubuntu.com/"
BUG_REPORT_URL="https://bugs.launchpad.net/ubuntu/"
PRIVACY_POLICY_URL="https://www.ubuntu.com/legal/terms-and-policies/privacy-policy"
UBUNTU_CODENAME=noble
LOGO=ubuntu-logo
"""
LSB_RELEASE = """\
DISTRIB_ID=Ubuntu
DISTRIB_RELEASE=24.04
DISTRIB_CODENAME=noble
DISTRIB_DESCRIPTION="Ubuntu 24.04.1 LTS"
"""
BUILD_INFO = "build_name: server\nserial: 20240821\n"
# Ubuntu's: kernels' postinst hooks keep vmlinuz/initrd.img (and .old) links, in /boot.
KERNEL_IMG_CONF = """\
# Kernel image management overrides
# See kernel-img.conf(5) for details
do_symlinks = yes
do_bootloader = no
do_initrd = yes
link_in_boot = yes
"""
DEFAULT_GRUB = """\
# If you change this file, run 'update-grub' afterwards to update
# /boot/grub/grub.cfg.
# For full documentation of the options in this file, see:
#   info -f grub -n 'Simple configuration'

GRUB_DEFAULT=0
GRUB_TIMEOUT_STYLE=hidden
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=`( . /etc/os-release; echo ${NAME:-Ubuntu} ) 2>/dev/null || echo Ubuntu`
GRUB_CMDLINE_LINUX_DEFAULT="quiet splash"
GRUB_CMDLINE_LINUX=""
"""
CLOUDIMG_GRUB = """\
# Cloud Image specific Grub settings for Generic Cloud Images
# CLOUD_IMG: This file was created/modified by the Cloud Image build process

# Set the recordfail timeout
GRUB_RECORDFAIL_TIMEOUT=0

# Do not wait on grub prompt
GRUB_TIMEOUT=0

# Set the default commandline
GRUB_CMDLINE_LINUX_DEFAULT="console=tty1 console=ttyS0"

# Set the grub console type
GRUB_TERMINAL=console
"""
# The image boots its root by partition UUID, first without an initrd.
FORCE_PARTUUID = f"""\
# Force the root by partition UUID; boot without an initrd first.
GRUB_FORCE_PARTUUID={ROOT_PARTUUID}
"""
# update-grub's menu, trimmed to what matters here: on the BOOT filesystem, so the kernel's
# paths are relative to it, and root= names the root partition, not a filesystem.
GRUB_CFG = """\
#
# DO NOT EDIT THIS FILE
#
# It is automatically generated by grub-mkconfig using templates
# from /etc/grub.d and settings from /etc/default/grub
#

### BEGIN /etc/grub.d/00_header ###
if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
set default="0"
terminal_input console
terminal_output console
set timeout_style=hidden
set timeout=0
### END /etc/grub.d/00_header ###

### BEGIN /etc/grub.d/10_linux ###
menuentry 'Ubuntu' --class ubuntu --class gnu-linux --class gnu --class os {{
	recordfail
	load_video
	gfxmode $linux_gfx_mode
	insmod gzio
	insmod part_gpt
	insmod ext2
	search --no-floppy --fs-uuid --set=root {boot}
	linux	/vmlinuz-{version} root=PARTUUID={partuuid} ro  console=tty1 console=ttyS0
	initrd	/initrd.img-{version}
}}
### END /etc/grub.d/10_linux ###
"""
# GRUB's stub on the ESP: it finds the BOOT filesystem and reads the menu there.
ESP_GRUB_CFG = """\
search.fs_uuid {boot} root
set prefix=($root)'/grub'
configfile $prefix/grub.cfg
"""
SUDOERS = "\n# User rules for ubuntu\nubuntu ALL=(ALL) NOPASSWD:ALL\n"

# From inside the booted guest: what netplan, the merged /boot and Ubuntu's links promise.
CHECKS = r"""check "eth0 configured by systemd-networkd from netplan's file" sh -c 'networkctl status eth0 --no-pager | grep -q "Network File: /run/systemd/network/10-netplan-eth0.network"'
check "networkd holds eth0's DHCP lease" sh -c 'test -s /run/systemd/netif/leases/$(cat /sys/class/net/eth0/ifindex)'
check "no ifupdown" sh -c '! test -e /usr/sbin/ifup && ! test -e /etc/network/interfaces'
check "/boot merged into the root" sh -c 'test "$(findmnt -no TARGET -T /boot)" = / && ls /boot/vmlinuz-*'
check "the ESP as fstab says: mounted (FAT) where its line is, else not at all" sh -c 'if grep -Eq "^[^#].*/boot/efi" /etc/fstab; then ls /boot/efi/EFI >/dev/null && findmnt -no FSTYPE /boot/efi | grep -q vfat; else ! findmnt /boot/efi; fi'
check "Ubuntu's /boot links resolve, none in /" sh -c 'for l in vmlinuz vmlinuz.old initrd.img initrd.img.old; do test -L /boot/$l && test -s /boot/$l || exit 1; done; ! test -e /vmlinuz'
check "initramfs-tools' initrd for the running kernel" sh -c 'test -s /boot/initrd.img-$(uname -r) && test -x /usr/sbin/update-initramfs'
""" + layouts._is("/", "ext4")

# The image's partitions (sectors), as sfdisk lists noble-server-cloudimg-amd64.img.
BIOS_START, BIOS_SECTORS = 2048, 8192
ESP_START, ESP_SECTORS = 10240, 217088
BOOT_START, BOOT_SECTORS = 227328, 1869825
ROOT_START = 2099200
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
XBOOTLDR = "BC13C2FF-59E6-4262-A352-B275FD6F7172"


def kernel_versions(tree: Path) -> list[str]:
    return sorted(p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*"))


def stage(tree: Path) -> None:
    """The Debian tree of debian.stage_debian_root, then Ubuntu's files and kernel links."""
    debian.stage_debian_root(tree, "debian13", fstab=FSTAB, checks=CHECKS, instance=INSTANCE)
    if (tree / "usr" / "sbin" / "ifup").exists() or not (tree / "usr" / "sbin" / "netplan").exists():
        raise ImagingError(
            "mmdebstrap installed ifupdown, or no netplan: the sample would not be Ubuntu-like"
        )
    versions = kernel_versions(tree)
    if len(versions) != 2:
        raise ImagingError(f"expected the cloud and the generic kernel in /boot, found {versions}")
    etc = tree / "etc"
    write(tree / "usr" / "lib" / "os-release", OS_RELEASE)
    write(etc / "lsb-release", LSB_RELEASE)
    write(etc / "debian_version", "trixie/sid\n")
    write(etc / "issue", "Ubuntu 24.04.1 LTS \\n \\l\n\n")
    write(etc / "issue.net", "Ubuntu 24.04.1 LTS\n")
    write(etc / "cloud" / "build.info", BUILD_INFO)
    write(etc / "sudoers.d" / "90-cloud-init-users", "# Created by cloud-init v. 24.2 on Wed, 20 Nov 2026 10:00:41 +0000\n"
          + SUDOERS, 0o440)  # fmt: skip
    write(etc / "default" / "grub", DEFAULT_GRUB)
    write(etc / "default" / "grub.d" / "50-cloudimg-settings.cfg", CLOUDIMG_GRUB)
    write(etc / "default" / "grub.d" / "40-force-partuuid.cfg", FORCE_PARTUUID)
    _cloud_user(tree)
    _networkd(tree)
    _kernel_links(tree, versions)
    write(tree / "boot" / "grub" / "grub.cfg",
          GRUB_CFG.format(boot=BOOT_UUID, version=_linked(tree, "vmlinuz"), partuuid=ROOT_PARTUUID), 0o444)  # fmt: skip
    (tree / "boot" / "efi").mkdir(exist_ok=True)  # the ESP's mount point, on the BOOT filesystem


def _cloud_user(tree: Path) -> None:
    """cloud-init's default user is Ubuntu's (its first boot on the target keeps ``ubuntu``)."""
    cfg = tree / "etc" / "cloud" / "cloud.cfg"
    text = cfg.read_text()
    new = text.replace("name: debian", "name: ubuntu").replace("gecos: Debian", "gecos: Ubuntu")
    if new == text:
        raise ImagingError("cloud-init's cloud.cfg names no default user debian: its layout changed")
    cfg.write_text(new)


def _networkd(tree: Path) -> None:
    """systemd-networkd and its wait-online enabled, as on Ubuntu (Debian leaves them off):
    netplan only writes networkd's configuration."""
    system = tree / "etc" / "systemd" / "system"
    units = "/usr/lib/systemd/system"
    for wants, unit in (("multi-user.target.wants", "systemd-networkd.service"),
                        ("sockets.target.wants", "systemd-networkd.socket"),
                        ("network-online.target.wants", "systemd-networkd-wait-online.service"),
                        ("sysinit.target.wants", "systemd-resolved.service")):  # fmt: skip
        link = system / wants / unit
        if not (tree / units.lstrip("/") / unit).exists():
            raise ImagingError(f"the guest has no {unit}")
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f"{units}/{unit}")


def _kernel_links(tree: Path, versions: list[str]) -> None:
    """Ubuntu's links, made by the guest's own linux-update-symlinks with Ubuntu's
    kernel-img.conf: the generic kernel installed first, the cloud one after it (the default)."""
    write(tree / "etc" / "kernel-img.conf", KERNEL_IMG_CONF)
    for name in ("vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"):
        (tree / name).unlink(missing_ok=True)  # Debian's, in /
    generic = [v for v in versions if not v.endswith("-cloud-amd64")]
    cloud = [v for v in versions if v.endswith("-cloud-amd64")]
    if len(generic) != 1 or len(cloud) != 1:
        raise ImagingError(f"expected a cloud and a generic kernel, found {versions}")
    for version in (*generic, *cloud):
        debian.guest_tool(tree, ["/usr/bin/linux-update-symlinks", "install", version, f"/boot/vmlinuz-{version}"],
                          binds=["--bind", tree / "boot", "/boot"])  # fmt: skip
    if _linked(tree, "vmlinuz") != cloud[0] or _linked(tree, "vmlinuz.old") != generic[0]:
        raise ImagingError("linux-update-symlinks did not make Ubuntu's links in /boot")


def _linked(tree: Path, link: str) -> str:
    """The kernel version a /boot link names (relative, as linux-update-symlinks makes it)."""
    target = os.readlink(tree / "boot" / link)
    return target.removeprefix("vmlinuz-").removeprefix("initrd.img-")


def disk(tree: Path, dest: Path) -> None:
    """GPT as the cloud image's: 14 BIOS boot, 15 ESP, 16 /boot, then 1 the root at the end."""
    # /boot's files go to partition 16 only: the root's /boot is the empty mount point.
    kernels = tree.parent / "boot-files"
    os.rename(tree / "boot", kernels)
    (tree / "boot").mkdir(mode=0o755)
    try:
        root_bytes = layouts._fs_bytes(tree)
        create_sparse(dest, ROOT_START * 512 + root_bytes + layouts.MIB)  # GPT's backup at the end
        layouts._partition(dest, _table(dest, root_bytes // 512))
        # livecd-rootfs's options for cloudimg-rootfs: 4 KiB blocks, an inode per 8 KiB, no reserve.
        _mke2fs(tree, tree, dest, ["-b", "4096", "-i", "8192", "-m", "0", "-L", "cloudimg-rootfs", "-U", ROOT_UUID],
                ROOT_START * 512, root_bytes)  # fmt: skip
        _mke2fs(tree, kernels, dest, ["-L", "BOOT", "-U", BOOT_UUID], BOOT_START * 512, BOOT_SECTORS * 512)
    finally:
        (tree / "boot").rmdir()
        os.rename(kernels, tree / "boot")
    _esp(tree, dest)


def _table(dest: Path, root_sectors: int) -> str:
    """sfdisk's script; a device name ending in N puts a line in partition N, as the image numbers them."""
    parts = [(1, ROOT_START, root_sectors, layouts.LINUX_FS), (14, BIOS_START, BIOS_SECTORS, layouts.BIOS_BOOT),
             (15, ESP_START, ESP_SECTORS, ESP_TYPE), (16, BOOT_START, BOOT_SECTORS, XBOOTLDR)]  # fmt: skip
    lines = [f"label: gpt\nlabel-id: {layouts._uuid(NAME, 'disk')}\n"]
    for number, start, size, kind in parts:
        uuid = ROOT_PARTUUID if number == 1 else layouts._uuid(NAME, f"p{number}")
        lines.append(f"{dest}{number} : start={start}, size={size}, type={kind}, uuid={uuid}\n")
    return "".join(lines)


def _mke2fs(tree: Path, src: Path, dest: Path, options: list[str], offset: int, size: int) -> None:
    """An ext4 of ``src``'s files at ``offset`` in ``dest``, by the guest's own mke2fs."""
    debian.guest_tool(tree, ["/usr/sbin/mke2fs", "-q", "-F", "-t", "ext4", *options,
                             "-E", f"offset={offset},root_owner=0:0,nodiscard", "-d", "/src",
                             "/disk.img", f"{size // 4096 * 4}K"],
                      binds=["--ro-bind", src, "/src", "--bind", dest, "/disk.img"])  # fmt: skip


def _esp(tree: Path, dest: Path) -> None:
    """FAT32 ``UEFI`` by the guest's mkfs.fat, with GRUB's stub config (the host's mtools write
    it: the ESP is never mounted, and only its presence matters to a conversion)."""
    tools.require_tools("mmd", "mcopy", reason="fill the sample's ESP", hint="apt install mtools")
    # One sector a cluster, as mkfs.fat picks for 106 MiB alone; given the whole disk's size it
    # picks 4 KiB, too few clusters for FAT32 (mtools then misreads it).
    debian.guest_tool(tree, ["/usr/sbin/mkfs.fat", "-F", "32", "-s", "1", "-n", "UEFI", "-i", ESP_ID,
                             "--offset", str(ESP_START), "/disk.img", str(ESP_SECTORS // 2)],
                      binds=["--bind", dest, "/disk.img"])  # fmt: skip
    image = f"{dest}@@{ESP_START * 512}"
    env = {"MTOOLS_SKIP_CHECK": "1"}
    with tempfile.TemporaryDirectory(prefix="esp-") as tmp:
        stub = Path(tmp) / "grub.cfg"
        stub.write_text(ESP_GRUB_CFG.format(boot=BOOT_UUID))
        tools.run(["mmd", "-i", image, "::/EFI", "::/EFI/ubuntu", "::/EFI/BOOT"], env=env)
        tools.run(["mcopy", "-i", image, stub, "::/EFI/ubuntu/grub.cfg"], env=env)


def build(dest: Path) -> Path:
    """Build the sample as the read-only disk image ``dest``."""
    tools.require_tools("sfdisk", "mcopy", reason="build the sample disk", hint="apt install fdisk mtools")
    # In the cache directory, not /tmp: the tree is half a gigabyte, /tmp may be a small tmpfs.
    with tempfile.TemporaryDirectory(prefix=f"sample-{NAME}-", dir=dest.parent) as tmp:
        tree = Path(tmp) / "root"
        tree.mkdir()
        stage(tree)
        with atomic_path(dest) as part:
            disk(tree, part)
            part.chmod(0o444)
    return dest
