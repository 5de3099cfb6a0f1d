from __future__ import annotations

from pathlib import Path

import pytest

from imaging import config
from imaging.errors import ParameterError
from imaging.run import pipeline
from imaging.run.request import Request


@pytest.mark.parametrize("name", ["demo", "centos-5.11_x86", "A1", "x" * 80])
def test_good_names(name: str) -> None:
    assert config.check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a/b",
        "../x",
        "a..b",
        ".hidden",
        "-rf",
        "a b",
        "a;rm -rf",
        "$(id)",
        "`id`",
        "a|b",
        "x" * 81,
        "é",
        "x\n",
        "x\r\n",
        "x\nBcc: y",
    ],  # fmt: skip
)
def test_bad_names(name: str) -> None:
    with pytest.raises(ParameterError, match="not allowed"):
        config.check_name(name)


def test_targets_load_and_validate() -> None:
    vb = config.load_target("virtualbox")
    assert (vb.disk_controller, vb.nic, vb.memory_mib) == ("ahci", "e1000", 512)
    assert config.load_target("openstack").disk_controller == "virtio"
    with pytest.raises(ParameterError, match="unknown target 'vmware'"):
        config.load_target("vmware")
    with pytest.raises(ParameterError, match="unknown target"):
        config.load_target("../defaults")


DRIVERS = (
    "storage_modules: [virtio_blk]\ninitrd_modules: [virtio_blk]\nnic_module: virtio_net\nformats: [raw]\n"
)


def _params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target_yaml: str) -> None:
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "odd.yaml").write_text(target_yaml + (DRIVERS if "name:" in target_yaml else ""))
    monkeypatch.setenv("IMAGING_PARAMETERS", str(tmp_path))
    config.load_target.cache_clear()


def test_unknown_key_in_yaml_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _params(
        tmp_path, monkeypatch, "name: odd\ndescription: x\ndisk_controller: ahci\nnic: e1000\nsound: yes\n"
    )
    with pytest.raises(ParameterError, match=r"odd.yaml: sound: Extra inputs are not permitted"):
        config.load_target("odd")
    config.load_target.cache_clear()


def test_bad_value_in_yaml_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _params(tmp_path, monkeypatch, "name: odd\ndescription: x\ndisk_controller: 'a b'\nnic: e1000\n")
    with pytest.raises(ParameterError, match="odd.yaml: disk_controller: String should match pattern"):
        config.load_target("odd")
    config.load_target.cache_clear()


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("disk_controller: floppy\nnic: e1000\n",
         r"disk_controller/nic: controller 'floppy' is not one the boot check knows \(parameters/qemu.yaml: "
         r"ahci, ide, nvme, virtio, virtio-scsi\)"),
        ("disk_controller: nvme\nnic: ena\n", r"disk_controller/nic: NIC 'ena' is not one the boot check knows"),
        ("disk_controller: nvme\nnic: ena\nboot: {controller: virtio, nic: ena}\n",
         r"boot: NIC 'ena' is not one the boot check knows"),
        ("disk_controller: nvme\nnic: ena\nboot: {controller: ide, nic: e1000}\n",
         r"the boot check's ide disk needs ata_piix in initrd_modules"),
        ("disk_controller: virtio\nnic: e1000\ninitrd_required: [ena]\n",
         r"initrd_required names ena, which initrd_modules does not ask the initrd tool for"),
        ("disk_controller: virtio\nnic: e1000\nsubformats: {vhd: fixed}\n",
         r"subformats names vhd, which is not among its formats"),
        ("disk_controller: virtio\nnic: e1000\nsubformats: {raw: fixed}\n", r"raw has no subformat 'fixed'"),
        ("disk_controller: virtio\nnic: e1000\nsubformats: {vhd: sparse}\n",
         r"vhd has no subformat 'sparse' \(known: dynamic, fixed\)"),
    ],
)  # fmt: skip
def test_a_targets_machine_must_be_one_the_boot_check_can_make(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, yaml_text: str, message: str
) -> None:
    _params(tmp_path, monkeypatch, "name: odd\ndescription: x\n" + yaml_text)
    with pytest.raises(ParameterError, match=message):
        config.load_target("odd")
    config.load_target.cache_clear()


