"""``sample:opensuse-like``: an openSUSE Leap 16.0 cloud instance as far as a conversion can see,
built from Debian 12's packages (there is no RPM mirror here, and a converter reads files, not
RPMs). Leap 16 as Tumbleweed and SLES 16: NetworkManager (no wicked), SELinux, journal only.

The userland is Debian's (mmdebstrap), laid out and configured as openSUSE's kiwi-built cloud
images and YaST installs are:

- the disk: GPT with kiwi's partitions, ``p.legacy`` (BIOS boot, 2 MiB), ``p.UEFI`` (the EFI
  system partition, FAT, mounted at /boot/efi) and ``p.lxroot``, a btrfs root with openSUSE's
  subvolumes: ``@`` and under it ``home``, ``opt``, ``root``, ``srv``, ``usr/local``, ``var``
  (no copy-on-write), ``boot/grub2/i386-pc``, ``boot/grub2/x86_64-efi`` and ``.snapshots``; the
  system itself in snapper's first snapshot ``@/.snapshots/1/snapshot``, the **default
  subvolume**, with its ``info.xml``; fstab as YaST and kiwi write it (``/`` with no ``subvol=``,
  so the default subvolume is the root and a ``snapper rollback`` changes what boots, every other
  subvolume by ``subvol=/@/...``); and a read-only snapper snapshot ``@/.snapshots/2/snapshot``
  the user took, which still holds the host keys 10-clean removes from the live root;
- os-release of openSUSE Leap 16.0 (``ID="opensuse-leap"``, ``ID_LIKE="suse opensuse"``) in
  /usr/lib with /etc's link, ``/etc/SUSE-brand``, zypper's /etc/zypp and the base product, no
  ``/etc/debian_version``; SELinux ``enforcing`` / ``targeted`` (Debian's kernel loads no
  policy: it stays inert);
- dracut instead of initramfs-tools (not installed): the one kernel's initrd is dracut's, generic
  (kiwi builds cloud images' that way), at SUSE's ``/boot/initrd-<version>``, with SUSE's links
  ``/boot/vmlinuz`` and ``/boot/initrd`` to the kernel and its initrd; the kernel is Debian's
  generic one (virtio, AHCI, e1000), so both targets boot without installing anything;
- GRUB 2's files where grub2-mkconfig writes them on openSUSE: ``/boot/grub2/grub.cfg`` (classic
  menu entries with paths relative to the default subvolume, SUSE's snapshot menu) and
  ``grubenv``, ``/etc/default/grub`` and ``/etc/sysconfig/bootloader``; the ESP's
  ``EFI/opensuse/grub.cfg`` that leads to them;
- NetworkManager instead of ifupdown, with cloud-init's keyfile for eth0 (mode 600, DHCP, the
  cloud's MAC) and the internal DHCP client's lease; sshd.service making missing host keys with
  ``/usr/sbin/sshd-gen-keys-start`` before it tests its configuration, as openSUSE's does (the
  profile counts on it);
- the cloud user ``opensuse`` (uid 1000); no syslog daemon, so the login the check looks for is
  in the journal (``/var/log/journal/<machine-id>/system.journal``); the user's own files in
  /home, /opt, /srv and /var, each a subvolume of its own.

The guest's check at every boot (debian.py's) adds: the initrd that booted is dracut's, the one at
SUSE's name, and SUSE's links lead to the running kernel and to it, / is btrfs and is snapshot 1, the default subvolume, every
fstab subvolume is mounted where fstab says with the user's files in it, the old snapshot is
gone, and NetworkManager manages eth0 with cloud-init's connection.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from imaging import tools
from imaging.errors import ImagingError
from imaging.samples import debian, layouts, rhel
from imaging.samples.kvm import sample_uuid, write
from imaging.sparse import atomic_path, create_sparse

NAME = "opensuse-like"
ROOT_UUID = sample_uuid(NAME)
ESP_ID = "2B4F1C7E"  # FAT's volume id: blkid's UUID is 2B4F-1C7E
ESP_UUID = f"{ESP_ID[:4]}-{ESP_ID[4:]}"
MIB = 1 << 20
ESP_START, ESP_BYTES = 3 * MIB, 32 * MIB  # after the 2 MiB BIOS boot partition at 1 MiB
ROOT_START = ESP_START + ESP_BYTES
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
# debian.PACKAGES without ifupdown and its DHCP client (NetworkManager has its own), with no
# initramfs-tools (dracut provides linux-initramfs-tool), the btrfs and FAT tools openSUSE has.
BASE = ("systemd-sysv", "linux-image-amd64", "dracut", "network-manager", "cloud-init", "openssh-server",
        "iproute2", "sudo", "netbase", "btrfs-progs", "dosfstools")  # fmt: skip
# openSUSE's subvolumes under @ besides .snapshots, as YaST and kiwi make them: the snapshot of
# the system leaves out what a rollback must not undo (data, logs, the bootloader's modules).
SUBVOLUMES = (
    "home",
    "opt",
    "root",
    "srv",
    "usr/local",
    "var",
    "boot/grub2/i386-pc",
    "boot/grub2/x86_64-efi",
)
SNAPSHOT = "@/.snapshots/1/snapshot"
OLD_SNAPSHOT = "@/.snapshots/2/snapshot"
INSTANCE = debian.Instance(
    user="opensuse",
    gecos="opensuse Cloud User",
    base=BASE,
    # journald's own file: 10-clean removes *.journal by name, whatever is in it.
    auth_log=f"/var/log/journal/{debian.MACHINE_ID}/system.journal",
    network=((rhel.NM_KEYFILE_PATH, rhel.NM_KEYFILE, 0o600),),  # cloud-init's renderer is the same
    lease=rhel.INSTANCE.lease,
)
# As YaST writes it (kiwi's differs only in spacing): / with no subvol=, so the default
# subvolume is mounted; the others by path from the top level; the ESP by its FAT volume id.
_SUBVOLUME_MOUNTS = ("var", "usr/local", "srv", "root", "opt", "home", "boot/grub2/x86_64-efi", "boot/grub2/i386-pc",
                     ".snapshots")  # fmt: skip
FSTAB = "".join(
    f"{device:<41}  {mountpoint:<22}  {fstype:<5}  {options:<32}  {passes}\n"
    for device, mountpoint, fstype, options, passes in [
        (f"UUID={ROOT_UUID}", "/", "btrfs", "defaults", "0  0"),
        *((f"UUID={ROOT_UUID}", f"/{s}", "btrfs", f"subvol=/@/{s}", "0  0") for s in _SUBVOLUME_MOUNTS),
        (f"UUID={ESP_UUID}", "/boot/efi", "vfat", "utf8", "0  2"),
    ]
)

VERSION = "16.0"
PRETTY_NAME = f"openSUSE Leap {VERSION}"
OS_RELEASE = f"""\
NAME="openSUSE Leap"
VERSION="{VERSION}"
ID="opensuse-leap"
ID_LIKE="suse opensuse"
VERSION_ID="{VERSION}"
PRETTY_NAME="{PRETTY_NAME}"
ANSI_COLOR="0;32"
CPE_NAME="cpe:/o:opensuse:leap:{VERSION}"
BUG_REPORT_URL="https://bugs.opensuse.org"
HOME_URL="https://www.opensuse.org/"
DOCUMENTATION_URL="https://en.opensuse.org/Portal:Leap"
LOGO="distributor-logo-Leap"
"""
SUSE_BRAND = f"openSUSE\nVERSION = {VERSION}\n"
BASE_PRODUCT = f"""\
<?xml version="1.0" encoding="UTF-8"?>
<product schemeversion="0">
  <vendor>openSUSE</vendor>
  <name>Leap</name>
  <version>{VERSION}</version>
  <release>0</release>
  <arch>x86_64</arch>
  <cpeid>cpe:/o:opensuse:leap:{VERSION}</cpeid>
  <summary>openSUSE Leap</summary>
