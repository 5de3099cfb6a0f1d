"""The summaries the pipeline puts at the top of each executed notebook: what they say, that a
value from the image cannot become markup, and where the cell goes."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbconvert.filters import markdown2html

from imaging.run import summary

HOSTILE = "<script>alert(1)</script> `x` | *y* [l](javascript:z) &amp;"

BOOTABLE = {
    "layout": {"start_sector": 2048, "end_sector": 3147775, "partition_sectors": 3145728, "offset_bytes": 1048576,
               "partition_bytes": 1610612736, "block_size": 4096},
    "placement": {"placement": "copy", "fs_type": "ext3", "uuid": "e054cdd7", "block_count": 393216},
    "grub": {"grub": "grub-mkimage (GRUB) 2.06", "entries": 1, "default_kernel": "/boot/vmlinuz-6.1"},
    "disk": {"disk_bytes": 1611661312, "label": "dos", "disk_id": "0xe054cdd7", "fsck": "clean (exit 0)"},
}  # fmt: skip
VERIFY = {"verdict": "booted", "reason": "marker", "matched": "IMAGING-SAMPLE-OK", "target": "kvm",
          "controller": "virtio", "accel": "tcg", "seconds": 8.77, "image": "/out/demo.qcow2", "format": "qcow2",
          "screen": "/runs/r/verify/screen.png"}  # fmt: skip


def html_of(markdown: str) -> str:
    return str(markdown2html(markdown))


def test_text_shows_every_character_and_no_markup() -> None:
    rendered = html_of(summary.text(HOSTILE))
    assert "<script" not in rendered and "<a " not in rendered and "<em>" not in rendered
    assert "<code>" not in rendered
    assert "&lt;script&gt;alert(1)&lt;/script&gt; `x` | *y* [l](javascript:z) &amp;amp;" in rendered


def test_bootable_summary_has_the_partition_table_and_its_arithmetic() -> None:
    text = summary.completed("30-bootable", BOOTABLE)
    rendered = html_of(text)
    rows = re.findall(r"<tr>(.*?)</tr>", rendered, re.S)
    cells = [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S) for row in rows]
    assert cells[0] == ["partition", "boot", "start", "end", "sectors", "size", "type"]
    assert cells[1][:5] == ["1", "*", "2048", "3147775", "3145728"] and cells[1][6] == "83 Linux"
    assert "end - start + 1 = 3147775 - 2048 + 1 = 3145728" in text
    assert "offset = 512 x start = 1048576" in text


def test_hostile_values_stay_text_in_tables_and_lines() -> None:
    migrated = {"profile": HOSTILE, "target": "kvm", "kernel": HOSTILE, "files_changed": 1, "packages": HOSTILE,
                "initrd": HOSTILE, "initrd_modules": HOSTILE, "initrd_bytes": 10, "changes": [{"path": HOSTILE}],
                "drivers": {HOSTILE: HOSTILE}}  # fmt: skip
    hostile_layout = {**BOOTABLE, "disk": {**BOOTABLE["disk"], "label": HOSTILE, "fsck": "a\n\n| b | c |"}}
    for stage, result in (("20-migrate", migrated), ("30-bootable", hostile_layout)):
        rendered = html_of(summary.completed(stage, result))
        assert "<script" not in rendered and 'href="javascript' not in rendered and "<em>" not in rendered
    rendered = html_of(summary.completed("30-bootable", hostile_layout))
    assert rendered.count("<tr>") == 2  # the value's own pipes and newlines made no new rows


@pytest.mark.parametrize(
    ("stage", "result", "words"),
    [
        ("50-verify", VERIFY, ["**Booted**", "IMAGING-SAMPLE-OK", "virtio", "screen at the end"]),
        ("50-verify", {**VERIFY, "verdict": "failed", "reason": "boot failed", "matched": "Kernel panic", "screen": ""},
         ["**Did not boot**", "Kernel panic", "no screenshot"]),
        ("40-export", {"path": "/out/demo.qcow2", "format": "qcow2", "size_bytes": 23724032, "virtual_size": 1 << 30,
                       "tool": "qemu-img convert -O qcow2", "seconds": 0.15, "check": "No errors.", "sha256": "f2ac"},
         ["**Exported**", "demo.qcow2", "sha256 <code>f2ac</code>", "22.6 MiB"]),
        ("10-clean", {"profile": "centos5", "profile_reason": "release 5", "operations": ["logfiles", "machine-id"],
                      "actions": [{"action": "remove"}, {"action": "remove"}, {"action": "edit"}], "removed_bytes": 602},
         ["**Cleaned**", "2 operations, 3 files acted on (1 edit, 2 remove)", "602 B removed"]),
        ("99-new", {"answer": 42, "nested": {"skipped": True}}, ["**Completed**", "answer <code>42</code>"]),
        ("30-bootable", {"layout": "from an older version"}, ["**Completed**"]),
    ],
)  # fmt: skip
def test_completed_summaries(stage: str, result: dict[str, object], words: list[str]) -> None:
    text = summary.completed(stage, result)
    assert text.startswith("## Summary\n\n")
    for word in words:
        assert word in text


def test_failed_summary_names_the_error_as_text() -> None:
    text = summary.failed("50-verify", "demo.qcow2 did not boot: <b>Kernel panic</b>")
    assert "failed" in text and "<b>" not in html_of(text) and "&lt;b&gt;Kernel panic" in html_of(text)


def notebook(path: Path, *, title: bool) -> Path:
    nb = nbformat.v4.new_notebook()
    if title:
        nb.cells.append(nbformat.v4.new_markdown_cell("# 30-bootable: a disk"))
    nb.cells.append(nbformat.v4.new_code_cell("x = 1"))
    nbformat.write(nb, path)
    return path


def test_insert_goes_under_the_title_and_replaces_an_earlier_summary(tmp_path: Path) -> None:
    path = notebook(tmp_path / "a.ipynb", title=True)
    summary.insert(path, "## Summary\n\nfirst")
    summary.insert(path, "## Summary\n\nsecond")
    cells = nbformat.read(path, as_version=4).cells
    assert [c.cell_type for c in cells] == ["markdown", "markdown", "code"]
    assert cells[1].source == "## Summary\n\nsecond" and cells[1].metadata["tags"] == [summary.TAG]
    nbformat.validate(nbformat.read(path, as_version=4))


def test_insert_without_a_title_goes_first(tmp_path: Path) -> None:
    path = notebook(tmp_path / "b.ipynb", title=False)
    summary.insert(path, "## Summary\n\nx")
    assert nbformat.read(path, as_version=4).cells[0].source == "## Summary\n\nx"


def test_insert_goes_under_the_title_past_papermills_error_banner(tmp_path: Path) -> None:
    path = notebook(tmp_path / "c.ipynb", title=True)
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(
        0, nbformat.v4.new_markdown_cell('<span style="color:red">An Exception was encountered</span>')
    )
    nbformat.write(nb, path)
    summary.insert(path, "## Summary\n\nfailed")
    cells = nbformat.read(path, as_version=4).cells
    assert [c.source[:12] for c in cells[:3]] == ["<span style=", "# 30-bootabl", "## Summary\n\n"]


def test_cloud_copies_and_cloud_images_are_summarised_without_markup() -> None:
    fetched = {"source": "ec2://aws/i-0123456789abcdef0", "cloud": "aws", "kind": "ec2", "path": "/w/source.raw",
               "format": "raw", "size_bytes": 1 << 30, "data_bytes": 23 << 20, "sha256": "ab" * 32,
               "verified": "44 blocks of 524288 bytes, each against its SHA256 from EBS", "seconds": 1.3,
               "where": "vol-1 via snap-2", "snapshot": "snap-2"}  # fmt: skip
    acquired = {"source": fetched["source"], "source_format": "raw", "partition": None, "fs_type": "ext3",
                "uuid": "u", "label": "", "size_bytes": 1 << 29, "used_bytes": 1 << 25, "fsck": "clean",
                "fetched": fetched}  # fmt: skip
    text = html_of(summary.completed("00-acquire", acquired))
    assert "Copied out of ec2 cloud" in text and "each against its SHA256 from EBS" in text
    published = {"destination": "os", "kind": "openstack", "image_id": "0b1c", "name": HOSTILE, "vis": "selected",
                 "shared_with": ["bob"], "grantees": ["proj-bob"], "location": "http://glance", "sha256": "cd" * 32,
                 "size_bytes": 1, "seconds": 1.0, "details": {}}  # fmt: skip
    text = html_of(summary.completed("60-publish", published))
    assert "Published" in text and "0b1c" in text and "proj-bob" in text
    assert "<script" not in text and "&lt;script&gt;" in text


def test_the_targets_drivers_and_the_boot_checks_machine_are_said() -> None:
    migrated = {"profile": "debian", "target": "aws", "kernel": "6.12", "files_changed": 3, "packages": "(none)",
                "initrd": "/boot/initrd.img-6.12 (rebuilt)", "initrd_modules": "ena, nvme", "initrd_bytes": 10,
                "changes": [], "drivers": {"nvme": "built into the kernel", "ena": "initrd"}}  # fmt: skip
    assert (
        "The target's drivers: <code>nvme</code> (built into the kernel), <code>ena</code> (initrd)."
        in summary.completed("20-migrate", migrated)
    )
    note = "QEMU has no ENA; the boot check's NIC is virtio-net"
    text = summary.completed(
        "50-verify", {**VERIFY, "target": "aws", "controller": "nvme", "machine_note": note}
    )
    assert "(nvme disk controller, tcg)" in text and text.rstrip().endswith(f"{note}.")


def test_an_assumed_profile_is_a_warning_in_the_summary() -> None:
    assumed = (
        "Rocky Linux 10.1 (rocky 10.1): profile rhel is written for rocky 8, 9, not 10.1; treated as rocky 9"
    )
    result = {"profile": "rhel", "profile_reason": "os-release: ID rocky, VERSION_ID 10.1", "profile_assumed": assumed,
              "operations": [], "actions": []}  # fmt: skip
    assert f"**Warning**: profile assumed: {assumed}." in summary.completed("10-clean", result)
    assert "Warning" not in summary.completed("10-clean", {**result, "profile_assumed": ""})


def test_a_gpt_disk_is_summed_up_with_its_three_partitions_and_each_firmwares_boot() -> None:
    layout = {**BOOTABLE["layout"], "scheme": "gpt", "start_sector": 266240, "end_sector": 3411934,
              "offset_bytes": 136314880, "partition_sectors": 3145695, "bios_boot_start": 2048, "bios_boot_sectors": 2048,
              "esp_start": 4096, "esp_sectors": 262144}  # fmt: skip
    disk = {**BOOTABLE["disk"], "label": "gpt", "platforms": ["bios", "uefi"]}
    grub = {**BOOTABLE["grub"], "uefi": "the guest's shim and signed GRUB: Secure Boot"}
    text = summary.completed("30-bootable", {**BOOTABLE, "layout": layout, "disk": disk, "grub": grub})
    rows = re.findall(r"<tr>(.*?)</tr>", html_of(text), re.S)
    cells = [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S) for row in rows]
    assert cells[0] == ["partition", "start", "end", "sectors", "size", "type"]
    assert cells[1][:4] == ["1", "266240", "3411934", "3145695"]
    assert [c[0] for c in cells[1:]] == ["1", "14", "15"] and "EFI System" in cells[3][5]
    assert "for bios, uefi" in text and "Secure Boot" in text and "last 33 sectors" in text
    boots = [{"firmware": "bios", "verdict": "booted", "reason": "marker", "seconds": 40.1, "secure_boot": ""},
             {"firmware": "uefi", "verdict": "booted", "reason": "marker", "seconds": 39.8,
              "secure_boot": "Secure boot enabled"}]  # fmt: skip
    verified = summary.completed("50-verify", {**VERIFY, "boots": boots})
    assert "Under bios: booted (marker) in 40.1 s." in verified
    assert "Under uefi: booted (marker) in 39.8 s; Secure boot enabled." in verified
