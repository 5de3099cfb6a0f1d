"""The node's side of a Eucalyptus copy, run here by sh as a node's sshd would run it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from imaging.clouds import eucalyptus


def node_command(
    path: Path, start: int = 0, packer: str | None = None, hasher: str = "openssl"
) -> list[str]:
    found = eucalyptus.Found("node", str(path), path.stat().st_size, 0, "zstd", hasher)
    return ["sh", "-c", eucalyptus._remote_command(found, start, packer)]


def hashing(path: Path) -> list[int]:
    """Processes here whose command line names ``path`` (the node's hasher, its dd)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(path).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("hasher", ["openssl", "sha256sum"])
def test_the_rest_on_stdout_and_the_whole_files_sha256_on_stderr(tmp_path: Path, hasher: str) -> None:
    disk = tmp_path / "root"
    data = os.urandom(3 << 20)
    disk.write_bytes(data)
    done = subprocess.run(node_command(disk, start=1 << 20, hasher=hasher), capture_output=True, check=True)
    assert done.stdout == data[1 << 20 :]
    assert eucalyptus._node_sha256(done.stderr.decode()) == hashlib.sha256(data).hexdigest()


def test_a_failed_hasher_is_its_own_exit(tmp_path: Path) -> None:
    disk = tmp_path / "root"
    disk.write_bytes(b"x" * 4096)
    command = node_command(disk)
    command[-1] = command[-1].replace("-sha256", "-no-such-digest", 1)
    done = subprocess.run(command, capture_output=True)
    assert done.returncode == eucalyptus._HASH_FAILED and done.stdout == b"x" * 4096


def test_a_cut_copy_stops_the_nodes_hasher(tmp_path: Path) -> None:
    """A reader that goes away (the link cut) ends dd, and the hasher with it: hashing all of this
    sparse 64 GiB file takes the better part of a minute."""
    disk = tmp_path / "root"
    with open(disk, "wb") as f:
        f.truncate(64 << 30)
    proc = subprocess.Popen(node_command(disk), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert len(proc.stdout.read(1 << 20)) == 1 << 20
    proc.stdout.close()
    assert proc.wait(timeout=30) != 0
    deadline = time.monotonic() + 10
    while hashing(disk) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hashing(disk) == []
