"""``sample:amazon2023-like``: an Amazon Linux 2023 EC2 instance as far as a conversion can see,
built from Debian 12's packages (there is no RPM mirror here, and a converter reads files, not
RPMs), as rhel.py builds Rocky's.

The userland is Debian's (mmdebstrap), laid out and configured as AL2023's AMIs are:

- os-release of Amazon Linux 2023 (``ID="amzn"``, ``VERSION_ID="2023"``, ``ID_LIKE="fedora"``,
  ``PLATFORM_ID="platform:al2023"``), ``/etc/amazon-linux-release`` with ``system-release``
  linked to it and the ``-cpe`` files; no ``/etc/redhat-release`` (AL2023 has none) and no
  ``/etc/debian_version``; SELinux ``permissive`` / ``targeted`` (AL2023's default; Debian's
  kernel loads no policy here);
- the disk of AL2023's AMIs: GPT, a BIOS boot partition 127 (1 MiB at 1 MiB), an EFI system
  partition 128 (10 MiB, FAT, made by the guest's mkfs.fat, holding under ``EFI/amzn`` GRUB's
  stub ``grub.cfg`` and the signed chain shim-x64 and grub2-efi-x64 put there, Debian's signed
  shim, MokManager and GRUB standing in for Amazon's, written by the host's mtools), and the
  root, partition 1, after them from 12 MiB: XFS v5 labelled ``/``, made by the guest's
  mkfs.xfs; fstab as the AMIs have it, the root by UUID with ``noatime`` and the ESP on
  ``/boot/efi`` (automounted);
- systemd-networkd (no NetworkManager, no ifcfg, no ifupdown) and systemd-resolved, enabled.
  The only network configuration on the disk is what amazon-ec2-net-utils installs,
  ``/usr/lib/systemd/network/80-ec2.network``: DHCP on a NIC whose driver is EC2's (``ena``,
  ``ixgbevf``, ``vif``), MTU 9001. At boot its udev rules link ``/run/systemd/network/
  70-<nic>.network`` to it with a drop-in per ENI: nothing of that is on the disk (``/run`` is a
  tmpfs), nor is cloud-init's network configuration (AL2023's AMIs turn it off: here in a
  ``cloud.cfg.d`` file). On KVM or VirtualBox no NIC is ``ena``'s: 20-migrate has to configure
  the target's NIC (firstboot.py), or the converted guest boots without a network;
- dracut instead of initramfs-tools (not installed), a generic (no-hostonly) initrd, as
  ``dracut-config-generic`` makes cloud images' ones, at RHEL's ``/boot/initramfs-<version>.img``
  and nothing at Debian's name; one kernel, Debian's generic one (virtio, NVMe, ENA, AHCI,
  e1000: every target's drivers, as AL2023's kernel has EC2's and KVM's), no ``/vmlinuz`` or
  ``/initrd.img`` links (Amazon Linux keeps none);
- GRUB 2's files where grub2-mkconfig writes them on AL2023: ``/boot/grub2/grub.cfg``
  (``blscfg``) and ``grubenv``, the kernel's BLS entry in ``/boot/loader/entries``, and
  ``/etc/default/grub`` as the AMIs have it (``GRUB_CMDLINE_LINUX_DEFAULT`` with
  ``nvme_core.io_timeout``, ``rd.emergency=poweroff``, SELinux on, predictable NIC names);
- sshd-keygen units that make missing host keys before sshd starts, as AL2023's openssh-server
  has (rhel.py's: the profile counts on them); the cloud user ``ec2-user`` (uid 1000) with
  cloud-init's sudoers file;
- no syslog daemon: AL2023 logs to the journal only, so what running left (sshd's "Accepted
  publickey", networkd's lease of the old address, which it keeps in ``/run`` only) is in the
  persistent journal, ``/var/log/journal/<machine-id>/`` (the instance's live and archived
  files; text stand-ins here, which a real journal file also holds verbatim for short messages).

The guest's check at every boot (debian.py's) adds: the initrd that booted is dracut's, at
RHEL's name; the root is XFS; eth0 is managed by systemd-networkd, systemd-resolved is the
resolver; the ESP mounted on /boot/efi (automounted) exactly when fstab keeps its line (a UEFI
disk), not at all when 20-migrate commented it out.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from imaging import tools
from imaging.errors import ImagingError
from imaging.samples import debian, layouts, rhel
from imaging.samples.kvm import sample_uuid, write
from imaging.sparse import atomic_path, create_sparse

NAME = "amazon2023-like"
ROOT_UUID = sample_uuid(NAME)
ESP_ID = "7B3A9C1E"  # mkfs.fat's volume id; fstab and blkid say 7B3A-9C1E
ESP_UUID = f"{ESP_ID[:4]}-{ESP_ID[4:]}"
MIB = 1 << 20
# The AMIs' GPT (sectors): BIOS boot 127 from 1 MiB, the ESP 128 from 2 MiB, the root 1 from 12 MiB.
BIOS_START, ESP_START, ROOT_START = 2048, 4096, 24576
ESP_SECTORS = ROOT_START - ESP_START  # 10 MiB
EFI_SYSTEM = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
# debian.PACKAGES without ifupdown and its DHCP client (networkd has its own) and with no
# initramfs-tools (dracut provides linux-initramfs-tool); dosfstools for the ESP's mkfs.fat.
BASE = ("systemd-sysv", "systemd-resolved", "linux-image-amd64", "dracut", "cloud-init", "openssh-server",
        "iproute2", "sudo", "netbase", "xfsprogs", "dosfstools")  # fmt: skip
# amazon-ec2-net-utils' (2.x) configuration for every ENI: EC2's NIC drivers only.
EC2_NETWORK_PATH = "/usr/lib/systemd/network/80-ec2.network"
EC2_NETWORK = """\
[Match]
Driver=ena ixgbevf vif

