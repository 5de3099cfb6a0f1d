"""``sample:xen``: a CentOS-5-like instance as it ran under Xen on Eucalyptus, with everything the
clean and migrate stages must deal with, and an init that checks their work from inside.

Before migration it cannot boot anywhere but Xen: its initrd holds only the Xen block and network
frontends, its fstab names /dev/xvda1, its inittab runs a getty on the Xen console, its
modprobe.conf aliases the Xen drivers. It also carries user and platform data (histories, logs,
the owner's and the host's SSH keys, udev's MAC rules, HWADDR, cloud-init state, the Atmosphere
agent and its config blocks, an rc.local hook that waits for the metadata service forever) and
CentOS's symlinks (/etc/rc.local, /etc/sysconfig/selinux). Its /sbin/mkinitrd is a working tool
with CentOS 5's command line; its yum installs and removes from a local store.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from imaging.samples import packages
from imaging.samples.kvm import INITRD_INIT, MARKER, install_modules, make_initrd, write

XEN_KERNEL = "2.6.18-398.el5xen"
# Modules in the guest: the Xen frontends it ran with, and what the targets need.
MODULES = ["xen-blkfront", "xen-netfront", "ata_piix", "ahci", "sd_mod", "virtio_pci", "virtio_blk", "virtio_net",
           "virtio_balloon", "e1000", "crc32c_generic", "ext4"]  # fmt: skip
XEN_INITRD_MODULES = ["xen-blkfront", "xen-netfront", "crc32c_generic", "ext4"]

MKINITRD = r"""#!/bin/sh
# mkinitrd of the imaging Xen sample: CentOS 5's command line, busybox underneath.
#   mkinitrd [-f] [-v] [--with=<module>] [--preload=<module>] <initrd-image> <kernel-version>
# Like CentOS 5's, it also takes every "alias scsi_hostadapter* <module>" of /etc/modprobe.conf
# and the module of the root filesystem (ext2/3 are served by ext4 on this kernel).
set -e
force=0
verbose=0
wanted=""
usage() {
  echo "usage: mkinitrd [--version] [-v] [-f] [--preload=<module>] [--with=<module>] <initrd-image> <kernel-version>" >&2
  exit 1
}
while [ $# -gt 0 ]; do
  case "$1" in
    -f) force=1 ;;
    -v) verbose=1 ;;
    --with=*|--preload=*) wanted="$wanted ${1#*=}" ;;
    --with|--preload) shift; wanted="$wanted $1" ;;
    --version) echo "mkinitrd 5.1.19.6 (imaging sample)"; exit 0 ;;
    -*) echo "mkinitrd: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
  shift
