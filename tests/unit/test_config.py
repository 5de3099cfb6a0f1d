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
    _params(tmp_path, monkeypatch, "name: odd\ndescription: x\ndisk_controller: floppy\nnic: e1000\n")
    with pytest.raises(ParameterError, match="disk_controller: Input should be 'ahci', 'ide' or 'virtio'"):
        config.load_target("odd")
    config.load_target.cache_clear()


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
    with pytest.raises(ParameterError, match="name 'a/b' is not allowed"):
        Request.create(source="/x.img", name="a/b")


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
    with pytest.raises(ParameterError, match=r"^name 'x\\n' is not allowed"):
        Request.create(source="sample:kvm", name="x\n")
    with pytest.raises(ParameterError, match="not allowed"):
        Request.create(source="sample:kvm", name="x", shared_with=["bob\n"], vis="selected")
    with pytest.raises(ParameterError, match="unknown target"):
        config.load_target("kvm\n")