</product>
"""
ZYPP_CONF = """\
## Configuration file for software management
## /etc/zypp/zypp.conf
[main]
## Whether to keep downloaded packages (repos may override it).
# keep.packages = false
solver.onlyRequires = true
"""
REPO_OSS = """\
[repo-oss]
name=Repository (OSS)
enabled=1
autorefresh=1
baseurl=http://download.opensuse.org/distribution/leap/$releasever/repo/oss/$basearch
type=rpm-md
keeppackages=0
"""
SELINUX = """\
# This file controls the state of SELinux on the system.
# SELINUX= can take one of these three values:
#     enforcing - SELinux security policy is enforced.
#     permissive - SELinux prints warnings instead of enforcing.
#     disabled - No SELinux policy is loaded.
SELINUX=enforcing
# SELINUXTYPE= can take one of these two values:
#     targeted - Targeted processes are protected,
#     minimum - Modification of targeted policy. Only selected processes are protected.
#     mls - Multi Level Security protection.
SELINUXTYPE=targeted
"""
# kiwi's cloud images' serial console. Leap 16 also has "security=selinux selinux=1" here: left
# out, as Debian's kernel would start SELinux with no policy to load, should anything boot with it.
CMDLINE = "console=ttyS0,115200 console=tty0 net.ifnames=0 dis_ucode_ldr"
DEFAULT_GRUB = f"""\
# If you change this file, run 'grub2-mkconfig -o /boot/grub2/grub.cfg' afterwards to update
# /boot/grub2/grub.cfg.