def test_the_public_clouds_targets() -> None:
    aws, azure, gce = (config.load_target(t) for t in ("aws", "azure", "gce"))
    # The machine in the cloud, and the one QEMU boots instead where it has not got the device.
    assert (aws.disk_controller, aws.nic, aws.boot_check.controller, aws.boot_check.nic) == (
        "nvme", "ena", "nvme", "virtio-net-pci",
    )  # fmt: skip
    assert (azure.boot_check.controller, gce.boot_check.controller) == ("ide", "virtio-scsi")
    assert "QEMU has no ENA" in aws.boot_check.note
    assert aws.initrd_required == ["nvme", "ena"]
    assert azure.initrd_required == ["hv_vmbus", "hv_storvsc", "hv_netvsc"]
    assert gce.initrd_required == ["virtio_scsi", "gve", "virtio_net"]
    assert [f.value for f in aws.formats] == ["raw", "vmdk", "vhd"]
    assert azure.subformat(config.ImageFormat.vhd) == "fixed"
    assert config.load_target("kvm").subformat(config.ImageFormat.vhd) == ""
    assert config.default_target("gce") == "gce" and config.default_target("vhd") == "kvm"
    # A target without boot: boots on its own controller and NIC.
    assert config.load_target("virtualbox").boot_check == config.BootCheck(controller="ahci", nic="e1000")


def test_a_format_variant_the_target_does_not_take_is_refused_before_anything_runs() -> None:
    config.check_target_format("aws", "vmdk", "streamOptimized")
    with pytest.raises(
        ParameterError, match="target aws takes vmdk as streamOptimized only, not monolithicSparse"
    ):
        Request.create(
            source="/x.img", name="a", format="vmdk", target="aws", vmdk_subformat="monolithicSparse"
        )
    with pytest.raises(
        ParameterError, match=r"format qcow2 does not boot on target gce .*use a target for qcow2"
    ):
        Request.create(source="/x.img", name="a", format="qcow2", target="gce")
    assert Request.create(source="/x.img", name="a", format="gce").target == "gce"


def test_broken_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "odd.yaml").write_text("name: [odd\n")
    monkeypatch.setenv("IMAGING_PARAMETERS", str(tmp_path))
    config.load_target.cache_clear()
    with pytest.raises(ParameterError, match="not valid YAML"):
        config.load_target("odd")
    config.load_target.cache_clear()


@pytest.mark.parametrize(
    "args", ["quiet splash", "console=ttyS1,9600n8", "init=/bin/sh", "rd.break=pre-mount"]
)
def test_kernel_args_allowed(args: str) -> None:
    assert config.check_kernel_args(args) == args


@pytest.mark.parametrize("args", ["a;reboot", "x='y'", "$(id)", "a}", 'x"y'])
def test_kernel_args_refused(args: str) -> None:
    with pytest.raises(ParameterError, match="GRUB would interpret"):
        config.check_kernel_args(args)


def test_disk_size_parsing() -> None:
    assert config.parse_disk_size("auto") == ("auto", 0)
    assert config.parse_disk_size("10G") == ("absolute", 10 << 30)
    assert config.parse_disk_size("+512MiB") == ("extra", 512 << 20)
    assert config.parse_disk_size("1.5G") == ("absolute", 3 << 29)


