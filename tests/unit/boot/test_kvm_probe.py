from __future__ import annotations

import subprocess
from pathlib import Path

from imaging.boot import qemu, verify


def test_probe_bytes_are_the_assembled_source(tmp_path: Path) -> None:
    source = Path(qemu.__file__).with_name("kvm_probe.S")
    subprocess.run(["as", "--64", "-o", tmp_path / "p.o", source], check=True)
    subprocess.run(
        [
            "ld",
            "-m",
            "elf_x86_64",
            "-Ttext",
            "0x7c00",
            "--oformat",
            "binary",
            "-o",
            tmp_path / "p.bin",
            tmp_path / "p.o",
        ],
        check=True,
    )
    assert (tmp_path / "p.bin").read_bytes() == qemu._PROBE_CODE
    assert len(qemu.PROBE_SECTOR) == 512 and qemu.PROBE_SECTOR.endswith(b"\x55\xaa")


def test_qemu_argv_follows_the_target(tmp_path: Path) -> None:
    from imaging import config

    log = tmp_path / "serial.log"
    vb = verify.qemu_argv(Path("/a.vmdk"), "vmdk", config.load_target("virtualbox"), "tcg", log)
    assert "ahci,id=ahci0" in vb and "ide-hd,drive=disk0,bus=ahci0.0" in vb
    assert vb[vb.index("-netdev") + 1] == "user,id=net0,restrict=on" and "e1000,netdev=net0" in vb
    assert "file=/a.vmdk,format=vmdk,if=none,id=disk0,snapshot=on" in vb
    os_ = verify.qemu_argv(Path("/a.qcow2"), "qcow2", config.load_target("openstack"), "kvm", log)
    assert "virtio-blk-pci,drive=disk0" in os_ and os_[os_.index("-accel") + 1] == "kvm"
    # A comma in a directory name stays in the file name (QEMU reads ",," as one comma).
    odd = verify.qemu_argv(Path("/srv/a,format=raw/b.qcow2"), "qcow2", config.load_target("kvm"), "tcg", log,
                           ssh_port=2222, pcap=Path("/srv/a,b/net.pcap"))  # fmt: skip
    assert "file=/srv/a,,format=raw/b.qcow2,format=qcow2,if=none,id=disk0,snapshot=on" in odd
    # sshd reachable on loopback only; the capture's path escaped the same way.
    assert odd[odd.index("-netdev") + 1] == "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22"
    assert "filter-dump,id=dump0,netdev=net0,file=/srv/a,,b/net.pcap" in odd


def test_the_clouds_boot_on_qemus_stand_ins(tmp_path: Path) -> None:
    """QEMU has no ENA, VMBus or gVNIC: each cloud target boots on the devices its YAML names."""
    from imaging import config

    def devices(target: str) -> list[str]:
        argv = verify.qemu_argv(Path("/a.raw"), "raw", config.load_target(target), "tcg", tmp_path / "s.log")
        return [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]

    assert devices("aws") == ["nvme,drive=disk0,serial=imaging0", "virtio-net-pci,netdev=net0"]
    assert devices("azure") == ["ide-hd,drive=disk0,bus=ide.0", "virtio-net-pci,netdev=net0"]
    assert devices("gce") == [
        "virtio-scsi-pci,id=scsi0",
        "scsi-hd,drive=disk0,bus=scsi0.0",
        "virtio-net-pci,netdev=net0",
    ]


def test_uefi_boots_ovmf_on_q35_with_secure_boot_where_asked(tmp_path: Path) -> None:
    from imaging import config

    target, log = config.load_target("openstack"), tmp_path / "serial.log"
    bios = verify.qemu_argv(Path("/a.qcow2"), "qcow2", target, "tcg", log)
    assert bios[bios.index("-M") + 1] == "pc" and not any("pflash" in a for a in bios)
    ovmf = verify._ovmf(True, tmp_path)  # the varstore is this boot's own copy, never the template
    assert (
        ovmf.vars == tmp_path / "efivars.fd"
        and ovmf.vars.read_bytes()
        == Path(
            config.load_qemu_devices().secure_boot.vars  # type: ignore[union-attr]
        ).read_bytes()
    )
    uefi = verify.qemu_argv(Path("/a.qcow2"), "qcow2", target, "tcg", log, firmware=ovmf)
    assert uefi[uefi.index("-M") + 1] == "q35,smm=on"
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf.code}" in uefi
    assert f"if=pflash,format=raw,unit=1,file={ovmf.vars}" in uefi
    assert "driver=cfi.pflash01,property=secure,value=on" in uefi
    plain = verify.qemu_argv(
        Path("/a.qcow2"), "qcow2", target, "tcg", log, firmware=verify._ovmf(False, tmp_path)
    )
    assert (
        plain[plain.index("-M") + 1] == "q35" and "driver=cfi.pflash01,property=secure,value=on" not in plain
    )


def test_the_firmware_of_a_disk_30_bootable_did_not_make(tmp_path: Path) -> None:
    import subprocess

    from imaging.workspace import Workspace

    ws = Workspace.open(tmp_path / "run")
    ws.work.mkdir(parents=True, exist_ok=True)
    assert verify.firmware_of(ws) == {"firmware": ("bios",), "secure_boot": False}
    with open(ws.disk, "wb") as f:
        f.truncate(8 << 20)
    script = "label: gpt\n\nstart=2048, size=2048, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\nstart=4096, size=8192\n"
    subprocess.run(["sfdisk", "--quiet", ws.disk], input=script, text=True, check=True)
    assert verify.firmware_of(ws) == {"firmware": ("uefi",), "secure_boot": False}
    ws.save_result("30-bootable", {"disk": {"platforms": ["bios", "uefi"], "secure_boot": True}})
    assert verify.firmware_of(ws) == {"firmware": ("bios", "uefi"), "secure_boot": True}
