"""A Xen CentOS 5 instance comes out clean and boots on VirtualBox and OpenStack machines."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from imaging.boot import verify
from imaging.clouds import acquire
from imaging.disk import bootable, bootloader, ext
from imaging.errors import GuestError
from imaging.guest import access, clean, migrate
from imaging.samples import catalog, packages
from imaging.workspace import Workspace

from .conftest import Cli, last_json, leftovers

# openssl passwd -6 -salt imagingsample imaging
ROOT_HASH = (
    "$6$imagingsample$D3AGSsz.IAGP/W/EA6WvUK0TgjJWuYs6jHx9G1P3c/pnpeBbVWD47qqArRt6csJQLTL9DWQW/RXUxGYik.ZET0"
)


def acquired(tmp_path: Path, source: str = "sample:xen") -> Workspace:
    ws = Workspace.open(tmp_path / "run")
    ws.save_result("00-acquire", acquire.acquire(acquire.inspect(source), ws, hash_source=False).to_dict())
    return ws


def snapshot(ws: Workspace) -> dict[str, tuple[object, ...]]:
    """Every file of the instance: type, mode, owner, size, content hash or link target."""
    found: dict[str, tuple[object, ...]] = {}
    with access.reading(ws) as g:
        root = g.root
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                rel = "/" + str(p.relative_to(root))
                if stat.S_ISREG(st.st_mode):
                    detail: object = hashlib.sha256(p.read_bytes()).hexdigest()
                elif stat.S_ISLNK(st.st_mode):
                    detail = os.readlink(p)
                else:
                    detail = ""
                found[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                              st.st_size if not stat.S_ISDIR(st.st_mode) else 0, detail)  # fmt: skip
    return found


def test_clean_changes_only_what_it_names_and_the_dry_run_nothing(tmp_path: Path) -> None:
    ws = acquired(tmp_path)
    digest = hashlib.sha256(ws.instance.read_bytes()).hexdigest()
    before = snapshot(ws)
    plan = clean.plan(ws, [], platforms=["atmosphere", "eucalyptus"])
    assert hashlib.sha256(ws.instance.read_bytes()).hexdigest() == digest  # a dry run changes nothing
    assert plan.profile == "centos5" and "redhat-release" in plan.profile_reason
    done = clean.apply(ws, [], platforms=["atmosphere", "eucalyptus"])
    assert [(a.op, a.path, a.action) for a in done.actions] == [
        (a.op, a.path, a.action) for a in plan.actions
    ]
    after = snapshot(ws)
    named = {a.path for a in done.actions}
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    outside = {p for p in changed if not any(p == n or p.startswith(n + "/") for n in named)}
    assert outside == set(), outside
    # Logs are emptied in place: same owner and mode.
    assert after["/var/log/httpd/access_log"][:5] == (stat.S_IFREG, 0o640, 48, 48, 0)
    assert "/home/alice/notes.txt" in after and "/var/log/messages.1" not in after
    assert after["/etc/rc.local"][5] == "rc.d/rc.local"


def test_without_migration_the_xen_sample_does_not_boot(tmp_path: Path) -> None:
    ws = acquired(tmp_path)
    info = ws.result("00-acquire")
    layout = bootable.plan_layout(info["size_bytes"], info["block_size"])
    bootable.place_filesystem(ws, info, layout)
    bootloader.install_grub(ws, layout.start_sector, info["uuid"])
    bootable.finish_disk(ws, layout)
    boot = verify.boot(ws.disk, "openstack", marker=catalog.MARKER, timeout=120, log_dir=ws.verify)
    assert boot.verdict == "failed"
    assert "initrd: root UUID=" in boot.matched and "not found" in boot.matched
    # A boot that fails still leaves the screen it ended on.
    assert boot.screen == str(ws.verify / "screen.png") and (ws.verify / "screen.png").stat().st_size > 0


def test_only_xen_kernels_is_a_clear_error(tmp_path: Path) -> None:
    ws = acquired(tmp_path)
    version = packages.kernel_tree().version
    subprocess.run(
        ["debugfs", "-w", "-R", f"rm /boot/vmlinuz-{version}", ws.instance], check=True, capture_output=True
    )
    with pytest.raises(GuestError, match=r"only Xen kernels .* install a non-Xen kernel"):
        migrate.plan(ws, "openstack")


def test_hostile_symlinks_never_reach_the_host(tmp_path: Path) -> None:
    canary = Path("/tmp/imaging-host-canary")
    canary.mkdir(exist_ok=True)
    files = {"config": "SELINUX=enforcing\n", "rc.local": "wget http://169.254.169.254/\n", "securetty": "tty1\n",
             "passwd": "host:x:0:0\n"}  # fmt: skip
    for name, text in files.items():
        (canary / name).write_text(text)
    ws = acquired(tmp_path)
    requests = [
        "rm /etc/selinux/config", f"symlink /etc/selinux/config {canary}/config",
        "rm /etc/rc.d/rc.local", f"symlink /etc/rc.d/rc.local {canary}/rc.local",
        "rm /etc/securetty", f"symlink /etc/securetty ../../../../../..{canary}/securetty",
        "rm /var/log/secure", f"symlink /var/log/secure {canary}/passwd",
        "rm /etc/machine-id", f"symlink /etc/machine-id {canary}/passwd",
        f"symlink /var/log/host {canary}",
    ]  # fmt: skip
    script = tmp_path / "debugfs"
    script.write_text("\n".join(requests) + "\n")
    subprocess.run(["debugfs", "-w", "-f", script, ws.instance], check=True, capture_output=True)
    clean.apply(ws, ["all"], platforms=["atmosphere", "eucalyptus"])
    plan, result = migrate.apply(ws, "openstack")
    assert {n: (canary / n).read_text() for n in files} == files
    assert result.initrd.endswith("(rebuilt)")
    changed = {c.path for c in plan.changes}
    assert "/etc/fstab" in changed and "/etc/inittab" in changed  # the guest's own files were edited
    assert leftovers(tmp_path) == []


def test_xen_to_openstack_with_packages_and_password(cli: Cli, tmp_path: Path) -> None:
    hash_file = tmp_path / "root.hash"
    hash_file.write_text(ROOT_HASH + "\n")
    # Without /boot/grub, as on clouds that boot their own kernel: migration writes grub.conf.
    proc = cli("export", "sample:xen-nogrub", "--name", "xen-os", "--format", "qcow2", "--target", "openstack",
               "--root-password-hash-file", str(hash_file), "--remove", "openldap-servers", "--install", "htop",
               "--keep-work")  # fmt: skip
    result = last_json(proc)
    assert result["verified"] and result["boot"]["controller"] == "virtio"
    # ifcfg-eth0 says DHCP, so the boot check required (and saw) a lease on the wire.
    assert result["boot"]["dhcp"].startswith("10.0.2.") and result["boot"]["reasons"] == []
    run = cli.runs / result["run"]
    assert re.search(r"xen: all \d+ checks passed", (run / "verify" / "serial.log").read_text())
    # CentOS 5 boots BIOS only: hybrid, the default, became the original's MBR disk, and says why.
    firmware = json.loads((run / "results" / "20-migrate.json").read_text())["firmware"]
    assert firmware["platforms"] == ["bios"] and "CentOS 5's kernels" in firmware["why"][0]
    assert json.loads((run / "results" / "30-bootable.json").read_text())["disk"]["label"] == "dos"
    # The CentOS-5-like guest, cleaned and with no package database we read: no finding.
    assert json.loads((run / "results" / "25-secrets.json").read_text())["findings"] == []
    offset = json.loads((run / "results" / "30-bootable.json").read_text())["layout"]["offset_bytes"]
    dev = ext.device(run / "work" / "disk.raw", offset)

    def cat(path: str) -> str:
        return subprocess.run(["debugfs", "-R", f"cat {path}", dev], capture_output=True, text=True).stdout

    assert cat("/etc/shadow").startswith(f"root:{ROOT_HASH}:")
    assert cat("/usr/bin/htop").startswith("#!/bin/sh") and cat("/usr/sbin/slapd") == ""
    assert "legacy_configfile /boot/grub/grub.conf" in cat("/boot/imaging-grub/grub.cfg")
    # The hash never appears in the record: not in a notebook, a result, the command log.
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in (".ipynb", ".json", ".jsonl", ".log"):
            assert ROOT_HASH not in path.read_text(errors="replace"), path
    migrate_nb = (run / "notebooks" / "20-migrate.ipynb").read_text()
    for text in ("xvc0", "alias scsi_hostadapter virtio_blk", "/etc/sysconfig/selinux (-> /etc/selinux/config)",
                 "<hash>", "bubblewrap", "remove openldap-servers", "install htop"):  # fmt: skip
        assert text in migrate_nb, text
    clean_nb = (run / "notebooks" / "10-clean.ipynb").read_text()
    for text in ("ssh-hostkeys", "/var/log/secure", "truncate", "-HWADDR=D0:0D:12:34:56:78", "centos5"):
        assert text in clean_nb, text


def test_uefi_for_centos5_is_a_clear_error(cli: Cli) -> None:
    proc = cli("export", "sample:xen-nogrub", "--name", "xen-uefi", "--firmware", "uefi", check=False)
    assert proc.returncode != 0
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "imaging: error: 20-migrate: firmware uefi cannot boot this guest: profile centos5: CentOS 5's kernels "
            "(2.6.18) do not boot under UEFI; use --firmware bios"
        )
    ), proc.stderr


def test_xen_to_virtualbox(cli: Cli, tmp_path: Path) -> None:
    # The original's own export request: an OVA and no target. An OVA is a VirtualBox appliance.
    result = last_json(cli("export", "sample:xen-nogrub", "--name", "xen-vb", "--format", "ova"))
    assert result["target"] == "virtualbox" and result["verified"]
    assert (result["boot"]["controller"], result["boot"]["nic"]) == ("ahci", "e1000")
    log = (cli.runs / result["run"] / "verify" / "serial.log").read_text()
    assert "root /dev/sda1 (sata)" in log and re.search(r"xen: all \d+ checks passed", log)
    assert leftovers(tmp_path) == []