# Uncomment to set your own custom distributor. If you leave it unset or empty, the default
# policy is to determine the value from /etc/os-release
GRUB_DISTRIBUTOR=
GRUB_DEFAULT=saved
GRUB_HIDDEN_TIMEOUT=0
GRUB_HIDDEN_TIMEOUT_QUIET=true
GRUB_TIMEOUT=10
GRUB_CMDLINE_LINUX_DEFAULT="{CMDLINE}"
GRUB_CMDLINE_LINUX=""
GRUB_TERMINAL="serial console"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_USE_LINUXEFI=true
GRUB_DISABLE_OS_PROBER=true
GRUB_ENABLE_CRYPTODISK=n
SUSE_BTRFS_SNAPSHOT_BOOTING="true"
GRUB_DISABLE_RECOVERY="true"
"""
SYSCONFIG_BOOTLOADER = """\
## Path:	System/Bootloader
## Description:	Bootloader configuration
## Type:	list(grub,grub2,grub2-efi,grub2-bls,systemd-boot,none)
## Default:	grub2
#
# Type of bootloader in use.
# For making the change effect run bootloader configuration tool
# and configure newly selected bootloader
#
LOADER_TYPE="grub2"

## Path:	System/Bootloader
## Description:	Bootloader configuration
## Type:	yesno
## Default:	"no"
#
# Enable UEFI Secure Boot support
#
SECURE_BOOT="yes"

## Path:	System/Bootloader
## Description:	Bootloader configuration
## Type:	yesno
## Default:	"no"
#
# Enable Trusted Boot support
#
TRUSTED_BOOT="no"

## Path:	System/Bootloader
## Description:	Bootloader configuration
## Type:	yesno
## Default:	"yes"
#
# Update nvram boot settings (UEFI, OF)
#
UPDATE_NVRAM="yes"
"""
# What grub2-mkconfig writes on openSUSE: SUSE's GRUB reads paths relative to the default
# subvolume (btrfs_relative_path), so a rollback boots the snapshot's own kernel; upstream GRUB,
# which the conversion installs, reads them from the top level.
GRUB_ENTRY = """\
	load_video
	set gfxpayload=keep
	insmod gzio
	insmod part_gpt
	insmod btrfs
	search --no-floppy --fs-uuid --set=root {uuid}
	echo	'Loading Linux {version} ...'
	linux	/boot/vmlinuz-{version} root=UUID={uuid}  ${{extra_cmdline}} {cmdline}
	echo	'Loading initial ramdisk ...'
	initrd	/boot/initrd-{version}
"""
GRUB_CFG = """\
#
# DO NOT EDIT THIS FILE
#
# It is automatically generated by grub2-mkconfig using templates
# from /etc/grub.d and settings from /etc/default/grub
#

### BEGIN /etc/grub.d/00_header ###
set btrfs_relative_path="y"
export btrfs_relative_path
if [ -f ${{config_directory}}/grubenv ]; then
  load_env -f ${{config_directory}}/grubenv
elif [ -s $prefix/grubenv ]; then
  load_env
fi
if [ "${{next_entry}}" ] ; then
   set default="${{next_entry}}"
   set next_entry=
   save_env next_entry
   set boot_once=true
else
   set default="${{saved_entry}}"
fi

