from __future__ import annotations

import json
from pathlib import Path

import pytest

from imaging.disk import debugfs, ext, images
from imaging.errors import SourceError


def test_dumpe2fs(data: Path) -> None:
    info = ext.ExtInfo.parse((data / "dumpe2fs-ext3.txt").read_text())
    assert info.uuid == "31ef4e9d-d0cd-50d7-b697-b34b26b83c9c"
    assert info.label == "sample-kvm"
    assert info.block_size == 4096
    assert info.block_count == 131072
    assert info.fs_type == "ext3"
    assert info.used_bytes == (131072 - info.free_blocks) * 4096
    assert "has_journal" in info.features


def test_dumpe2fs_of_something_else_is_a_source_error() -> None:
    with pytest.raises(SourceError, match="not an ext2/3/4 superblock"):
        ext.ExtInfo.parse("Bad magic number in super-block\n")


@pytest.mark.parametrize(
    ("features", "kind"),
    [
        ("ext_attr resize_inode dir_index filetype sparse_super", "ext2"),
        ("has_journal ext_attr dir_index filetype sparse_super", "ext3"),
        ("has_journal extent 64bit flex_bg metadata_csum", "ext4"),
    ],
)
def test_fs_type_from_features(features: str, kind: str) -> None:
    info = ext.ExtInfo("u", "", 4096, 1, 0, 1, 0, tuple(features.split()), "clean")
    assert info.fs_type == kind


@pytest.mark.parametrize(
    ("code", "meaning", "ok"),
    [(0, "clean", True), (1, "errors corrected", True), (4, "errors left uncorrected", False),
     (8, "operational error", False), (12, "errors left uncorrected, operational error", False)],
)  # fmt: skip
def test_fsck_verdict(code: int, meaning: str, ok: bool) -> None:
    verdict = ext.FsckVerdict(code, "summary")
    assert verdict.meaning == meaning
    assert verdict.ok is ok
    assert str(verdict) == f"{meaning} (exit {code}): summary"


def test_sfdisk_json(data: Path) -> None:
    table = images.PartitionTable.from_json(json.loads((data / "sfdisk-msdos.json").read_text()))
    assert table.label == "dos"
    assert table.sector_size == 512
    (p,) = table.partitions
    assert (p.number, p.start, p.type, p.bootable) == (1, 2048, "83", True)
    assert p.end == p.start + p.size - 1


def test_qemu_img_info_backing_file(data: Path) -> None:
    info = images.ImageInfo.from_json(
        Path("x.qcow2"), json.loads((data / "qemu-img-info-backing.json").read_text())
    )
    assert info.format == "qcow2"
    assert info.backing_file == "/tmp/proto/inst.img"
    with pytest.raises(SourceError, match="backing file"):
        images.check_self_contained(info)


def test_vmdk_with_extents_elsewhere_is_refused() -> None:
    details = {
        "format": "vmdk",
        "virtual-size": 1 << 20,
        "format-specific": {"type": "vmdk", "data": {"create-type": "monolithicFlat",
                                                      "extents": [{"filename": "/dev/sda"}]}},
    }  # fmt: skip
    info = images.ImageInfo.from_json(Path("/tmp/x.vmdk"), details)
    with pytest.raises(SourceError, match="refers to other files"):
        images.check_self_contained(info)


def test_qcow2_external_data_file_is_refused() -> None:
    details = {
        "format": "qcow2",
        "virtual-size": 1,
        "format-specific": {"data": {"data-file": "/etc/shadow"}},
    }
    with pytest.raises(SourceError, match="another file"):
        images.check_self_contained(images.ImageInfo.from_json(Path("x"), details))


def test_blkid_export() -> None:
    probe = images.Probe.parse("DEVNAME=x\nLABEL=root fs\nUUID=abc\nTYPE=ext3\nUSAGE=filesystem\n")
    assert probe == images.Probe("ext3", None, "abc", "root fs")
    assert images.Probe.parse("PTUUID=1\nPTTYPE=dos\n").pttype == "dos"


def test_debugfs_ls(data: Path) -> None:
    entries = debugfs.parse_ls((data / "debugfs-ls-boot.txt").read_text())
    assert [e.name for e in entries] == [
        "config-6.1.0-56-amd64",
        "initrd.img-6.1.0-56-amd64",
        "vmlinuz-6.1.0-56-amd64",
    ]
    assert all(e.is_file for e in entries)


def test_debugfs_ls_skips_what_it_cannot_parse() -> None:
    text = "/12/100644/0/0/ok/5/\n/13/100644/0/0/bad\nname/5/\n/14/120777/0/0/link/3/\n"
    entries = debugfs.parse_ls(text)
    assert [(e.name, e.is_symlink) for e in entries] == [("ok", False), ("link", True)]


@pytest.mark.parametrize("path", ["/etc/../../x", "relative", "/a b", "/a;rm", "/a//b", "/$(x)"])
def test_debugfs_refuses_odd_paths(path: str) -> None:
    from imaging.errors import GuestError

    with pytest.raises(GuestError, match="refusing guest path"):
        debugfs._check(path)