def test_request_takes_defaults_and_rejects_unknowns() -> None:
    r = Request.create(source="/x.img", name="demo")
    assert (r.format, r.target, r.layout.value, r.placement.value) == ("qcow2", "kvm", "aligned", "copy")
    assert Request.create(source="sample:kvm", name="d").boot_marker == "IMAGING-SAMPLE-OK"
    with pytest.raises(ParameterError, match="unknown format 'iso'"):
        Request.create(source="/x.img", name="demo", format="iso")
    with pytest.raises(ParameterError, match="Extra inputs"):
        Request.create(source="/x.img", name="demo", colour="blue")
    with pytest.raises(ParameterError, match="control or unprintable character"):
        Request.create(source="/x.img", name="x\n")
    assert Request.create(source="/x.img", name="a/b c").slug == config.slug("a/b c") != "a/b c"


def test_every_pipeline_stage_has_a_notebook() -> None:
    for kind, stages in config.load_defaults().pipelines.items():
        for stage in stages:
            assert pipeline.notebook_path(stage).is_file(), (kind, stage)


def test_a_format_gets_the_target_that_boots_it() -> None:
    from imaging.run.request import Request

    # The original's export request: {"disk_format": "ova"} and no target.
    assert Request.create(source="x.img", name="n", format="ova").target == "virtualbox"
    assert Request.create(source="x.img", name="n", format="vdi").target == "virtualbox"
    assert Request.create(source="x.img", name="n", format="qcow2").target == "kvm"
    assert Request.create(source="x.img", name="n", format="ova", target="virtualbox").target == "virtualbox"
    # An OVA's descriptor declares SATA AHCI and e1000: a virtio target cannot boot it.
    with pytest.raises(
        ParameterError,
        match=r"^format ova does not boot on target kvm .* use a target for ova \(virtualbox\)$",
    ):
        Request.create(source="x.img", name="n", format="ova", target="kvm")
    with pytest.raises(ParameterError, match=r"format qcow2 does not boot on target virtualbox"):
        Request.create(source="x.img", name="n", format="qcow2", target="virtualbox")
    for name in config.available("targets"):
        assert config.load_target(name).formats, name


def test_a_name_with_a_trailing_newline_is_refused_everywhere_a_name_goes() -> None:
    # `$` in a pattern accepts "x\n"; every name check must match the whole string.
    with pytest.raises(ParameterError, match=r"^name 'x\\n' has a control or unprintable character"):
        Request.create(source="sample:kvm", name="x\n")
    with pytest.raises(ParameterError, match="not allowed"):
        Request.create(source="sample:kvm", name="x", shared_with=["bob\n"], vis="selected")
    with pytest.raises(ParameterError, match="unknown target"):
        config.load_target("kvm\n")


def test_each_target_says_which_firmware_it_boots() -> None:
    booted = {name: config.load_target(name).firmware for name in config.available("targets")}
    assert booted == {"aws": ["bios", "uefi"], "azure": ["bios"], "azure-gen2": ["uefi"], "gce": ["bios", "uefi"],
                      "kvm": ["bios", "uefi"], "openstack": ["bios", "uefi"],
                      "virtualbox": ["bios", "uefi"]}  # fmt: skip
    # Azure's generation 2: generation 1's drivers and fixed VHD, UEFI only, and a boot check on
    # SCSI (QEMU's q35, which UEFI boots on, has no IDE), its driver in the initrd for the check.
    gen1, gen2 = config.load_target("azure"), config.load_target("azure-gen2")
    assert gen2.initrd_required == gen1.initrd_required and gen2.subformat(config.ImageFormat.vhd) == "fixed"
    assert (gen2.formats, gen2.boot_check.controller) == (gen1.formats, "virtio-scsi")
    assert "virtio_scsi" in gen2.initrd_modules and "ata_piix" not in gen2.initrd_modules
    assert config.choose_firmware("auto", gen2) is config.Firmware.uefi
    assert config.choose_firmware("auto", config.load_target("gce")) is config.Firmware.hybrid
    with pytest.raises(ParameterError, match="target azure-gen2 does not boot BIOS"):
        config.choose_firmware("hybrid", gen2)