[Link]
MTUBytes=9001

[Network]
DHCP=yes
IPv6DuplicateAddressDetection=0
LLMNR=no
DNSDefaultRoute=yes

[DHCPv4]
UseHostname=no
UseDNS=yes
UseNTP=yes
UseDomains=yes

[DHCPv6]
UseHostname=no
UseDNS=yes
UseNTP=yes
WithoutRA=solicit
"""
JOURNAL = f"/var/log/journal/{debian.MACHINE_ID}"
INSTANCE = debian.Instance(
    user="ec2-user",
    gecos="EC2 Default User",
    base=BASE,
    auth_log=f"{JOURNAL}/system.journal",
    network=((EC2_NETWORK_PATH, EC2_NETWORK, 0o644),),
    # The first boot's journal, archived: networkd logged the lease there (its lease file is in /run).
    lease=(f"{JOURNAL}/system@6f0e1b6ad5a94e5d9d1b3c4a1f2e3d4c-0000000000000001-00061f3a2b4c5d6e.journal",
           "ens5: DHCPv4 address 10.31.7.19/20, gateway 10.31.0.1 acquired from 10.31.0.1\n"),
)  # fmt: skip
FSTAB = f"""\
#
UUID={ROOT_UUID}     /           xfs    defaults,noatime  1   1
UUID={ESP_UUID}        /boot/efi       vfat    defaults,noatime,uid=0,gid=0,umask=0077,shortname=winnt,x-systemd.automount 0 2
"""
VERSION = "2023.5.20240819"
OS_RELEASE = f"""\
NAME="Amazon Linux"
VERSION="2023"
ID="amzn"
ID_LIKE="fedora"
VERSION_ID="2023"
PLATFORM_ID="platform:al2023"
PRETTY_NAME="Amazon Linux {VERSION}"
ANSI_COLOR="0;33"
CPE_NAME="cpe:2.3:o:amazon:amazon_linux:2023"
HOME_URL="https://aws.amazon.com/linux/amazon-linux-2023/"
DOCUMENTATION_URL="https://docs.aws.amazon.com/linux/"
SUPPORT_URL="https://aws.amazon.com/premiumsupport/"
BUG_REPORT_URL="https://github.com/amazonlinux/amazon-linux-2023"
VENDOR_NAME="AWS"
VENDOR_URL="https://aws.amazon.com/"
SUPPORT_END="2029-06-30"
"""
RELEASE = f"Amazon Linux release {VERSION} (Amazon Linux)\n"
CPE = "cpe:2.3:o:amazon:amazon_linux:2023\n"
SELINUX = """\
# This file controls the state of SELinux on the system.
# SELINUX= can take one of these three values:
#     enforcing - SELinux security policy is enforced.
#     permissive - SELinux prints warnings instead of enforcing.
#     disabled - No SELinux policy is loaded.
SELINUX=permissive
# SELINUXTYPE= can take one of these three values:
#     targeted - Targeted processes are protected,
#     minimum - Modification of targeted policy. Only selected processes are protected.
#     mls - Multi Level Security protection.
SELINUXTYPE=targeted
"""
CMDLINE = ("console=tty0 console=ttyS0,115200n8 nvme_core.io_timeout=4294967295 rd.emergency=poweroff rd.shell=0 "
           "selinux=1 security=selinux quiet")  # fmt: skip
DEFAULT_GRUB = f"""\
GRUB_CMDLINE_LINUX_DEFAULT="{CMDLINE}"
GRUB_TIMEOUT=0
GRUB_DISABLE_RECOVERY="true"
GRUB_TERMINAL="ec2-console"
GRUB_X86_USE_32BIT="true"
GRUB_DEFAULT=saved
GRUB_UPDATE_DEFAULT_KERNEL=true
GRUB_ENABLE_BLSCFG=true
"""
# grub2-mkconfig's output with BLS entries (rhel.py's template), the root on partition 1.
GRUB_CFG = (rhel.GRUB_CFG.replace(rhel.ROOT_UUID, ROOT_UUID).replace("gpt2", "gpt1")
            .replace("set timeout=1", "set timeout=0"))  # fmt: skip
BLS_ENTRY = """\
title Amazon Linux ({version}) 2023
version {version}
linux /boot/vmlinuz-{version}
initrd /boot/initramfs-{version}.img
options root=UUID={uuid} ro {cmdline}
grub_users $grub_users
grub_arg --unrestricted
grub_class amzn
"""
# What the ESP holds besides the EFI binaries: a stub that hands over to /boot/grub2's grub.cfg.
ESP_GRUB_CFG = f"""\
search --no-floppy --fs-uuid --set=dev {ROOT_UUID}
set prefix=($dev)/boot/grub2
export $prefix
configfile $prefix/grub.cfg
"""
CLOUD_INIT_NO_NETWORK = (
    "# amazon-ec2-net-utils configures the network, not cloud-init\nnetwork:\n  config: disabled\n"
)
SUDOERS = "\n# User rules for ec2-user\nec2-user ALL=(ALL) NOPASSWD:ALL\n"
UNITS = "/usr/lib/systemd/system"
# What `systemctl enable systemd-networkd` makes (its [Install]: the socket, the generator and
# wait-online with it), as AL2023's presets have it enabled.
NETWORKD_LINKS = {
    "multi-user.target.wants/systemd-networkd.service": "systemd-networkd.service",
    "dbus-org.freedesktop.network1.service": "systemd-networkd.service",
    "sockets.target.wants/systemd-networkd.socket": "systemd-networkd.socket",
    "sysinit.target.wants/systemd-network-generator.service": "systemd-network-generator.service",
    "network-online.target.wants/systemd-networkd-wait-online.service": "systemd-networkd-wait-online.service",
}

# From inside the booted guest: dracut's initrd at RHEL's name, XFS root, eth0 by networkd,
# resolved the resolver (the test network's DHCP names no DNS server: restrict=on), the ESP (not
# on the target) neither mounted nor waited for.
CHECKS = (
    rhel.CHECKS
    + r"""check "eth0 configured by systemd-networkd" sh -c 'networkctl list --no-legend eth0 | grep -Eq "eth0 +ether +routable +configured"'
