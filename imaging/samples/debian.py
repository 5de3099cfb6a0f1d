"""``sample:debian12`` and ``sample:debian13``: real Debian cloud instances, built from Debian's own
packages by mmdebstrap, as they are when someone asks for an image of them.

Each is what a Xen/EC2 instance's root disk holds: a partitionless ext4 filesystem with systemd,
the cloud kernel (``linux-image-cloud-amd64``: virtio and Xen drivers, no AHCI, no e1000),
cloud-init, openssh-server and ifupdown with ``iface eth0 inet dhcp``, fstab on ``/dev/xvda1``,
no apt package lists (cloud images ship without them). And what running did to it: SSH host
keys and a machine-id, a key cloud-init injected for the cloud user and for root, shell
histories, logs, DHCP leases, cloud-init's instance state, and the user's own data.

The filesystem is made by the release's own ``mke2fs`` with its own ``mke2fs.conf`` (run from
the built tree, in a sandbox), so a Debian 13 root carries that release's ext4 defaults and the
bootloader has to read what the guest's tools write.

A unit of the guest's own (``imaging-sample-check.service``) checks on every boot, from inside,
what cleaning and migration promise: new machine-id and host keys, the injected keys,
histories, old logs and cloud-init state gone, the user's data intact with its owner, eth0 up,
sshd running, no failed unit. It prints the sample marker, or ``IMAGING-SAMPLE-FAILED`` and what
failed, on the console.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imaging import tools
from imaging.errors import ImagingError
from imaging.samples.kvm import MARKER, write

RELEASES = {"debian12": "bookworm", "debian13": "trixie"}
MIRROR = os.environ.get("IMAGING_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ["systemd-sysv", "linux-image-cloud-amd64", "cloud-init", "openssh-server", "ifupdown",
            "isc-dhcp-client", "iproute2", "sudo", "netbase", "e2fsprogs"]  # fmt: skip
# What the cloud and its user left in the instance (and what the check looks for afterwards).
INSTANCE_ID = "i-0c10ad5eed0000001"
MACHINE_ID = "0c10ad5eed0000000000000000000001"
INJECTED_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMrbQXl6cbD1Zxt0zUeo0Kfp3vOWq/fM8wqRgkE0qmGn alice@laptop"
)
DATA = "run,temperature,yield\n1,300,0.41\n2,310,0.47\n3,320,0.52\n"
DATA_PATH = "/home/debian/results/experiment-7.csv"  # debian12's; an Instance's own is data_path
# As the cloud's image builder wrote it (a sample on another layout gives its own).
FSTAB = "# written by the cloud's image builder\n/dev/xvda1\t/\text4\trw,discard,errors=remount-ro\t0 1\n"

CHECK = r"""#!/bin/sh
# imaging sample check: what cleaning and migration promise, seen from inside the booted guest.
fail=""
check() {
    what="$1"; shift
    if "$@" >/dev/null 2>&1; then echo "imaging-check ok: $what"; else echo "imaging-check FAILED: $what"; fail="$fail; $what"; fi
}
check "a new machine-id" sh -c 'grep -qE "^[0-9a-f]{32}$" /etc/machine-id && ! grep -q __MACHINE_ID__ /etc/machine-id'
check "new SSH host keys" sh -c 'ls /etc/ssh/ssh_host_*_key.pub && ! cat /etc/ssh/ssh_host_*_key.pub | grep -qF -e __HOST_KEYS__'
check "no injected SSH key" sh -c '! grep -rqsF alice@laptop /root/.ssh /home/__USER__/.ssh'
check "no shell histories" sh -c '! ls /root/.bash_history /home/__USER__/.bash_history /home/__USER__/.python_history'
check "no cloud-init instance state" test ! -e /var/lib/cloud/instances/__INSTANCE_ID__
check "no old logs" sh -c '! grep -qs "Accepted publickey for __USER__" __AUTH_LOG__'
check "no old DHCP leases" sh -c '! grep -qs 10.31.7.19 __LEASE__'
check "user data intact" sh -c 'echo "__DATA_SHA256__  __DATA_PATH__" | sha256sum -c'
check "user data keeps its owner" sh -c 'test "$(stat -c %u:%g __DATA_PATH__)" = 1000:1000'
check "eth0 has an address" sh -c 'ip -4 -o addr show dev eth0 | grep -q inet'
check "sshd running" sh -c 'for u in ssh sshd; do systemctl cat $u.service && exec systemctl is-active $u.service; done; exit 1'
check "no failed unit" sh -c 'test -z "$(systemctl --failed --no-legend --plain)"'
if [ -z "$fail" ]; then echo "__MARKER__ $(hostname)"; else echo "IMAGING-SAMPLE-FAILED:$fail"; fi
"""

CHECK_UNIT = """\
[Unit]
Description=imaging sample check (what cleaning and migration promise)
Wants=network-online.target
After=network-online.target ssh.service sshd.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/imaging-sample-check
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
"""


IFUPDOWN = (("/etc/network/interfaces.d/50-cloud-init", "# written by cloud-init\nauto lo\niface lo inet loopback\n\n"
             "auto eth0\niface eth0 inet dhcp\n", 0o644),)  # fmt: skip


@dataclass(frozen=True)
class Instance:
    """Where the instance's distro keeps what the cloud and its user left (Debian's by default):
    another family's sample names its own cloud user, logs, network configuration and lease, and
    the check looks for each where that family keeps it."""

    user: str = "debian"  # the cloud user, uid 1000
    gecos: str = "Debian"
    base: tuple[str, ...] = tuple(PACKAGES)  # installed besides stage_debian_root's packages
    auth_log: str = "/var/log/auth.log"
    network: tuple[tuple[str, str, int], ...] = IFUPDOWN  # (path, text, mode) as cloud-init writes them
    lease: tuple[str, str] = ("/var/lib/dhcp/dhclient.eth0.leases",
                              'lease {\n  interface "eth0";\n  fixed-address 10.31.7.19;\n}\n')  # fmt: skip

    @property
    def home(self) -> str:
        return f"/home/{self.user}"

    @property
    def data_path(self) -> str:
        return f"{self.home}/results/experiment-7.csv"


def _host_keys(root: Path) -> list[str]:
    return sorted(p.read_text().split()[1] for p in (root / "etc" / "ssh").glob("ssh_host_*_key.pub"))


# Where a sample's own checks go: before the verdict line.
_VERDICT = 'if [ -z "$fail" ]; then'


def check_script(root: Path, checks: str = "", instance: Instance = Instance()) -> str:
    """The guest's check with ``checks`` before its verdict, for ``instance``'s user and files."""
    check = CHECK.replace(_VERDICT, checks + _VERDICT)
    for key, value in {"__MACHINE_ID__": MACHINE_ID, "__INSTANCE_ID__": INSTANCE_ID, "__DATA_PATH__": instance.data_path,
                       "__DATA_SHA256__": hashlib.sha256(DATA.encode()).hexdigest(), "__MARKER__": MARKER,
                       "__HOST_KEYS__": " -e ".join(_host_keys(root)), "__USER__": instance.user,
                       "__AUTH_LOG__": instance.auth_log, "__LEASE__": instance.lease[0]}.items():  # fmt: skip
        check = check.replace(key, value)
    return check


def stage_debian_root(
    root: Path, name: str, *, packages: Sequence[str] = (), fstab: str = FSTAB, checks: str = "",
    instance: Instance = Instance(),
) -> None:  # fmt: skip
    """Build the instance's tree in ``root`` (empty): mmdebstrap, then what running left.
    ``packages`` are installed besides ``instance.base``, ``fstab`` is the instance's /etc/fstab,
    and ``checks`` (``check "what" command...`` lines) run in the guest's check before its verdict."""
    release = RELEASES[name]
    tools.require_tools("mmdebstrap", reason="build a real Debian guest", hint="apt install mmdebstrap")
    tools.run(
        ["mmdebstrap", "--variant=minbase", f"--include={','.join([*instance.base, *packages])}", "--aptopt=Acquire::Retries \"3\"",
         "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
         "--dpkgopt=path-exclude=/usr/share/locale/*", release, root, MIRROR],
        timeout=1800,
    )  # fmt: skip
    if not _host_keys(root):
        raise ImagingError(
            f"mmdebstrap built {release} without SSH host keys (openssh-server not configured?)"
        )
    host = f"{INSTANCE_ID}"
    user = instance.user
    files = {
        "/etc/hostname": f"{host}\n",
        "/etc/hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{host}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        "/etc/fstab": fstab,
        "/etc/machine-id": f"{MACHINE_ID}\n",
        "/etc/cloud/cloud.cfg.d/90_dpkg.cfg": "datasource_list: [ Ec2, OpenStack, NoCloud, None ]\n",
        "/var/lib/cloud/data/instance-id": f"{INSTANCE_ID}\n",
        f"/var/lib/cloud/instances/{INSTANCE_ID}/user-data.txt": "#cloud-config\npackages: [htop]\n",
        f"/var/lib/cloud/instances/{INSTANCE_ID}/sem/config_ssh": "",
        instance.auth_log: f"Nov 20 10:01:02 i-0c10 sshd[812]: Accepted publickey for {user} from 10.31.7.1\n",
        "/var/log/cloud-init.log": f"2026-11-20 10:00:41 - util.py[DEBUG]: Cloud-init v. 22.4 running 'init' ({INSTANCE_ID})\n",
        "/var/log/cloud-init-output.log": "Cloud-init v. 22.4 finished\n",
        instance.lease[0]: instance.lease[1],
        "/root/.bash_history": "sudo -i\ncat /etc/shadow\n",
        "/root/.ssh/authorized_keys": f'no-port-forwarding,command="echo \'Please login as the user \\"{user}\\"\'" '
                                      f"{INJECTED_KEY}\n",
    }  # fmt: skip
    for path, text in files.items():
        write(root / path.lstrip("/"), text, 0o600 if path.startswith("/root") else 0o644)
    for path, text, mode in instance.network:
        write(root / path.lstrip("/"), text, mode)
    (root / "var" / "lib" / "cloud" / "instance").symlink_to(f"/var/lib/cloud/instances/{INSTANCE_ID}")
    # The cloud user, uid 1000, with the key cloud-init injected, its history and its data.
    with open(root / "etc" / "passwd", "a") as f:
        f.write(f"{user}:x:1000:1000:{instance.gecos}:{instance.home}:/bin/bash\n")
    with open(root / "etc" / "group", "a") as f:
        f.write(f"{user}:x:1000:\n")
    with open(root / "etc" / "shadow", "a") as f:
        f.write(f"{user}:*:20400:0:99999:7:::\n")
    home = root / instance.home.lstrip("/")
    for path, text in {".ssh/authorized_keys": f"{INJECTED_KEY}\n", ".bash_history": "ls\npython3 analyse.py\n",
                       ".python_history": "import csv\n", instance.data_path.removeprefix(f"{instance.home}/"): DATA}.items():  # fmt: skip
        write(home / path, text, 0o600 if path.startswith(".") else 0o644)
    for dirpath, dirnames, filenames in os.walk(home):
        for entry in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.chown(entry, 1000, 1000, follow_symlinks=False)
    (home / ".ssh").chmod(0o700)
    write(
        root / "usr" / "local" / "sbin" / "imaging-sample-check", check_script(root, checks, instance), 0o755
    )
    write(root / "etc" / "systemd" / "system" / "imaging-sample-check.service", CHECK_UNIT)
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "imaging-sample-check.service").symlink_to("/etc/systemd/system/imaging-sample-check.service")