done
[ $# -eq 2 ] || usage
image=$1
kver=$2
moddir=/lib/modules/$kver
if [ -e "$image" ] && [ "$force" = 0 ]; then echo "$image already exists." >&2; exit 1; fi
[ -f "$moddir/modules.dep" ] || { echo "No modules available for kernel \"$kver\"." >&2; exit 1; }
scsi=$(awk '$1 == "alias" && $2 ~ /^scsi_hostadapter/ { print $3 }' /etc/modprobe.conf 2>/dev/null || true)
modules="$scsi $wanted crc32c_generic ext4"
files=$(awk -v want="$modules" '
  function visit(p,   d, k, i) {
    if (p in seen) return
    seen[p] = 1
    k = split(deps[p], d, " ")
    for (i = 1; i <= k; i++) visit(d[i])
    order[++count] = p
  }
  {
    sub(":", "", $1); path = $1; name = path
    sub(/.*\//, "", name); sub(/\.ko.*/, "", name); gsub("-", "_", name)
    file[name] = path; deps[path] = ""
    for (i = 2; i <= NF; i++) deps[path] = deps[path] " " $i
  }
  END {
    n = split(want, w, " ")
    for (i = 1; i <= n; i++) {
      m = w[i]; gsub("-", "_", m)
      if (!(m in file)) { print "MISSING " w[i]; continue }
      visit(file[m])
    }
    for (i = 1; i <= count; i++) print order[i]
  }' "$moddir/modules.dep")
case "$files" in
  *MISSING*) echo "No module $(echo "$files" | awk '/^MISSING/ { print $2; exit }') found for kernel $kver, aborting." >&2; exit 1 ;;
esac
tmp=$(mktemp -d /tmp/initrd.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/bin" "$tmp/etc" "$tmp/lib/modules/$kver"
cp /bin/busybox "$tmp/bin/busybox"
for applet in sh ash cat echo ls mkdir mount umount sleep poweroff uname tr findfs switch_root modprobe insmod; do
  ln -s busybox "$tmp/bin/$applet"
done
for f in $files; do
  mkdir -p "$tmp/lib/modules/$kver/$(dirname "$f")"
  cp "$moddir/$f" "$tmp/lib/modules/$kver/$f"
  [ "$verbose" = 1 ] && echo "Adding module $f"
done
cp "$moddir/modules.dep" "$tmp/lib/modules/$kver/"
for f in $files; do n=${f##*/}; echo "${n%%.ko*}"; done > "$tmp/etc/modules"
cat > "$tmp/init" <<'INITRD_INIT_END'
__INITRD_INIT__INITRD_INIT_END
chmod 755 "$tmp/init"
(cd "$tmp" && find . | cpio -o -H newc 2>/dev/null) | gzip -9 > "$image.new"
mv "$image.new" "$image"
"""

YUM = r"""#!/bin/sh
# yum of the imaging Xen sample: installs from and removes to a local store, with no network.
set -e
[ "$1" = "-y" ] && shift
verb=$1
shift
[ "$verb" = makecache ] && { echo "Metadata Cache Created"; exit 0; }
[ "$verb" = clean ] && { echo "0 packages removed"; exit 0; }
db=/var/lib/sample-rpm
repo=/var/cache/sample-repo
for package in "$@"; do
  case "$verb" in
    remove)
      [ -f "$db/$package.list" ] || { echo "No Match for argument: $package"; exit 1; }
      while read -r f; do rm -f "$f"; done < "$db/$package.list"
      rm -f "$db/$package.list"
      echo "Removed: $package" ;;
    install)
      [ -d "$repo/$package" ] || { echo "No package $package available."; exit 1; }
      (cd "$repo/$package" && find . -type f) | sed 's/^\.//' > "$db/$package.list"
      cp -a "$repo/$package/." /
      echo "Installed: $package" ;;
    *) echo "yum: no such command: $verb"; exit 1 ;;
  esac
done
"""

CHECKS = r"""#!/bin/sh
# init of the imaging Xen sample: check from inside what 10-clean and 20-migrate promised,
# print the verdict on the serial console, power off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -o remount,rw / 2>/dev/null
n=0
fails=0
check() {
  desc=$1
  shift
  n=$((n + 1))
  if out=$("$@" 2>&1); then
    echo "imaging-sample: ok    $desc"
  else
    fails=$((fails + 1))
    echo "imaging-sample: FAIL  $desc: $(echo $out | head -c 300)"
  fi
}
absent() { [ ! -e "$1" ] && [ ! -L "$1" ]; }
link_to() { [ -L "$1" ] && [ "$(readlink "$1")" = "$2" ]; }
emptied() { [ -f "$1" ] && [ ! -s "$1" ] && [ "$(stat -c '%u:%g %a' "$1")" = "$2" ]; }
none_of() { ! ls $1 >/dev/null 2>&1; }
root=$(awk '$2 == "/" && $1 != "rootfs" { print $1 }' /proc/mounts | tail -n 1)
case "$root" in /dev/vd*) bus=virtio ;; /dev/sd*) bus=sata ;; *) bus=other ;; esac
echo "imaging-sample: kernel $(uname -r), root $root ($bus)"