if [ x"${{feature_menuentry_id}}" = xy ]; then
  menuentry_id_option="--id"
else
  menuentry_id_option=""
fi

export menuentry_id_option

if [ "${{prev_saved_entry}}" ]; then
  set saved_entry="${{prev_saved_entry}}"
  save_env saved_entry
  set prev_saved_entry=
  save_env prev_saved_entry
  set boot_once=true
fi

function savedefault {{
  if [ -z "${{boot_once}}" ]; then
    saved_entry="${{chosen}}"
    save_env saved_entry
  fi
}}

function load_video {{
  if [ x$feature_all_video_module = xy ]; then
    insmod all_video
  else
    insmod efi_gop
    insmod efi_uga
    insmod ieee1275_fb
    insmod vbe
    insmod vga
    insmod video_bochs
    insmod video_cirrus
  fi
}}

serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
if [ x$feature_timeout_style = xy ] ; then
  set timeout_style=menu
  set timeout=10
# Fallback normal timeout code in case the timeout_style feature is
# unavailable.
else
  set timeout=10
fi
### END /etc/grub.d/00_header ###

### BEGIN /etc/grub.d/10_linux ###
menuentry '{title}'  --class opensuse --class gnu-linux --class gnu --class os $menuentry_id_option 'gnulinux-simple-{uuid}' {{
{entry}}}
submenu 'Advanced options for {title}' $menuentry_id_option 'gnulinux-advanced-{uuid}' {{
	menuentry '{title}, with Linux {version}' --class opensuse --class gnu-linux --class gnu --class os $menuentry_id_option 'gnulinux-{version}-advanced-{uuid}' {{
{entry}	}}
}}
### END /etc/grub.d/10_linux ###

### BEGIN /etc/grub.d/30_os-prober ###
### END /etc/grub.d/30_os-prober ###

### BEGIN /etc/grub.d/40_custom ###
# This file provides an easy way to add custom menu entries.  Simply type the
# menu entries you want to add after this comment.  Be careful not to change
# the 'menuentry' line above.
### END /etc/grub.d/40_custom ###

### BEGIN /etc/grub.d/41_custom ###
if [ -f  ${{config_directory}}/custom.cfg ]; then
  source ${{config_directory}}/custom.cfg
elif [ -z "${{config_directory}}" -a -f  $prefix/custom.cfg ]; then
  source $prefix/custom.cfg
fi
### END /etc/grub.d/41_custom ###

### BEGIN /etc/grub.d/80_suse_btrfs_snapshot ###
if [ -z "$extra_cmdline" ]; then
  btrfs-mount-subvol ($root) /.snapshots /@/.snapshots
  if [ -f "/.snapshots/grub-snapshot.cfg" ]; then
    source "/.snapshots/grub-snapshot.cfg"
  fi
fi
### END /etc/grub.d/80_suse_btrfs_snapshot ###
"""
# snapper's GRUB plugin's menu of the snapshots to boot read-only, in the .snapshots subvolume.
GRUB_SNAPSHOTS = """\
submenu 'Start bootloader from a read-only snapshot' {
  snapshot_found=true
  saved_subvol=$btrfs_subvol
  menuentry --id=2 '*openSUSE Leap 16.0 (2025-11-18T09:40, before update)' {
    btrfs_subvol=/@/.snapshots/2/snapshot
    extra_cmdline="rootflags=subvol=@/.snapshots/2/snapshot"
    export extra_cmdline
    snapshot_num=2
    export snapshot_num
    configfile "/boot/grub2/grub.cfg"
    btrfs_subvol=$saved_subvol
  }
}
"""
# What openSUSE's grub2-install leaves on the ESP: the way to /boot/grub2 on the root.
ESP_GRUB_CFG = f"""\
set btrfs_relative_path="yes"
search --fs-uuid --set=root {ROOT_UUID}
set prefix=(${{root}})/boot/grub2
source "${{prefix}}/grub.cfg"
"""
SNAPPER_INFO = """\
<?xml version="1.0"?>
<snapshot>
  <type>single</type>
  <num>{num}</num>
  <date>{date}</date>
  <description>{description}</description>