def make_filesystem(root: Path, dest: Path, label: str, uuid: str) -> None:
    """A partitionless ext4 image of ``root`` in ``dest``, made by the guest's own mke2fs with
    its own mke2fs.conf (its release's defaults), run with the guest's /usr in a sandbox."""
    used = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())
    size_mib = (int(used * 1.4) >> 20) + 384
    with tempfile.TemporaryDirectory(prefix="mkfs-", dir=dest.parent) as out:
        image = Path(out) / "root.img"
        guest_tool(root, ["/usr/sbin/mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-U", uuid,
                          "-E", "root_owner=0:0", "-d", "/src", "/out/root.img", f"{size_mib}M"],
                   binds=["--ro-bind", root, "/src", "--bind", out, "/out"])  # fmt: skip
        shutil.move(image, dest)


def guest_tool(root: Path, argv: Sequence[str | Path], *, binds: Sequence[str | Path] = ()) -> None:
    """Run one of the guest's own tools (``argv``, a path in the guest) from the built tree in
    ``root``, in a sandbox: the guest's own top level (its /usr, /etc and the links into /usr of a
    merged-/usr system) read-only, a minimal /dev, its own /proc, no network, no host /sys.
    ``binds`` are more bwrap arguments, after /dev: the tree to copy, the output, a device."""
    tools.require_tools("bwrap", reason="run the guest's own tools", hint="apt install bubblewrap")
    view: list[str | Path] = []
    for entry in sorted(root.iterdir()):
        if entry.name in ("dev", "proc", "sys", "run", "tmp"):
            continue
        if entry.is_symlink():
            view += ["--symlink", os.readlink(entry), f"/{entry.name}"]
        elif entry.is_dir():
            view += ["--ro-bind", entry, f"/{entry.name}"]
    tools.run(
        ["bwrap", *view, "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", *binds,
         "--unshare-pid", "--unshare-net", "--unshare-ipc", "--die-with-parent", "--", *argv],
        timeout=1800,
    )  # fmt: skip
