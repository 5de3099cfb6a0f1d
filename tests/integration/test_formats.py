"""Every output format, from the sample through the whole pipeline and from a disk through
``convert``: qemu-img agrees with what was asked, the content is the disk's, the artifact boots,
and the same disk always gives the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from imaging.formats import export, ova, vhd, vmdk
from imaging.workspace import Workspace

from .conftest import Cli, last_json, leftovers

QEMU = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vdi": "vdi", "vhd": "vpc", "vhdx": "vhdx"}
KEYS = {"path", "sha256", "format", "target", "run", "verified", "name", "kind", "size_bytes", "boot", "source",
        "source_digest", "run_dir", "timings"}  # fmt: skip


def qemu_info(path: Path, fmt: str) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-f", fmt, path], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def qemu_check(path: Path, fmt: str) -> None:
    proc = subprocess.run(["qemu-img", "check", "-f", fmt, path], capture_output=True, text=True)
    if fmt in ("vpc", "raw"):  # qemu-img has no check for VHD (nor for raw)
        assert proc.returncode == 63 and "does not support checks" in proc.stderr
    else:
        assert proc.returncode == 0 and "No errors were found" in proc.stdout, proc.stdout + proc.stderr


def same_content(disk: Path, image: Path, fmt: str) -> None:
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", fmt, disk, image], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "Images are identical" in proc.stdout, proc.stdout + proc.stderr


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def disk_of(artifact: Path, fmt: str, tmp: Path) -> tuple[Path, str]:
    """The disk image inside an artifact (the .vmdk of an OVA, taken out of the tar)."""
    if fmt == "ova":
        return ova.extract_disk(artifact, tmp), "vmdk"
    return artifact, QEMU[fmt]


@pytest.fixture(scope="module")
def bootable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bootable raw disk: the sample exported by the pipeline (and booted)."""
    base = tmp_path_factory.mktemp("bootable")
    (base / "runs").mkdir()
    result = last_json(Cli(base / "runs")("export", "sample:kvm", "--name", "base", "--format", "raw",
                                          "--out", str(base / "out")))  # fmt: skip
    assert result["verified"]
    return Path(result["path"])


@pytest.mark.parametrize(
    ("fmt", "extra"),
    [("qcow2", ["--compress"]), ("vmdk", []), ("vdi", []), ("vhd", []), ("vhdx", []), ("ova", [])],
)
def test_export_every_format_and_boot_it(cli: Cli, tmp_path: Path, fmt: str, extra: list[str]) -> None:
    result = last_json(cli("export", "sample:kvm", "--name", f"x-{fmt}", "--format", fmt, *extra, "--keep-work",
                           "--out", str(tmp_path / "out,1")))  # a comma: QEMU's option lists must keep it  # fmt: skip
    assert KEYS <= set(result) and result["format"] == fmt and result["verified"] is True
    artifact = Path(result["path"])
    assert artifact.name == f"x-{fmt}.{fmt}" and sha256(artifact) == result["sha256"]
    assert (
        tmp_path / "out,1" / f"{artifact.name}.sha256"
    ).read_text() == f"{result['sha256']}  {artifact.name}\n"
    work_disk = cli.runs / result["run"] / "work" / "disk.raw"
    image, qfmt = disk_of(artifact, fmt, tmp_path / "x")
    info = qemu_info(image, qfmt)
    assert info["format"] == qfmt and info["virtual-size"] == work_disk.stat().st_size
    if fmt == "vmdk":
        assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    if fmt == "qcow2":  # compressed clusters: far smaller than the data
        assert artifact.stat().st_size < 0.7 * qemu_info(work_disk, "raw")["actual-size"]
    qemu_check(image, qfmt)
    same_content(work_disk, image, qfmt)
    if fmt == "ova":  # booted from the tar's disk on the SATA AHCI controller the OVF declares
        assert result["boot"]["controller"] == "ahci"
        ova.check_ova(artifact, f"x-{fmt}")
    assert leftovers(tmp_path) == []


CONVERT = [
    ("raw", []), ("qcow2", []), ("qcow2", ["--compress"]), ("vmdk", []),
    ("vmdk", ["--vmdk-subformat", "monolithicSparse"]), ("vdi", []), ("vhd", []), ("vhdx", []), ("ova", []),
    ("ova", ["--ovf-version", "2.0"]),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "extra"), CONVERT, ids=[" ".join([f, *e]) for f, e in CONVERT])
