"""What the other families' samples (rocky9-like, ubuntu24-like, opensuse-like, amazon2023-like)
are checked with: reading their disks from the host, and exporting one through its profile to a
boot that must be a working server."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from imaging.samples import catalog
from imaging.workspace import Workspace

from .conftest import Cli, last_json

BOOTS = [("qcow2", "openstack"), ("ova", "virtualbox")]


def out(*argv: str | Path) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))}: {proc.stderr}"
    return proc.stdout


def blkid(disk: Path, offset: int) -> dict[str, str]:
    text = out("blkid", "--probe", "--output", "export", "--offset", str(offset), disk)
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def installed(root: Path) -> set[str]:
    """The packages dpkg says are installed."""
    found = set()
    for block in (root / "var" / "lib" / "dpkg" / "status").read_text().split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", block, re.M))
        if fields.get("Status") == "install ok installed":
            found.add(fields["Package"])
    return found


def gpt(disk: Path) -> dict[int, dict[str, Any]]:
    """The disk's GPT partitions by number."""
    table: dict[str, Any] = json.loads(out("sfdisk", "--json", disk))["partitiontable"]
    assert table["label"] == "gpt"
    return {int(re.findall(r"\d+$", p["node"])[0]): p for p in table["partitions"]}


def not_attached(disk: Path) -> None:
    assert str(disk) not in out("losetup", "--list", "--noheadings", "--output", "BACK-FILE")


def export_and_boot(
    cli: Cli, tmp_path: Path, sample: str, fmt: str, target: str, profile: str, firmware: str = "bios"
) -> Workspace:
    """Export ``sample`` for ``target`` and require a working server through ``profile``: the
    verdict ``booted``, the guest's own check passed inside, DHCP on the wire, host keys none of
    the source's, the initrd rebuilt, and on VirtualBox its controller and NIC with a kernel that
    drives them (not the cloud one)."""
    proc = cli("export", f"sample:{sample}", "--name", f"{sample}-{fmt}", "--format", fmt, "--target", target,
               "--firmware", firmware, "--out", str(tmp_path / "out"), timeout=1500)  # fmt: skip
    result = last_json(proc)
    boot = result["boot"]
    assert result["verified"] is True and boot["verdict"] == "booted", boot
    assert boot["matched"].startswith(catalog.MARKER) and boot["dhcp"].startswith("10.0.2.")
    ws = Workspace.open(cli.runs / result["run"])
    migrated = ws.result("20-migrate")
    assert migrated["profile"] == profile and not migrated["profile_assumed"]
    assert "(rebuilt)" in migrated["initrd"]
    serial = (ws.root / "verify" / "serial.log").read_text(errors="replace")
    assert "imaging-check FAILED" not in serial
    source_keys = set(ws.result("10-clean")["ssh_host_keys"])
    assert source_keys and not {k.split()[-1] for k in boot["ssh_host_keys"]} & source_keys
    if target == "virtualbox":
        assert (boot["controller"], boot["nic"]) == ("ahci", "e1000") and "cloud" not in migrated["kernel"]
    return ws