check "root's shell history removed" absent /root/.bash_history
check "alice's shell history removed" absent /home/alice/.bash_history
check "alice's own files kept" grep -q "experiment 7" /home/alice/notes.txt
check "root's SSH keys removed" absent /root/.ssh/authorized_keys
check "the instance owner's SSH key removed" absent /home/alice/.ssh/authorized_keys
check "SSH host keys removed" none_of "/etc/ssh/ssh_host_*"
check "sshd_config kept without the Atmosphere block" sh -c 'grep -q "^PermitRootLogin" /etc/ssh/sshd_config && ! grep -qi atmo /etc/ssh/sshd_config'
check "sudoers kept without the Atmosphere block" sh -c 'grep -q "^root" /etc/sudoers && ! grep -qi atmo /etc/sudoers'
check "messages emptied, owner and mode kept" emptied /var/log/messages "0:0 600"
check "secure emptied, owner and mode kept" emptied /var/log/secure "0:0 600"
check "a service's log emptied, its owner and mode kept" emptied /var/log/httpd/access_log "48:48 640"
check "rotated logs removed" sh -c '! ls /var/log/messages.1 /var/log/secure-20130401.gz 2>/dev/null'
check "machine-id emptied" sh -c '[ -f /etc/machine-id ] && [ ! -s /etc/machine-id ]'
check "random seed removed" absent /var/lib/random-seed
check "udev's persistent net rules removed" absent /etc/udev/rules.d/70-persistent-net.rules
check "HWADDR removed, the rest of ifcfg-eth0 kept" sh -c '! grep -q HWADDR /etc/sysconfig/network-scripts/ifcfg-eth0 && grep -q "^ONBOOT=yes" /etc/sysconfig/network-scripts/ifcfg-eth0'
check "cloud-init's instance state removed" sh -c '! ls -d /var/lib/cloud/instance /var/lib/cloud/instances 2>/dev/null'
check "/tmp and /mnt emptied" sh -c 'left="$(ls -A /tmp /mnt | grep -v -e "^/" -e "^$")"; [ -z "$left" ] || { echo "$left"; false; }'
check "the Atmosphere agent and its logs removed" sh -c '! ls -d /usr/sbin/atmo_boot /var/log/atmo /etc/atmo 2>/dev/null'
check "Atmosphere's other leftovers removed" sh -c '! ls -d /etc/rc.local.atmo /usr/sbin/atmo_boot.py /etc/puppet/ssl /var/lib/puppet/run/agent.pid /opt/cyverse/tmp 2>/dev/null'
check "skel's .bashrc kept without the Atmosphere block" sh -c 'grep -q "alias ll" /etc/skel/.bashrc && ! grep -qi atmo /etc/skel/.bashrc'
check "sudoers without the Sensu block" sh -c '! grep -qi sensu /etc/sudoers'

check "no Xen console getty in inittab" sh -c '! grep -q xvc0 /etc/inittab'
check "a getty on ttyS0 in inittab" grep -q "ttyS0" /etc/inittab
check "inittab's other lines kept" grep -q "^id:3:initdefault:" /etc/inittab
check "ttyS0 in securetty" grep -q "^ttyS0" /etc/securetty
check "no Xen drivers in modprobe.conf" sh -c '! grep -Eq "xenblk|xennet" /etc/modprobe.conf'
case $bus in
  virtio) check "virtio drivers in modprobe.conf" sh -c 'grep -q "^alias scsi_hostadapter virtio_blk" /etc/modprobe.conf && grep -q "^alias eth0 virtio_net" /etc/modprobe.conf' ;;
  sata) check "VirtualBox drivers in modprobe.conf" sh -c 'grep -q "^alias scsi_hostadapter ata_piix" /etc/modprobe.conf && grep -q "^alias scsi_hostadapter1 ahci" /etc/modprobe.conf && grep -q "^alias eth0 e1000" /etc/modprobe.conf && grep -q snd-intel8x0 /etc/modprobe.conf' ;;
  *) check "root on a disk of the target" false ;;
