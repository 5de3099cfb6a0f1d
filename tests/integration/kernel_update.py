"""A converted guest's next kernel update, done as its user would do it: boot the artifact, log
in over SSH, install a newer kernel from a local package with the guest's own package manager (no
network: QEMU's user network is restricted), reboot, and read ``uname -r``.

The login comes the way a cloud gives it: a NoCloud seed disk (``cidata``) whose user-data
makes a user with a key; the guest's own cloud-init reads it (10-clean removed the old instance's
state, so it runs as on a new instance). The artifact itself is never written (``snapshot=on``:
the guest's writes live in QEMU's temporary overlay, which a reboot inside the VM keeps).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imaging import config, tools
from imaging.boot import evidence
from imaging.boot.qemu import choose_accel
from imaging.boot.verify import disk_format, qemu_argv

USER = "tester"


@dataclass(frozen=True)
class Updated:
    before: str  # uname -r before the update
    after: str  # and after the reboot
    links: str  # what the kernel link pointed at after the install
    install_seconds: float
    serial: Path
    seconds: float  # the whole of it: boot, install, reboot


def _seed(tmp: Path, public_key: str) -> Path:
    meta = tmp / "meta-data"
    meta.write_text("instance-id: iid-kernel-update\nlocal-hostname: updated\n")
    user = tmp / "user-data"
    user.write_text(
        "#cloud-config\nusers:\n"
        f"  - name: {USER}\n    shell: /bin/bash\n    sudo: 'ALL=(ALL) NOPASSWD:ALL'\n"
        f"    ssh_authorized_keys: ['{public_key}']\n"
        # The new kernel's initrd for this machine only, as an admin may have it: a generic one
        # takes its initrd tool minutes under TCG. What boots it is the same either way.
        "write_files:\n"
        "  - {path: /etc/initramfs-tools/conf.d/zz-this-machine.conf, content: 'MODULES=dep'}\n"
        "  - {path: /etc/dracut.conf.d/zz-this-machine.conf, content: 'hostonly=\"yes\"'}\n"
    )
    seed = tmp / "seed.img"
    subprocess.run(["mkfs.vfat", "-n", "CIDATA", "-C", seed, "2048"], check=True, capture_output=True)
    subprocess.run(["mcopy", "-i", seed, meta, user, "::"], check=True, capture_output=True)
    return seed


class _Ssh:
    def __init__(self, key: Path, port: int) -> None:
        self.base = ["-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                     "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"]  # fmt: skip
        self.port = port

    def run(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ssh", *self.base, "-p", str(self.port), f"{USER}@127.0.0.1", command],
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

    def out(self, command: str, timeout: float = 120) -> str:
        proc = self.run(command, timeout)
        assert proc.returncode == 0, f"{command}: {proc.stderr or proc.stdout}"
        return proc.stdout.strip()

    def put(self, path: Path) -> None:
        subprocess.run(["scp", *self.base, "-P", str(self.port), path, f"{USER}@127.0.0.1:/tmp/"],
                       check=True, capture_output=True, timeout=600)  # fmt: skip

    def wait(self, until: float, not_boot: str = "") -> str:
        """The boot id once a login works (and the boot is not ``not_boot``)."""
        while time.monotonic() < until:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc = self.run("cat /proc/sys/kernel/random/boot_id", timeout=30)
                if proc.returncode == 0 and proc.stdout.strip() and proc.stdout.strip() != not_boot:
                    return proc.stdout.strip()
            time.sleep(5)
        raise AssertionError("no SSH login into the guest in time")


@contextlib.contextmanager
def _running(artifact: Path, target: str, tmp: Path, seed: Path, port: int) -> Iterator[Path]:
    serial = tmp / "serial.log"
    argv = qemu_argv(artifact, disk_format(artifact), config.load_target(target), choose_accel().accel, serial,
                     ssh_port=port)  # fmt: skip
    argv.remove("-no-reboot")  # the point is the reboot
    argv += ["-drive", f"file={seed},format=raw,if=virtio,readonly=on"]
    with tools.spawn(argv):
        yield serial


def update_kernel(
    artifact: Path, target: str, deb: Path, tmp: Path, *, install: str, limit: float = 1500
) -> Updated:
    """Boot ``artifact``, install ``deb`` with ``install`` (a command taking the path), reboot."""
    tmp.mkdir(parents=True, exist_ok=True)
    key = tmp / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    seed = _seed(tmp, key.with_suffix(".pub").read_text().strip())
    port = evidence.free_port()
    until = time.monotonic() + limit
    with _running(artifact, target, tmp, seed, port) as serial:
        ssh = _Ssh(key, port)
        first = ssh.wait(until)
        before = ssh.out("uname -r")
        ssh.put(deb)
        t0 = time.monotonic()
        ssh.out(f"sudo {install} /tmp/{deb.name}", timeout=max(60, until - time.monotonic()))
        seconds = time.monotonic() - t0
        links = ssh.out(
            "for l in /vmlinuz /boot/vmlinuz; do test -L $l && echo $l '->' $(readlink $l); done; true"
        )
        ssh.run("sudo systemctl reboot", timeout=60)
        ssh.wait(until, not_boot=first)
        after = ssh.out("uname -r")
    return Updated(
        before, after, links, round(seconds, 1), serial, round(time.monotonic() + limit - until, 1)
    )