</snapshot>
"""
# openSUSE's openssh makes missing host keys at each start (the profile's ssh_host_keys:
# distro counts on it); Debian's does not, hence the script at SUSE's path, run before sshd -t
# as sshd.service runs it (Debian's unit is ssh.service, sshd.service its alias).
SSHD_GEN_KEYS = """\
#!/bin/sh
# Generate the SSH host keys that are missing (as openSUSE's openssh-server does at each start).
echo "Checking for missing server keys in /etc/ssh"
ssh-keygen -A
"""
SSHD_DROPIN = (
    "[Service]\nExecStartPre=\nExecStartPre=/usr/sbin/sshd-gen-keys-start\nExecStartPre=/usr/sbin/sshd -t\n"
)
# kiwi builds cloud images' initrds generic: they boot on any machine.
DRACUT_GENERIC = 'hostonly="no"\n'
# The user's own files in the subvolumes a rollback leaves alone (and what the check reads back).
USER_FILES = {
    "/opt/acme/VERSION": "4.2.1\n",
    "/srv/www/htdocs/index.html": "<html><body>Acme orders</body></html>\n",
    "/var/lib/acme/queue/0001": "order=1041\n",
}
_MOUNTED = " ".join(f"{s}:/@/{s}" for s in (*SUBVOLUMES, ".snapshots"))

# From inside the booted guest. The initrd that booted is told by its size: the kernel frees it
# in whole pages and says how much (GRUB loads it page-aligned); listing it with lsinitrd would
# take most of a minute under TCG.
CHECKS = (
    r"""check "the initrd that booted is the one at SUSE's name" sh -c 'k=$(( ($(stat -c %s /boot/initrd-$(uname -r)) + 4095) / 4096 * 4 )); dmesg | grep -q "Freeing initrd memory: ${k}K\$"'
check "and it is dracut's" sh -c 'journalctl -b -q -o cat -u dracut-pre-pivot.service | grep -q .'
check "SUSE's links lead to the running kernel and its initrd" sh -c 'test "$(readlink /boot/vmlinuz)" = vmlinuz-$(uname -r) && test "$(readlink /boot/initrd)" = initrd-$(uname -r)'
check "no initramfs-tools" sh -c '! test -e /usr/sbin/update-initramfs'
"""
    + layouts._is("/", "btrfs")
    + f"""check "/ is snapshot 1, the default subvolume" sh -c 'findmnt -no OPTIONS / | tr , "\\n" | grep -qx subvol=/{SNAPSHOT} && btrfs subvolume get-default / | grep -q " path {SNAPSHOT}$"'
check "each fstab subvolume mounted where fstab says" sh -c 'for m in {_MOUNTED}; do findmnt -no OPTIONS /${{m%%:*}} | tr , "\\n" | grep -qx subvol=${{m#*:}} || exit 1; done'
check "the user's files in /opt, /srv and /var kept" sh -c '{" && ".join(f'grep -qxF "{text.strip()}" {path}' for path, text in USER_FILES.items())}'
check "the snapshot taken before cleaning dropped" sh -c '! btrfs subvolume list -a / | grep -q {OLD_SNAPSHOT}'
check "NetworkManager manages eth0 with cloud-init's connection" sh -c 'nmcli -g GENERAL.STATE device show eth0 | grep -q "^100 " && test "$(nmcli -g GENERAL.CONNECTION device show eth0)" = "cloud-init eth0"'
"""
)


def kernel_versions(tree: Path) -> list[str]:
    return sorted(p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*"))


def stage(tree: Path) -> str:
    """The Debian tree of debian.stage_debian_root, then openSUSE's files and initrd; returns
    the kernel's version."""
    debian.stage_debian_root(tree, "debian12", fstab=FSTAB, checks=CHECKS, instance=INSTANCE)
    if (tree / "usr" / "sbin" / "update-initramfs").exists() or not (
        tree / "usr" / "bin" / "dracut"
    ).exists():
        raise ImagingError(
            "mmdebstrap installed initramfs-tools, or no dracut: the sample would not be SUSE-like"
        )
    versions = kernel_versions(tree)
    if len(versions) != 1:
        raise ImagingError(f"expected the one generic kernel in /boot, found {versions}")
    for name in ("etc/debian_version", "etc/network/interfaces", "vmlinuz", "vmlinuz.old", "initrd.img",
                 "initrd.img.old", "etc/os-release"):  # fmt: skip
        (tree / name).unlink(missing_ok=True)
    etc = tree / "etc"
    write(tree / "usr" / "lib" / "os-release", OS_RELEASE)
    (etc / "os-release").symlink_to("../usr/lib/os-release")
    write(etc / "SUSE-brand", SUSE_BRAND)
    write(etc / "products.d" / "Leap.prod", BASE_PRODUCT)
    (etc / "products.d" / "baseproduct").symlink_to("Leap.prod")
    write(etc / "zypp" / "zypp.conf", ZYPP_CONF)
    write(etc / "zypp" / "repos.d" / "repo-oss.repo", REPO_OSS)
    write(etc / "selinux" / "config", SELINUX)
    write(etc / "default" / "grub", DEFAULT_GRUB)
    write(etc / "sysconfig" / "bootloader", SYSCONFIG_BOOTLOADER)
    write(etc / "dracut.conf.d" / "02-generic-image.conf", DRACUT_GENERIC)
    write(tree / "usr" / "sbin" / "sshd-gen-keys-start", SSHD_GEN_KEYS, 0o755)
    write(etc / "systemd" / "system" / "ssh.service.d" / "50-sshd-gen-keys-start.conf", SSHD_DROPIN)
    for path, text in USER_FILES.items():
        write(tree / path.lstrip("/"), text)
    _initrd(tree, versions[0])
    _boot_loader(tree, versions[0])
    return versions[0]