def test_convert_twice_gives_the_same_bytes(cli: Cli, bootable: Path, tmp_path: Path, fmt: str,
                                            extra: list[str]) -> None:  # fmt: skip
    results = [
        last_json(
            cli(
                "convert",
                str(bootable),
                "--format",
                fmt,
                *extra,
                "--name",
                "appliance",
                "--out",
                str(tmp_path / f"out{n}"),
            )
        )  # fmt: skip
        for n in (1, 2)
    ]
    first, second = (Path(r["path"]) for r in results)
    assert KEYS <= set(results[0]) and results[0]["kind"] == "convert" and results[0]["verified"] is None
    assert results[0]["sha256"] == results[1]["sha256"] == sha256(first)
    assert first.read_bytes() == second.read_bytes()
    assert (first.parent / f"{first.name}.sha256").read_text() == f"{results[0]['sha256']}  {first.name}\n"
    image, qfmt = disk_of(first, fmt, tmp_path / "x")
    qemu_check(image, qfmt)
    same_content(bootable, image, qfmt)
    assert qemu_info(image, qfmt)["virtual-size"] == bootable.stat().st_size
    if fmt == "vmdk" and not extra:
        header, footer, text = vmdk.read_layout(first)
        assert header.gd_offset == vmdk.GD_AT_END and f'SPARSE "{first.name}"' in text
    if fmt == "vmdk" and extra:
        assert qemu_info(first, "vmdk")["format-specific"]["data"]["create-type"] == "monolithicSparse"
    if fmt == "raw":  # the user's disk is copied, never linked: writing to one leaves the other alone
        assert first.stat().st_ino != bootable.stat().st_ino and bootable.stat().st_nlink == 1
        with open(bootable, "rb") as f:
            head = f.read(4096)
        with open(first, "r+b") as f:
            f.write(b"\xff" * 4096)
        with open(bootable, "rb") as f:
            assert f.read(4096) == head
    # convert mounts nothing and boots nothing: only partial files could be left (the mount
    # and process checks of leftovers() also see other suites running on the machine).
    assert list(tmp_path.rglob(".*.part*")) == []


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_ova_layout(cli: Cli, bootable: Path, tmp_path: Path, version: str) -> None:
    result = last_json(cli("convert", str(bootable), "--format", "ova", "--ovf-version", version, "--name", "box",
                           "--out", str(tmp_path)))  # fmt: skip
    path = Path(result["path"])
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["box.ovf", "box-disk1.vmdk", "box.mf"]
        assert all(m.mtime == 1_700_000_000 and m.uid == m.gid == 0 for m in members)
        ovf = tar.extractfile("box.ovf").read()  # type: ignore[union-attr]
        manifest = tar.extractfile("box.mf").read().decode()  # type: ignore[union-attr]
        disk = tar.extractfile("box-disk1.vmdk").read()  # type: ignore[union-attr]
    algorithm = "SHA1" if version == "1.0" else "SHA256"
    assert manifest == (f"{algorithm}(box.ovf)= {hashlib.new(algorithm, ovf).hexdigest()}\n"
                        f"{algorithm}(box-disk1.vmdk)= {hashlib.new(algorithm, disk).hexdigest()}\n")  # fmt: skip
    root = ova.check_ovf(ovf, {"box-disk1.vmdk": len(disk)}, "box")
    assert root.tag.endswith("Envelope") and f'ovf:version="{version}"'.encode() in ovf
    assert f'ovf:capacity="{bootable.stat().st_size}"'.encode() in ovf
    assert disk[:4] == b"KDMV"