check "systemd-resolved is the resolver" sh -c 'systemctl is-active systemd-resolved && test -s /run/systemd/resolve/stub-resolv.conf && readlink /etc/resolv.conf | grep -q stub-resolv.conf'
check "the ESP as fstab says: mounted (FAT) where its line is, else not at all" sh -c 'if grep -Eq "^[^#].*/boot/efi" /etc/fstab; then ls /boot/efi/EFI >/dev/null && findmnt -no FSTYPE /boot/efi | grep -q vfat; else ! findmnt /boot/efi; fi'
"""
)


def stage(tree: Path) -> str:
    """The Debian tree of debian.stage_debian_root, then Amazon Linux's files; the kernel version."""
    debian.stage_debian_root(tree, "debian12", fstab=FSTAB, checks=CHECKS, instance=INSTANCE)
    if (tree / "usr" / "sbin" / "update-initramfs").exists() or not (
        tree / "usr" / "bin" / "dracut"
    ).exists():
        raise ImagingError(
            "mmdebstrap installed initramfs-tools, or no dracut: the sample would not be AL2023-like"
        )
    versions = rhel.kernel_versions(tree)
    if len(versions) != 1:
        raise ImagingError(f"expected one kernel (the generic one) in /boot, found {versions}")
    for name in ("etc/debian_version", "etc/network/interfaces", "vmlinuz", "vmlinuz.old", "initrd.img",
                 "initrd.img.old", "etc/os-release"):  # fmt: skip
        (tree / name).unlink(missing_ok=True)
    etc = tree / "etc"
    write(tree / "usr" / "lib" / "os-release", OS_RELEASE)
    (etc / "os-release").symlink_to("../usr/lib/os-release")
    write(etc / "amazon-linux-release", RELEASE)
    (etc / "system-release").symlink_to("amazon-linux-release")
    write(etc / "amazon-linux-release-cpe", CPE)
    (etc / "system-release-cpe").symlink_to("amazon-linux-release-cpe")
    write(etc / "selinux" / "config", SELINUX)
    (etc / "sysconfig").mkdir(exist_ok=True)
    (etc / "sysconfig" / "selinux").symlink_to("../selinux/config")
    write(etc / "default" / "grub", DEFAULT_GRUB)
    write(etc / "cloud" / "cloud.cfg.d" / "40_no-network-config.cfg", CLOUD_INIT_NO_NETWORK)
    write(etc / "sudoers.d" / "90-cloud-init-users", SUDOERS, 0o440)
    write(tree / "usr" / "lib" / "dracut" / "dracut.conf.d" / "02-generic-image.conf", rhel.DRACUT_GENERIC)
    for link, unit in NETWORKD_LINKS.items():
        (etc / "systemd" / "system" / link).parent.mkdir(parents=True, exist_ok=True)
        (etc / "systemd" / "system" / link).symlink_to(f"{UNITS}/{unit}")
    (tree / "boot" / "efi").mkdir(mode=0o700)
    rhel._sshd_keygen(tree)
    _initrd(tree, versions[0])
    _boot_loader(tree, versions[0])
    return versions[0]