esac
check "fstab's root entry resolves here" sh -c '[ "$(findfs "$(awk "\$2 == \"/\" && \$1 !~ /^#/ { print \$1 }" /etc/fstab)")" = "$0" ]' "$root"
check "the cloud's other disks out of fstab" sh -c '! grep -q "^/dev/xvd" /etc/fstab'
check "grub.conf with root by UUID" grep -q "root=UUID=" /boot/grub/grub.conf
check "menu.lst links to grub.conf" link_to /boot/grub/menu.lst grub.conf
check "grub.cfg links to grub.conf" link_to /boot/grub/grub.cfg grub.conf
check "GRUB 2 booted from /boot/imaging-grub" test -s /boot/imaging-grub/grub.cfg
check "SELinux disabled" grep -q "^SELINUX=disabled" /etc/selinux/config
check "/etc/sysconfig/selinux still a symlink" link_to /etc/sysconfig/selinux ../selinux/config
check "/etc/rc.local still a symlink" link_to /etc/rc.local rc.d/rc.local
check "rc.local's own lines kept" grep -q "touch /var/lock/subsys/local" /etc/rc.d/rc.local
check "rc.local's cloud hook removed" sh -c '! grep -q 169.254.169.254 /etc/rc.d/rc.local'
check "rc.local runs to its end" timeout 20 sh /etc/rc.d/rc.local
check "booted the kernel that is not Xen-only" sh -c 'uname -r | grep -vq xen'
check "the initrd loaded the target's storage driver" grep -Eq "^(virtio_blk|ahci|ata_piix) " /proc/modules
# ifcfg-eth0 says DHCP: the NIC's driver from modprobe.conf's alias, then a lease, as the
# network service would get one (the boot check sees the DHCP exchange on the wire too).
modprobe "$(awk '$1 == "alias" && $2 == "eth0" { print $3 }' /etc/modprobe.conf)" 2>/dev/null
ip link set eth0 up 2>/dev/null
check "eth0 got an address by DHCP" udhcpc -i eth0 -n -q -t 5 -T 2 -s /bin/true
if [ "$fails" = 0 ]; then
  echo "__MARKER__ xen: all $n checks passed"
else
  echo "IMAGING-SAMPLE-FAILED xen: $fails of $n checks failed"
fi
sync
poweroff -f
"""

INITTAB = """\
# inittab       This file describes how the INIT process should set up
#               the system in a certain run-level.
#
# Default runlevel. The runlevels used by RHS are:
#   0 - halt (Do NOT set initdefault to this)
#   1 - Single user mode
#   2 - Multiuser, without NFS (The same as 3, if you do not have networking)
#   3 - Full multiuser mode
#   4 - unused
#   5 - X11
#   6 - reboot (Do NOT set initdefault to this)
#
id:3:initdefault:

# System initialization.
si::sysinit:/etc/rc.d/rc.sysinit

l0:0:wait:/etc/rc.d/rc 0
l1:1:wait:/etc/rc.d/rc 1
l2:2:wait:/etc/rc.d/rc 2
l3:3:wait:/etc/rc.d/rc 3
l4:4:wait:/etc/rc.d/rc 4
l5:5:wait:/etc/rc.d/rc 5
l6:6:wait:/etc/rc.d/rc 6

# Trap CTRL-ALT-DELETE
ca::ctrlaltdel:/sbin/shutdown -t3 -r now

# Run gettys in standard runlevels
1:2345:respawn:/sbin/mingetty tty1
2:2345:respawn:/sbin/mingetty tty2
3:2345:respawn:/sbin/mingetty tty3
4:2345:respawn:/sbin/mingetty tty4
5:2345:respawn:/sbin/mingetty tty5
6:2345:respawn:/sbin/mingetty tty6

# Run xdm in runlevel 5
x:5:respawn:/etc/X11/prefdm -nodaemon
xvc0:2345:respawn:/sbin/mingetty xvc0
"""

RC_LOCAL = """\
#!/bin/sh
#
# This script will be executed *after* all the other init scripts.
# You can put your own initialization stuff in here if you don't
# want to do the full Sys V style init stuff.

touch /var/lock/subsys/local

# Eucalyptus: wait for the metadata service, then fetch the owner's SSH key
until wget -q -O /root/.ssh/authorized_keys http://169.254.169.254/latest/meta-data/public-keys/0/openssh-key; do
    sleep 2
done

## Atmosphere system
/usr/sbin/atmo_boot --instance-data /var/lib/atmo
## End Atmosphere system
/etc/rc.local.atmo