@pytest.mark.parametrize(("firmware", "read"), [("uefi", "uefi"), ("hybrid", "bios")])
def test_an_ova_tells_virt_v2v_its_firmware(tmp_path: Path, firmware: str, read: str) -> None:
    """virt-v2v reads an OVA as VMware's tools write it: a UEFI-only disk's descriptor says EFI
    (vmw:Config firmware), a hybrid disk's says nothing, and BIOS, the default, boots it. (What
    VirtualBox reads, its vbox:Machine, is checked by structure in tests/unit/formats/test_ova.py.)"""
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
        f.write(os.urandom(1 << 20))
    found = export.InputDisk(str(disk), "raw", disk.stat().st_size, 1 << 20, "convert", firmware)
    artifact = export.export(Workspace.open(tmp_path / "run"), "box", "ova", tmp_path / "out", disk=found,
                             target="virtualbox")  # fmt: skip
    v2v = subprocess.run(["virt-v2v", "-i", "ova", artifact.path, "--print-source"], capture_output=True, text=True,
                         env={**os.environ, "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}, timeout=600)  # fmt: skip
    assert v2v.returncode == 0, v2v.stderr
    assert re.search(rf"^ *firmware: {read}$", v2v.stdout, re.MULTILINE), v2v.stdout
    assert artifact.firmware == firmware and artifact.details["ovf_firmware"] == (
        "efi" if read == "uefi" else "bios"
    )


def test_convert_any_input_format_and_verify(cli: Cli, bootable: Path, tmp_path: Path) -> None:
    # A qcow2 input: qemu-img unpacks it for the VMDK writer; the monolithicSparse VMDK boots.
    source = tmp_path / "in.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", bootable, source], check=True)
    result = last_json(cli("convert", str(source), "--format", "vmdk", "--vmdk-subformat", "monolithicSparse",
                           "--verify", "--target", "virtualbox", "--boot-marker", "IMAGING-SAMPLE-OK",
                           "--out", str(tmp_path / "out,1")))  # a comma: QEMU's option lists must keep it  # fmt: skip
    assert result["verified"] is True and result["kind"] == "convert-verify" and result["name"] == "in"
    assert result["boot"]["controller"] == "ahci"
    stream = last_json(cli("convert", str(source), "--format", "ova", "--out", str(tmp_path / "out")))
    image = ova.extract_disk(Path(stream["path"]), tmp_path / "x")
    same_content(bootable, image, "vmdk")
    assert not list((cli.runs / stream["run"] / "work").glob("*"))  # the unpacked input is gone


def test_convert_for_azure_and_gce(cli: Cli, bootable: Path, tmp_path: Path) -> None:
    """A disk one already has, as Azure's fixed VHD (qemu-img alone probes it as raw: named as
    vpc, it holds the disk) and as GCE's tar.gz, whose disk.raw GNU tar extracts and the boot
    check boots on virtio-scsi. (The Debian exports of test_public_clouds boot both clouds'
    artifacts; this one covers convert's own path: any input disk, the format's own target.)"""
    fixed = last_json(cli("convert", str(bootable), "--format", "vhd", "--target", "azure",
                          "--out", str(tmp_path / "azure")))  # fmt: skip
    footer = vhd.check_fixed(Path(fixed["path"]))
    assert footer.disk_type == 2 and footer.current_size == vhd.fixed_size(bootable.stat().st_size)
    same_content(bootable, Path(fixed["path"]), "vpc")
    packed = last_json(cli("convert", str(bootable), "--format", "gce", "--verify", "--boot-marker",
                           "IMAGING-SAMPLE-OK", "--out", str(tmp_path / "gce")))  # fmt: skip
    assert packed["target"] == "gce" and packed["verified"] is True  # gce: the format's own target
    assert (packed["boot"]["controller"], Path(packed["path"]).name) == ("virtio-scsi", "base.tar.gz")
    assert not list((tmp_path / "gce").glob("*.raw")) and leftovers(tmp_path) == []


def refused(cli: Cli, *args: str, out: Path) -> str:
    """Run a convert that must fail before a run exists; return its one-line error."""
    before = sorted(out.iterdir()) if out.exists() else []
    proc = cli("convert", *args, "--out", str(out), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imaging: error: "), proc.stderr
    assert list(cli.runs.iterdir()) == [] and proc.stdout == ""  # no run, nothing half-written
    assert (sorted(out.iterdir()) if out.exists() else []) == before
    return lines[0].removeprefix("imaging: error: ")


def test_convert_bad_input(cli: Cli, bootable: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert refused(cli, str(bootable), "--format", "iso", out=out).startswith(
        "unknown format 'iso' (known: raw,"
    )
    assert refused(cli, str(tmp_path / "nope.img"), "--format", "vmdk", out=out) == (
        f"source not found: {tmp_path / 'nope.img'}")  # fmt: skip
    assert "control or unprintable character" in refused(
        cli, str(bootable), "--format", "vmdk", "--name", "a\tb", out=out
    )
    assert "compress applies to qcow2 only" in refused(
        cli, str(bootable), "--format", "vdi", "--compress", out=out
    )
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", bootable, "-F", "raw", overlay], check=True
    )
    assert "has a backing file" in refused(cli, str(overlay), "--format", "vmdk", out=out)
    # A disk over its format's limit: refused before anything is written.
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(2041 << 30)  # sparse
    assert "over what vhd holds: 2040 GiB" in refused(cli, str(big), "--format", "vhd", out=out)
    assert "over what vmdk (streamOptimized) holds" in refused(cli, str(big), "--format", "vmdk", out=out)
    # Converting a disk onto itself would replace the user's disk: refused.
    same = refused(cli, str(bootable), "--format", "raw", "--name", "base", out=bootable.parent)
    assert same == f"{bootable} is the input disk itself: choose another --out or --name"
