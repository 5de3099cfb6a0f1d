"""Integration fixtures: real images from Debian packages, the real CLI, real boots.

A missing tool or a missing privilege fails these tests: a green run that skipped the boots would
prove nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imaging import config
from imaging.samples import catalog

REQUIRED = ["qemu-img", "qemu-system-x86_64", "grub-mkimage", "mke2fs", "e2fsck", "resize2fs", "debugfs", "sfdisk",
            "blkid", "rsync", "mount", "cpio", "depmod", "tar", "pigz", "losetup", "mkfs.xfs", "xfs_repair",
            "xfs_growfs", "mkfs.btrfs", "btrfs", "fstrim", "pvcreate", "setfacl", "mkfs.vfat", "mcopy",
            "sbverify", "openssl"]  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def _can_run() -> None:
    missing = [t for t in REQUIRED if shutil.which(t, path=os.environ["PATH"] + ":/usr/sbin:/sbin") is None]
    assert not missing, f"integration tests need {', '.join(missing)}: run 'make setup'"
    ovmf = config.load_qemu_devices().secure_boot
    assert ovmf and Path(ovmf.code).is_file(), "integration tests boot UEFI under OVMF: run 'make setup'"
    assert os.geteuid() == 0, "integration tests need root (loop mounts for placement mkfs, boot tests)"


@pytest.fixture(scope="session")
def kvm_sample() -> Path:
    return catalog.ensure_sample("kvm")


class Cli:
    def __init__(self, runs: Path) -> None:
        self.runs = runs

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "IMAGING_RUNS": str(self.runs), "IMAGING_PROGRESS": "0", **extra}

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 600, **env: str
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "imaging", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(**env),
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"imaging {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        return proc

    def popen(self, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "imaging", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=self.env(**env),
        )  # fmt: skip


def last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    line = proc.stdout.strip().splitlines()[-1]
    data = json.loads(line)
    assert isinstance(data, dict)
    return data


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    runs = tmp_path / "runs"
    runs.mkdir()
    return Cli(runs)


def leftovers(under: Path) -> list[str]:
    """Loop devices, mounts, processes and partial files that refer to anything under ``under``,
    and sandbox control groups whose process is gone. Mounts and processes of other work on
    this machine (other runs, other tests) are not ours to count."""
    found = []
    loops = subprocess.run(
        ["losetup", "--list", "--noheadings", "-O", "NAME,BACK-FILE"], capture_output=True, text=True
    )
    ours = [line.split(None, 1) for line in loops.stdout.splitlines() if str(under) in line]
    found += [f"loop: {' '.join(parts)}" for parts in ours]
    # A guest mount is a loop device's: ours are those whose loop is backed by a file under
    # ``under`` (other runs on this host, a parallel test or another checkout's, are not ours),
    # and any mount whose mount point is under ``under``.
    devices = {parts[0] for parts in ours}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        source = fields[fields.index("-") + 2] if "-" in fields else ""
        if str(under) in fields[4] or ("imaging-mnt" in fields[4] and source in devices):
            found.append(f"mount: {line}")
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True)
    work = (
        "qemu-system",
        "bwrap",
        "-m imaging export",
        "-m imaging resume",
        "-m imaging convert",
        "idle_hash",
    )
    found += [
        f"process: {line}"
        for line in ps.stdout.splitlines()[1:]
        if str(under) in line and any(w in line for w in work) and int(line.split()[0]) != os.getpid()
    ]
    found += [f"partial: {p}" for p in under.rglob(".*.part*")]
    for group in Path("/sys/fs/cgroup").rglob("imaging-sandbox-*"):
        owner = group.name.split("-")[-2]
        if not Path(f"/proc/{owner}").exists():
            found.append(f"control group: {group}")
    return found


@pytest.fixture
def make_ext(tmp_path: Path) -> Callable[..., Path]:
    """An ext filesystem image made with mke2fs -d from a dict of {path: text}."""

    def make(name: str, files: dict[str, str], fs_type: str = "ext3", size: str = "64M") -> Path:
        root = tmp_path / f"{name}-root"
        for rel, text in files.items():
            p = root / rel.lstrip("/")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        root.mkdir(exist_ok=True)
        image = tmp_path / f"{name}.img"
        subprocess.run(["mke2fs", "-q", "-F", "-t", fs_type, "-d", root, image, size], check=True)
        return image

    return make


@pytest.fixture(scope="session")
def glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The real Glance (Debian's glance-api) on loopback, once per test session: starting it
    costs seconds (see cloudkit.glance_server); its start-up time is printed."""
    from .cloudkit import glance_server

    with glance_server(tmp_path_factory.mktemp("glance")) as g:
        print(f"\nglance-api started in {g.seconds} s", file=sys.stderr)
        yield g