def _initrd(tree: Path, version: str) -> None:
    """The kernel's initrd made by the guest's dracut at SUSE's name, and SUSE's links to the
    kernel and to it; Debian's name removed (the kernel's postinst hook made one there)."""
    boot = tree / "boot"
    debian.guest_tool(tree, ["/usr/bin/dracut", "--quiet", "--force", "--no-hostonly", "--tmpdir", "/tmp",
                             f"/boot/initrd-{version}", version],
                      binds=["--bind", boot, "/boot"])  # fmt: skip
    (boot / f"initrd.img-{version}").unlink(missing_ok=True)
    (boot / "vmlinuz").symlink_to(f"vmlinuz-{version}")
    (boot / "initrd").symlink_to(f"initrd-{version}")


def _boot_loader(tree: Path, version: str) -> None:
    grub = tree / "boot" / "grub2"
    entry = GRUB_ENTRY.format(uuid=ROOT_UUID, version=version, cmdline=CMDLINE)
    write(grub / "grub.cfg", GRUB_CFG.format(title=PRETTY_NAME, uuid=ROOT_UUID, version=version,
                                             entry=entry), 0o600)  # fmt: skip
    env = f"# GRUB Environment Block\nsaved_entry={PRETTY_NAME}\n"
    write(grub / "grubenv", env.ljust(1024, "#"), 0o600)
    # The mount points of the subvolumes and the ESP (in the snapshot they stay empty).
    for path in ("boot/grub2/i386-pc", "boot/grub2/x86_64-efi", "boot/efi", ".snapshots"):
        (tree / path).mkdir(mode=0o755, parents=True, exist_ok=True)


def _esp(tree: Path, disk: Path) -> None:
    """The EFI system partition, made by the guest's mkfs.vfat; its one file written by mtools."""
    with layouts.loop(disk, ESP_START, ESP_BYTES) as dev:
        debian.guest_tool(tree, ["/usr/sbin/mkfs.vfat", "-n", "EFI", "-i", ESP_ID, dev],
                          binds=["--dev-bind", dev, dev])  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="esp-") as tmp:
        cfg = Path(tmp) / "grub.cfg"
        cfg.write_text(ESP_GRUB_CFG)
        image = f"{disk}@@{ESP_START}"
        env = {"MTOOLS_SKIP_CHECK": "1"}
        tools.run(["mmd", "-i", image, "::/EFI", "::/EFI/BOOT", "::/EFI/opensuse"], env=env)
        tools.run(["mcopy", "-i", image, cfg, "::/EFI/opensuse/grub.cfg"], env=env)


