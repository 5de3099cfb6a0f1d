"""Bad input gets a clear one-line error and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imaging.clouds import acquire
from imaging.samples import packages
from imaging.workspace import Workspace

from .conftest import Cli, leftovers


def refused(cli: Cli, source: str, *extra: str) -> str:
    """Run an export that must fail before a run exists; return its one-line error."""
    proc = cli("export", source, "--name", "bad", *extra, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imaging: error: "), proc.stderr
    assert list(cli.runs.iterdir()) == []  # no run directory, nothing half-written
    assert proc.stdout == ""
    return lines[0].removeprefix("imaging: error: ")


def test_missing_source(cli: Cli, tmp_path: Path) -> None:
    assert refused(cli, str(tmp_path / "nope.img")) == f"source not found: {tmp_path / 'nope.img'}"


def test_not_a_file(cli: Cli, tmp_path: Path) -> None:
    assert "not a file or block device" in refused(cli, str(tmp_path))


def test_empty_file(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "empty.img").touch()
    assert "source is empty" in refused(cli, str(tmp_path / "empty.img"))


def test_unreadable_source(cli: Cli) -> None:
    # Root reads anything: the check runs as an unprivileged user, on a file it may not read.
    with tempfile.TemporaryDirectory(prefix="imaging-unreadable-") as tmp:
        os.chmod(tmp, 0o755)
        source = Path(tmp) / "secret.img"
        source.write_bytes(b"x" * 4096)
        source.chmod(0o000)
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "imaging", "export",
             str(source), "--name", "bad"],
            capture_output=True, text=True, env={**cli.env(), "HOME": tmp}, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"imaging: error: source not readable: {source}: Permission denied"


def test_random_bytes_are_not_an_image(cli: Cli, tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    assert (
        refused(cli, str(junk))
        == f"{junk} is neither a filesystem nor a partitioned disk image (blkid finds neither)"
    )


def test_filesystem_we_cannot_place(cli: Cli, tmp_path: Path) -> None:
    fat = tmp_path / "fat.img"
    with open(fat, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run([packages.busybox(), "mkdosfs", fat], check=True, capture_output=True)
    assert (
        refused(cli, str(fat))
        == f"{fat} holds a vfat filesystem, which cannot be placed (supported: ext2, ext3, ext4, xfs, btrfs)"
    )


def test_partitioned_disk_without_a_linux_filesystem(cli: Cli, tmp_path: Path) -> None:
    fat = tmp_path / "fat.img"
    with open(fat, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run([packages.busybox(), "mkdosfs", fat], check=True, capture_output=True)
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(40 << 20)
    subprocess.run(
        ["sfdisk", "--quiet", disk],
        input="label: dos\nstart=2048, size=65536, type=c\n",
        text=True,
        check=True,
    )
    subprocess.run(
        ["dd", f"if={fat}", f"of={disk}", "bs=1M", "seek=1", "conv=notrunc", "status=none"], check=True
    )
    assert (
        refused(cli, str(disk))
        == f"{disk}: no partition or logical volume holds a filesystem to use as the root (ext2/3/4, XFS, btrfs) "
        "(found vfat on partition 1)"
    )


def test_truncated_image(cli: Cli, kvm_sample: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.img"
    with open(kvm_sample, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(100 << 20))
    message = refused(cli, str(cut))
    assert (
        message
        == f"{cut} is truncated: its ext3 filesystem needs 536,870,912 bytes, the image has 104,857,600"
    )


def test_corrupt_beyond_repair_surfaces_e2fscks_verdict(cli: Cli, kvm_sample: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.img"
    shutil.copyfile(kvm_sample, bad)
    with open(bad, "r+b") as f:  # an incompatible feature no e2fsck knows
        f.seek(1024 + 0x60)
        value = struct.unpack("<I", f.read(4))[0]
        f.seek(1024 + 0x60)
        f.write(struct.pack("<I", value | 0x40000000))
    message = refused(cli, str(bad))
    assert message.startswith(f"{bad}: the ext4 filesystem cannot be opened: e2fsck: ")
    assert "unsupported feature(s)" in message


def test_repairable_corruption_is_repaired_on_the_copy_and_recorded(
    kvm_sample: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "dirty.img"
    shutil.copyfile(kvm_sample, bad)
    with open(bad, "r+b") as f:  # a wrong free-blocks count in the superblock
        f.seek(1024 + 12)
        f.write(struct.pack("<I", 12345))
    before = bad.read_bytes()
    ws = Workspace.open(tmp_path / "run")
    instance = acquire.acquire(acquire.inspect(str(bad)), ws)
    assert instance.fsck_exit == 1 and instance.fsck.startswith("errors corrected (exit 1)")
    assert bad.read_bytes() == before  # repaired on the copy only
    fixed = subprocess.run(["e2fsck", "-fn", ws.instance], capture_output=True)
    assert fixed.returncode == 0


def test_backing_file_is_refused(cli: Cli, kvm_sample: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", kvm_sample, "-F", "raw", overlay], check=True
    )
    assert "has a backing file" in refused(cli, str(overlay))


def test_raw_image_dressed_as_qcow2_cannot_read_host_files(cli: Cli, tmp_path: Path) -> None:
    # A guest can write anything into its own disk, including a qcow2 header naming a host file
    # as its backing file. The probe sees qcow2; the backing file must still be refused.
    evil = tmp_path / "evil.img"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", evil, "64M"],
        check=True,
    )
    assert "has a backing file (/etc/shadow)" in refused(cli, str(evil))


@pytest.mark.parametrize(
    ("backing", "fmt"), [("/dev/sda", ""), ("/etc/shadow", ""), ("/etc/shadow", "qcow2"), ("json:{}", "")]
)
def test_verify_boots_nothing_that_names_other_files(
    cli: Cli, tmp_path: Path, backing: str, fmt: str
) -> None:
    # `verify` takes any file a user hands it: one naming /dev/sda as its backing file would
    # hand the host's disk to the guest. Refused before QEMU starts, as every source is.
    evil = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", evil, "64M"],
                   check=True)  # fmt: skip
    proc = cli("verify", str(evil), *(["--format", fmt] if fmt else []), "--boot-timeout", "5", check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        f"imaging: error: {evil}: qcow2 image has a backing file ({backing}); refusing: a source must be "
        "self-contained (flatten it with qemu-img convert first)"
    )
    assert leftovers(tmp_path) == []


def test_verify_takes_the_format_it_is_told(cli: Cli, tmp_path: Path) -> None:
    # With --format raw, a raw disk whose first sector reads as a qcow2 header is a raw disk:
    # nothing is probed (its "backing file" is no more than bytes in sector 0).
    disk = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/dev/sda", "-F", "raw", disk, "64M"],
                   check=True)  # fmt: skip
    with open(disk, "r+b") as f:
        f.truncate(64 << 20)
    proc = cli("verify", str(disk), "--format", "raw", "--boot-timeout", "5", "--accel", "tcg", check=False)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["format"], result["verdict"]) == ("raw", "failed"), (
        result
    )  # no boot sector: nothing boots
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("x\n", "name 'x\\n' has a control or unprintable character ('\\n')"),
        ("a\x1b[2Jb", "name 'a\\x1b[2Jb' has a control or unprintable character ('\\x1b')"),
        ("", "name must be 1 to 255 characters"),
        ("x" * 256, "name must be 1 to 255 characters"),
        (" padded", "name ' padded' starts or ends with white space"),
    ],
)
def test_bad_names(cli: Cli, kvm_sample: Path, name: str, message: str) -> None:
    """Names are free text (the image's name; files use a safe slug, see test_service_clouds),
    but never control characters: refused before anything is made."""
    proc = cli("export", "sample:kvm", f"--name={name}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"imaging: error: {message}"
    assert list(cli.runs.iterdir()) == []


def test_a_run_is_a_name_under_the_runs_directory(cli: Cli, tmp_path: Path) -> None:
    # A completed run removes <run>/work: --run must never lead to a user's directory.
    victim = tmp_path / "victim"
    (victim / "work").mkdir(parents=True)
    (victim / "work" / "precious").write_text("mine\n")
    (victim / "request.json").write_text("{}")
    for run in (str(victim), "../victim", "a/b", "x\n"):
        for args in (["export", "sample:kvm", "--name", "x", "--run", run], ["resume", run]):
            proc = cli(*args, check=False)
            assert proc.returncode == 2 and proc.stderr.startswith(
                f"imaging: error: run id {run!r} is not allowed"
            )
    (cli.runs / "linked").symlink_to(victim)
    for args in (["export", "sample:kvm", "--name", "x", "--run", "linked"], ["resume", "linked"]):
        proc = cli(*args, check=False)
        assert proc.returncode == 2 and "is a symbolic link: a run is a directory of its own" in proc.stderr
    assert (victim / "work" / "precious").read_text() == "mine\n"


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    mnt = Path(tempfile.mkdtemp(prefix="imaging-small-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)
        mnt.rmdir()


def test_not_enough_space_is_told_before_the_work(cli: Cli, kvm_sample: Path, small_tmpfs: Path) -> None:
    runs = small_tmpfs / "runs"
    proc = cli("export", "sample:kvm", "--name", "big", check=False, IMAGING_RUNS=str(runs))
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        f"imaging: error: not enough free space in {runs} to hold the run's work files: need about"
    )
    assert not runs.exists() or list(runs.iterdir()) == []


def test_not_enough_space_for_the_artifact(cli: Cli, kvm_sample: Path, small_tmpfs: Path) -> None:
    out = small_tmpfs / "out"
    out.mkdir()
    (small_tmpfs / "filler").write_bytes(b"\0" * (40 << 20))
    proc = cli("export", "sample:kvm", "--name", "big", "--out", str(out), check=False)
    assert proc.returncode == 2 and f"not enough free space in {out} to write the artifact" in proc.stderr
    assert list(out.iterdir()) == []


def test_no_kernel_in_boot(cli: Cli, make_ext: Callable[..., Path], tmp_path: Path) -> None:
    image = make_ext("nokernel", {"etc/fstab": "/dev/sda1 / ext3 defaults 0 1\n", "boot/config-6.1": "x"})
    proc = cli("export", str(image), "--name", "nokernel", "--profile", "generic", check=False)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith(
        "imaging: error: 20-migrate: no kernel in the guest's /boot (looked for vmlinuz-<version>)"
    )
    (run,) = cli.runs.iterdir()
    state = json.loads((run / "state.json").read_text())
    assert (state["state"], state["stage"]) == ("error", "20-migrate")
    assert (run / "notebooks" / "20-migrate.failed-1.ipynb").exists()
    assert leftovers(tmp_path) == []


def test_a_disk_over_its_formats_limit(cli: Cli, tmp_path: Path) -> None:
    # A 2045 GiB instance (sparse, no journal: 29 MB on disk): its bootable disk is over what a
    # VHD or an OVA holds, and with --disk-size 3T over what an MBR addresses (a BIOS disk; a GPT
    # one has no such limit). Refused before a
    # run exists, in one line that names the limit, not at the end of the run.
    source = tmp_path / "big.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard",
                    source, "2045G"], check=True, capture_output=True)  # fmt: skip
    assert "over what vhd holds: 2040 GiB" in refused(cli, str(source), "--format", "vhd")
    assert "over what ova (its streamOptimized VMDK) holds: 2031.9 GiB" in refused(
        cli, str(source), "--format", "ova"
    )
    assert "over what its MBR partition table addresses" in refused(
        cli, str(source), "--disk-size", "3T", "--firmware", "bios"
    )