def _initrd(tree: Path, version: str) -> None:
    """The initrd dracut made when the kernel was installed, at RHEL's name: Debian's dracut has
    no hostonly default, so it is already the generic one (no second dracut run: the build is
    minutes shorter, and 20-migrate rebuilds it with the target's drivers anyway)."""
    made = tree / "boot" / f"initrd.img-{version}"
    if not made.is_file():
        raise ImagingError(f"dracut made no initrd for {version} when the kernel was installed")
    made.rename(tree / "boot" / f"initramfs-{version}.img")


def _boot_loader(tree: Path, version: str) -> None:
    """GRUB 2's configuration and environment as AL2023 has them, and the kernel's BLS entry."""
    write(tree / "boot" / "loader" / "entries" / f"{debian.MACHINE_ID}-{version}.conf",
          BLS_ENTRY.format(version=version, uuid=ROOT_UUID, cmdline=CMDLINE))  # fmt: skip
    grub = tree / "boot" / "grub2"
    write(grub / "grub.cfg", GRUB_CFG, 0o600)
    env = (
        "# GRUB Environment Block\n# WARNING: Do not edit this file by tools other than grub-editenv!!!\n"
        f"saved_entry={debian.MACHINE_ID}-{version}\nboot_success=0\n"
    )
    write(grub / "grubenv", env.ljust(1024, "#"), 0o600)


