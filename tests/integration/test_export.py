"""The main job end to end: the CLI runs every stage notebook through papermill and boots the result."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from imaging.run.scraps import read as read_scraps
from imaging.sparse import content_digest

from .conftest import Cli, last_json, leftovers


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def test_qcow2_for_kvm_boots_and_leaves_a_record(cli: Cli, kvm_sample: Path, tmp_path: Path) -> None:
    before = (sha256(kvm_sample), kvm_sample.stat().st_mtime_ns)
    out = tmp_path / "out"
    proc = cli(
        "export", "sample:kvm", "--name", "demo", "--format", "qcow2", "--target", "kvm", "--out", str(out)
    )
    result = last_json(proc)
    assert {"path", "sha256", "format", "target", "run", "verified"} <= set(result)
    assert result["verified"] is True and result["format"] == "qcow2" and result["target"] == "kvm"
    artifact = Path(result["path"])
    assert artifact.parent == out.resolve() and artifact.name == "demo.qcow2"
    assert sha256(artifact) == result["sha256"]
    assert (out / "demo.qcow2.sha256").read_text() == f"{result['sha256']}  demo.qcow2\n"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", artifact], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
    assert info["format"] == "qcow2"
    # The source is never written to, not even by a filesystem check.
    assert (sha256(kvm_sample), kvm_sample.stat().st_mtime_ns) == before
    # The source's identity costs its data, not its virtual size, and is the content's alone.
    assert result["source_digest"] == content_digest(kvm_sample)

    run = cli.runs / result["run"]
    stages = ["00-acquire", "10-clean", "20-migrate", "25-secrets", "30-bootable", "40-export", "50-verify"]
    assert sorted(p.name for p in (run / "notebooks").glob("*.ipynb")) == [f"{s}.ipynb" for s in stages]
    scraps = {s: read_scraps(run / "notebooks" / f"{s}.ipynb")[s] for s in stages}
    assert (
        scraps["00-acquire"]["fs_type"] == "ext3" and scraps["00-acquire"]["source_layout"] == "filesystem"
    )
    layout = scraps["30-bootable"]["layout"]
    # hybrid, the default: GPT, the BIOS boot partition at 1 MiB, the ESP after it, then the root.
    assert (layout["scheme"], layout["bios_boot_start"], layout["esp_start"]) == ("gpt", 2048, 4096)
    assert layout["offset_bytes"] == 512 * layout["start_sector"] == (1 + 1 + 128) << 20
    boots = scraps["50-verify"]["boots"]
    assert [(b["firmware"], b["verdict"]) for b in boots] == [("bios", "booted"), ("uefi", "booted")]
    assert scraps["30-bootable"]["placement"]["grown"] is True
    assert scraps["50-verify"]["verdict"] == "booted" and scraps["50-verify"]["controller"] == "virtio"
    assert "IMAGING-SAMPLE-OK" in (run / "verify" / "serial.log").read_text()
    # The executed notebooks read as the audit record: fdisk table, arithmetic, commands with exit codes.
    # Each opens with the summary of what it did, under its title.
    for stage in stages:
        cells = json.loads((run / "notebooks" / f"{stage}.ipynb").read_text())["cells"]
        assert cells[1]["metadata"]["tags"] == ["summary"] and "".join(cells[1]["source"]).startswith(
            "## Summary"
        )
    bootable = (run / "notebooks" / "30-bootable.ipynb").read_text()
    for text in (
        "block_total",
        "disk.raw1",
        "Linux",
        "resize2fs",
        "grub-mkimage",
        "+++ b/boot/imaging-grub/grub.cfg",
    ):
        assert text in bootable, text
    assert json.loads((run / "state.json").read_text())["state"] == "completed"
    assert not (run / "work").exists()  # work files go once the run completes
    # Every stage's time and fixed overhead is recorded (bench/ measures them; no test asserts a time).
    assert set(result["timings"]) == set(stages)
    assert all(0 <= t["overhead"] <= t["seconds"] for t in result["timings"].values())
    assert leftovers(tmp_path) == []


def test_raw_for_virtualbox_boots_on_ahci(cli: Cli, tmp_path: Path) -> None:
    # --firmware bios: the original procedure's disk, one bootable Linux partition in an MBR.
    result = last_json(
        cli(
            "export",
            "sample:kvm",
            "--name",
            "vbox",
            "--format",
            "raw",
            "--target",
            "virtualbox",
            "--firmware",
            "bios",
        )
    )
    assert result["verified"] and result["boot"]["controller"] == "ahci"
    artifact = Path(result["path"])
    assert artifact.parent == (cli.runs / result["run"] / "out")
    table = json.loads(subprocess.run(["sfdisk", "--json", artifact], capture_output=True, text=True).stdout)
    (part,) = table["partitiontable"]["partitions"]
    assert part["start"] == 2048 and part["bootable"] and part["type"] == "83"
    assert leftovers(tmp_path) == []


def test_legacy_layout_and_mkfs_placement_boot(cli: Cli, tmp_path: Path) -> None:
    # The original procedure's shape: partition at sector 63, new filesystem, files copied.
    proc = cli("export", "sample:kvm", "--name", "legacy", "--layout", "legacy", "--placement", "mkfs",
               "--fs-type", "ext4", "--format", "raw", "--target", "virtualbox", "--keep-work")  # fmt: skip
    result = last_json(proc)
    assert result["verified"]
    run = cli.runs / result["run"]
    scraps = json.loads((run / "results" / "30-bootable.json").read_text())
    assert scraps["layout"]["start_sector"] == 63 and scraps["layout"]["offset_bytes"] == 32256
    assert (scraps["layout"]["end_sector"] + 1) % 16065 == 0
    assert scraps["placement"]["placement"] == "mkfs" and scraps["disk"]["fs_type"] == "ext4"
    assert scraps["disk"]["uuid"] == json.loads((run / "results" / "00-acquire.json").read_text())["uuid"]
    assert (run / "work" / "disk.raw").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vdi"])
def test_container_sources_are_converted(cli: Cli, kvm_sample: Path, tmp_path: Path, fmt: str) -> None:
    source = tmp_path / f"instance.{fmt}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, kvm_sample, source], check=True)
    result = last_json(
        cli(
            "export",
            str(source),
            "--name",
            f"from-{fmt}",
            "--boot-marker",
            "IMAGING-SAMPLE-OK",
            "--profile",
            "generic",
        )
    )
    assert result["verified"]
    acquired = json.loads((cli.runs / result["run"] / "results" / "00-acquire.json").read_text())
    assert acquired["source_format"] == fmt and acquired["uuid"] == "31ef4e9d-d0cd-50d7-b697-b34b26b83c9c"


def test_partitioned_source_uses_its_root_partition(cli: Cli, kvm_sample: Path, tmp_path: Path) -> None:
    source = tmp_path / "partitioned.raw"
    size = kvm_sample.stat().st_size
    with open(source, "wb") as f:
        f.truncate((1 << 20) + size + (64 << 20))
    script = f"label: dos\nstart=2048, size={size // 512}, type=83\nstart={2048 + size // 512}, type=82\n"
    subprocess.run(["sfdisk", "--quiet", source], input=script, text=True, check=True)
    swap = tmp_path / "swap"
    with open(swap, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkswap", swap], check=True, capture_output=True)
    subprocess.run(["dd", f"if={swap}", f"of={source}", "bs=1M", f"seek={1 + size // (1 << 20)}", "conv=notrunc",
                    "status=none"], check=True)  # fmt: skip
    subprocess.run(["dd", f"if={kvm_sample}", f"of={source}", "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none"],
                   check=True)  # fmt: skip
    result = last_json(
        cli(
            "export",
            str(source),
            "--name",
            "parted",
            "--boot-marker",
            "IMAGING-SAMPLE-OK",
            "--profile",
            "generic",
        )
    )
    assert result["verified"]
    acquired = json.loads((cli.runs / result["run"] / "results" / "00-acquire.json").read_text())
    assert acquired["source_layout"] == "partitioned" and acquired["partition"] == 1


def test_verify_command_boots_any_artifact(cli: Cli, tmp_path: Path) -> None:
    result = last_json(cli("export", "sample:kvm", "--name", "v", "--format", "qcow2"))
    boot = last_json(
        cli("verify", result["path"], "--target", "virtualbox", "--boot-marker", "IMAGING-SAMPLE-OK")
    )
    assert boot["verdict"] == "booted" and boot["controller"] == "ahci"
