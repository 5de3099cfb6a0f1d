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