def ami_disk(tree: Path, disk: Path) -> None:
    """AL2023's AMI disk: GPT with BIOS boot 127 and ESP 128 first, the XFS root 1 after them."""
    size = layouts._fs_bytes(tree)
    create_sparse(disk, ROOT_START * 512 + size + MIB)  # and GPT's backup at the end
    # sfdisk numbers a line by the digits that end its name.
    layouts._partition(disk, f"label: gpt\nlabel-id: {layouts._uuid(NAME, 'disk')}\n"
                             f"p127 : start={BIOS_START}, size={ESP_START - BIOS_START}, type={layouts.BIOS_BOOT}, "
                             f"uuid={layouts._uuid(NAME, 'p127')}, name=\"BIOS Boot Partition\"\n"
                             f"p128 : start={ESP_START}, size={ESP_SECTORS}, type={EFI_SYSTEM}, "
                             f"uuid={layouts._uuid(NAME, 'p128')}, name=\"EFI System Partition\"\n"
                             f"p1 : start={ROOT_START}, size={size // 512}, type={layouts.LINUX_FS}, "
                             f"uuid={layouts._uuid(NAME, 'p1')}, name=\"Linux\"\n")  # fmt: skip
    with layouts.loop(disk, ESP_START * 512, ESP_SECTORS * 512) as dev:
        debian.guest_tool(tree, ["/usr/sbin/mkfs.fat", "-i", ESP_ID, dev], binds=["--dev-bind", dev, dev])
    _fill_esp(disk)
    with layouts.loop(disk, ROOT_START * 512, size) as dev:
        debian.guest_tool(tree, ["/usr/sbin/mkfs.xfs", "-q", "-L", "/", "-m",
                                 f"bigtime=1,inobtcount=1,uuid={ROOT_UUID}", dev],
                          binds=["--dev-bind", dev, dev])  # fmt: skip
        with layouts.mounted(dev, "rw") as mnt:
            layouts._copy(tree, mnt)


# What shim-x64 and grub2-efi-x64 install into the ESP: Debian's signed shim and GRUB stand in
# for Amazon's (the same chain of trust: shim signed by Microsoft, GRUB by the key shim carries).
SIGNED_CHAIN = {
    "shimx64.efi": Path("/usr/lib/shim/shimx64.efi.signed"),
    "mmx64.efi": Path("/usr/lib/shim/mmx64.efi.signed"),
    "grubx64.efi": Path("/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"),
}


def _fill_esp(disk: Path) -> None:
    """GRUB's stub and the signed chain in the ESP, written by mtools into the image (a kernel may
    have no vfat)."""
    missing = [str(p) for p in SIGNED_CHAIN.values() if not p.is_file()]
    if missing:
        raise ImagingError(f"{', '.join(missing)} missing: apt install shim-signed grub-efi-amd64-signed")
    image = f"{disk}@@{ESP_START * 512}"
    env = {"MTOOLS_SKIP_CHECK": "1"}
    tools.run(["mmd", "-i", image, "::/EFI", "::/EFI/BOOT", "::/EFI/amzn"], env=env)
    with tempfile.TemporaryDirectory(prefix="esp-") as tmp:
        write(Path(tmp) / "grub.cfg", ESP_GRUB_CFG)
        tools.run(["mcopy", "-i", image, Path(tmp) / "grub.cfg", "::/EFI/amzn/grub.cfg"], env=env)
        for name, path in SIGNED_CHAIN.items():
            tools.run(["mcopy", "-i", image, path, f"::/EFI/amzn/{name}"], env=env)


def build(dest: Path) -> Path:
    """Build the sample as the read-only disk image ``dest``."""
    tools.require_tools("losetup", "mount", "rsync", "sfdisk", "mmd", "mcopy", reason="build the sample disk",
                        hint="apt install util-linux mount rsync fdisk mtools")  # fmt: skip
    # In the cache directory, not /tmp: the tree is half a gigabyte, /tmp may be a small tmpfs.
    with tempfile.TemporaryDirectory(prefix=f"sample-{NAME}-", dir=dest.parent) as tmp:
        tree = Path(tmp) / "root"
        tree.mkdir()
        stage(tree)
        with atomic_path(dest) as part:
            ami_disk(tree, part)
            part.chmod(0o444)
    return dest