def _subvolumes(tree: Path, top: Path) -> None:
    """openSUSE's layout in the btrfs mounted at ``top`` (its top level), filled from ``tree``."""

    def btrfs(*args: str) -> None:
        debian.guest_tool(tree, ["/usr/bin/btrfs", "-q", *args], binds=["--bind", top, "/mnt"])

    btrfs("subvolume", "create", "/mnt/@")
    for sub in (*SUBVOLUMES, ".snapshots"):
        (top / "@" / sub).parent.mkdir(parents=True, exist_ok=True)
        btrfs("subvolume", "create", f"/mnt/@/{sub}")
    # kiwi's copy_on_write="false" for /var (databases, VM images); set while it is empty.
    tools.run(["chattr", "+C", top / "@" / "var"])
    (top / "@" / ".snapshots" / "1").mkdir()
    btrfs("subvolume", "create", f"/mnt/{SNAPSHOT}")
    layouts._copy(tree, top / SNAPSHOT, *(f"--exclude=/{sub}/*" for sub in SUBVOLUMES))
    for sub in SUBVOLUMES:
        if (tree / sub).is_dir():
            layouts._copy(tree / sub, top / "@" / sub)
    write(top / "@" / ".snapshots" / "1" / "info.xml",
          SNAPPER_INFO.format(num=1, date="2025-11-12 08:14:03", description="first root filesystem"))  # fmt: skip
    btrfs("subvolume", "set-default", f"/mnt/{SNAPSHOT}")
    # The user's own snapshot, later: it holds what the live root held then (the host keys).
    (top / "@" / ".snapshots" / "2").mkdir()
    btrfs("subvolume", "snapshot", "-r", f"/mnt/{SNAPSHOT}", f"/mnt/{OLD_SNAPSHOT}")
    write(top / "@" / ".snapshots" / "2" / "info.xml",
          SNAPPER_INFO.format(num=2, date="2025-11-18 09:40:11", description="before update"))  # fmt: skip
    write(top / "@" / ".snapshots" / "grub-snapshot.cfg", GRUB_SNAPSHOTS)


def suse_disk(tree: Path, disk: Path) -> None:
    """GPT as kiwi partitions openSUSE's images: p.legacy (BIOS boot) at 1 MiB, p.UEFI (the ESP)
    at 3 MiB, p.lxroot (btrfs, made by the guest's mkfs.btrfs) after it."""
    tools.require_tools("btrfs", "chattr", "mmd", "mcopy", reason="build the openSUSE-like sample disk",
                        hint="apt install btrfs-progs e2fsprogs mtools")  # fmt: skip
    size = layouts._fs_bytes(tree)
    create_sparse(disk, ROOT_START + size + MIB)  # and GPT's backup at the end
    uuid = layouts._uuid
    layouts._partition(disk, f"label: gpt\nlabel-id: {uuid(NAME, 'disk')}\n"
                             f"start=2048, size=4096, type={layouts.BIOS_BOOT}, uuid={uuid(NAME, 'p1')}, name=p.legacy\n"
                             f"start={ESP_START // 512}, size={ESP_BYTES // 512}, type={ESP_TYPE}, "
                             f"uuid={uuid(NAME, 'p2')}, name=p.UEFI\n"
                             f"start={ROOT_START // 512}, size={size // 512}, type={layouts.LINUX_FS}, "
                             f"uuid={uuid(NAME, 'p3')}, name=p.lxroot\n")  # fmt: skip
    _esp(tree, disk)
    with layouts.loop(disk, ROOT_START, size) as dev:
        try:
            debian.guest_tool(tree, ["/usr/sbin/mkfs.btrfs", "-q", "-U", ROOT_UUID, dev],
                              binds=["--dev-bind", dev, dev])  # fmt: skip
            with layouts.mounted(dev, "rw") as top:
                _subvolumes(tree, top)
        finally:
            layouts.forget_btrfs(dev)


def build(dest: Path) -> Path:
    """Build the sample as the read-only disk image ``dest``."""
    tools.require_tools("losetup", "mount", "rsync", "sfdisk", reason="build the sample disk",
                        hint="apt install util-linux mount rsync fdisk")  # fmt: skip
    # In the cache directory, not /tmp: the tree is half a gigabyte, /tmp may be a small tmpfs.
    with tempfile.TemporaryDirectory(prefix=f"sample-{NAME}-", dir=dest.parent) as tmp:
        tree = Path(tmp) / "root"
        tree.mkdir()
        stage(tree)
        with atomic_path(dest) as part:
            suse_disk(tree, part)
            part.chmod(0o444)
    return dest