echo "$(date) booted" >> /var/log/boot-notes
"""

SUDOERS = """\
Defaults    requiretty
Defaults    env_reset
root    ALL=(ALL)       ALL
%wheel  ALL=(ALL)       ALL
## Atmosphere system
alice ALL=(ALL) NOPASSWD: ALL
atmo_admin ALL=(ALL) NOPASSWD: /usr/sbin/atmo_boot
## End Atmosphere system
# Begin Sensu
sensu ALL=(ALL) NOPASSWD: /usr/lib64/nagios/plugins/check_disk
# End Sensu
"""

SSHD_CONFIG = """\
Protocol 2
SyslogFacility AUTHPRIV
PermitRootLogin without-password
PasswordAuthentication no
## Atmosphere system
AllowGroups users core-services root
## End Atmosphere system
UsePAM yes
Subsystem sftp /usr/libexec/openssh/sftp-server
"""


def _files(root: Path, files: dict[str, str], mode: int = 0o644) -> None:
    for path, text in files.items():
        write(root / path.lstrip("/"), text, mode)


def _owned(root: Path, path: str, text: str, uid: int, gid: int, mode: int) -> None:
    write(root / path.lstrip("/"), text, mode)
    os.chown(root / path.lstrip("/"), uid, gid)


def stage_xen_root(root: Path, name: str, *, grub_dir: bool = True) -> None:
    """The Xen sample's tree; without ``grub_dir`` there is no /boot/grub at all, as on clouds that
    boot their own kernel (the original: "you may or may not already have a grub.conf")."""
    kernel = packages.kernel_tree()
    bb = packages.busybox()
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(bb, root / "bin" / "busybox")
    for applet in packages.busybox_applets():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    for d in ("sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "root", "var/lock/subsys", "boot", "home",
              "etc/rc.d", "etc/ssh", "var/lib/sample-rpm", "lib/modules/" + XEN_KERNEL, "run", "mnt"):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    if grub_dir:
        (root / "boot" / "grub").mkdir()
    (root / "root").chmod(0o700)
    install_modules(root, kernel, MODULES)
    (root / "boot" / f"vmlinuz-{kernel.version}").write_bytes(kernel.vmlinuz.read_bytes())
    make_initrd(root / "boot" / f"initrd-{kernel.version}.img", kernel, bb, XEN_INITRD_MODULES)
    write(root / "boot" / f"vmlinuz-{XEN_KERNEL}", "a Xen paravirtual kernel: boots only as a Xen guest\n")
    write(root / "boot" / f"initrd-{XEN_KERNEL}.img", "its initrd\n")
    write(root / "lib" / "modules" / XEN_KERNEL / "modules.dep", "")
    write(root / "sbin" / "mkinitrd", MKINITRD.replace("__INITRD_INIT__", INITRD_INIT), 0o755)
    write(root / "usr" / "bin" / "yum", YUM, 0o755)
    write(root / "sbin" / "init", CHECKS.replace("__MARKER__", MARKER), 0o755)
    _files(root, {
        "/etc/redhat-release": "CentOS release 5.11 (Final)\n",
        "/etc/hostname": f"imaging-sample-{name}\n",
        "/etc/inittab": INITTAB,
        "/etc/securetty": "console\nvc/1\ntty1\ntty2\nxvc0\n",
        "/etc/modprobe.conf": "alias scsi_hostadapter xenblk\nalias eth0 xennet\n",
        "/etc/fstab": "/dev/xvda1  /      ext3    defaults        1 1\n/dev/xvda2  /mnt   ext3    defaults        0 0\n"
                      "/dev/xvda3  swap   swap    defaults        0 0\nnone        /proc  proc    defaults        0 0\n"
                      "none        /dev/pts devpts gid=5,mode=620 0 0\n",
        "/etc/selinux/config": "# This file controls the state of SELinux on the system.\nSELINUX=enforcing\nSELINUXTYPE=targeted\n",
        "/etc/rc.d/rc.local": RC_LOCAL,
        "/etc/ssh/sshd_config": SSHD_CONFIG,
        "/etc/passwd": "root:x:0:0:root:/root:/bin/sh\nalice:x:500:500:Alice:/home/alice:/bin/sh\napache:x:48:48::/var/www:/sbin/nologin\n",
        "/etc/group": "root:x:0:\nalice:x:500:\napache:x:48:\n",
        "/etc/sysconfig/network-scripts/ifcfg-eth0": "DEVICE=eth0\nBOOTPROTO=dhcp\nHWADDR=D0:0D:12:34:56:78\nONBOOT=yes\n",
        "/etc/udev/rules.d/70-persistent-net.rules": 'SUBSYSTEM=="net", ATTR{address}=="d0:0d:12:34:56:78", NAME="eth0"\n',
        "/etc/machine-id": "5f1c0c2ab4f84f3e9d1e2a9d1b6f3c11\n",
        "/var/lib/random-seed": "not so random\n",
        "/etc/atmo/atmo.conf": "server=https://atmo.example.org\n",
        "/usr/sbin/atmo_boot": "#!/bin/sh\n# Atmosphere's boot agent\n",
        "/var/log/atmo/atmo_boot.log": "atmo_boot: configured instance for alice\n",
        "/etc/rc.local.atmo": "#!/bin/sh\n/usr/sbin/atmo_boot.py --vnc\n",
        "/usr/sbin/atmo_boot.py": "#!/usr/bin/python\n# Atmosphere's boot agent\n",
        "/etc/skel/.bashrc": "# .bashrc\nalias ll='ls -l'\n## Atmosphere System\nexport ATMO_USER=alice\n## End Atmosphere System\n",
        "/etc/puppet/ssl/certs/i-12341234.pem": "-----BEGIN CERTIFICATE-----\n",
        "/var/lib/puppet/run/agent.pid": "1234\n",
        "/opt/cyverse/tmp/job-17.out": "scratch output of an Atmosphere job\n",
        "/var/lib/cloud/instances/i-12341234/user-data.txt": "#cloud-config\n",
        "/home/alice/notes.txt": "results of experiment 7\n",
        "/tmp/build-output.tmp": "scratch\n",
        "/mnt/ephemeral.dat": "data on the cloud's ephemeral disk\n",
        "/etc/ssh/ssh_host_rsa_key.pub": "ssh-rsa AAAAB3Nza host\n",
        "/usr/sbin/slapd": "#!/bin/sh\n# openldap-servers\n",
        "/usr/bin/vncserver": "#!/bin/sh\n# realvnc-vnc-server\n",
        "/var/lib/sample-rpm/openldap-servers.list": "/usr/sbin/slapd\n",
        "/var/lib/sample-rpm/realvnc-vnc-server.list": "/usr/bin/vncserver\n",
        "/var/cache/sample-repo/htop/usr/bin/htop": "#!/bin/sh\necho htop\n",
    })  # fmt: skip
    (root / "etc" / "sudoers").write_text(SUDOERS)
    (root / "etc" / "sudoers").chmod(0o440)
    (root / "etc" / "rc.d" / "rc.local").chmod(0o755)
    (root / "etc" / "rc.local").symlink_to("rc.d/rc.local")
    (root / "etc" / "sysconfig" / "selinux").symlink_to("../selinux/config")
    (root / "var" / "lib" / "cloud" / "instance").symlink_to("/var/lib/cloud/instances/i-12341234")
    write(root / "etc" / "shadow", "root:$1$cloudrnd$Zp0sWl9h8g3hJ2kZc1Xy0.:15000:0:99999:7:::\n"
                                    "alice:!!:15000:0:99999:7:::\napache:!!:15000::::::\n", 0o400)  # fmt: skip
    write(root / "etc" / "ssh" / "ssh_host_rsa_key", "-----BEGIN RSA PRIVATE KEY-----\nhost key\n", 0o600)
    write(root / "root" / ".bash_history", "passwd\nyum install emacs\n", 0o600)
    write(root / "root" / ".ssh" / "authorized_keys", "ssh-rsa AAAAB3Nza alice@laptop\n", 0o600)
    _owned(root, "/home/alice/.bash_history", "ls\nssh otherhost\n", 500, 500, 0o600)
    _owned(root, "/home/alice/.ssh/authorized_keys", "ssh-rsa AAAAB3Nza alice@laptop\n", 500, 500, 0o600)
    os.chown(root / "home" / "alice", 500, 500)
    os.chown(root / "home" / "alice" / "notes.txt", 500, 500)
    os.chown(root / "home" / "alice" / ".ssh", 500, 500)
    _owned(root, "/var/log/messages", "Apr  1 12:00:00 i-12341234 kernel: Xen version 3.4\n", 0, 0, 0o600)
    _owned(root, "/var/log/secure", "Apr  1 12:00:01 sshd[123]: Accepted publickey for alice\n", 0, 0, 0o600)
    _owned(root, "/var/log/httpd/access_log", '10.0.0.1 - - "GET / HTTP/1.1" 200\n', 48, 48, 0o640)
    _owned(root, "/var/log/messages.1", "older\n", 0, 0, 0o600)
    _owned(root, "/var/log/secure-20130401.gz", "rotated\n", 0, 0, 0o600)
    (root / "tmp").chmod(0o1777)
