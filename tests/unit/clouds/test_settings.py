"""Cloud settings, SOURCE URIs and names: validated on load, one-line errors, no secret quoted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imaging import config
from imaging.clouds import ec2
from imaging.clouds import settings as cs
from imaging.errors import ParameterError

CLOUDS = {
    "aws": {
        "kind": "ec2",
        "access_key_id": "AKIAX",
        "secret_access_key": "s3cr3t",
        "accounts": {"bob": "111122223333"},
    },
    "os": {
        "kind": "openstack",
        "auth": {"auth_url": "https://keystone", "password": "pw"},
        "projects": {"bob": "p1"},
    },
    "euca": {"kind": "eucalyptus", "nodes": ["node1", "node2:2222"], "key_file": "/k", "known_hosts": "/h"},
}


def test_sources() -> None:
    assert cs.parse_source("ec2://aws/i-0123456789abcdef0") == cs.CloudSource(
        "ec2", "aws", "i-0123456789abcdef0"
    )
    assert str(cs.parse_source("eucalyptus://euca/i-3A4B5C6D")) == "eucalyptus://euca/i-3A4B5C6D"
    assert cs.parse_source("openstack://os/0e2b9a1c-6f7d-4e1a-9c3b-2d4e5f6a7b8c").kind == "openstack"
    for bad, message in [
        ("ec2://aws/i-0123/x", "is not KIND://CLOUD/INSTANCE"),
        ("gce://aws/i-01234567", "unknown cloud kind 'gce'"),
        ("ec2://AWS/i-01234567", "'AWS' is not a cloud name"),
        ("ec2://aws/i-0123;id", "is not a ec2 instance id"),
        ("openstack://os/../../etc", "is not KIND://CLOUD/INSTANCE"),
        ("openstack://os/not-a-uuid", "is not a openstack instance id"),
    ]:
        with pytest.raises(ParameterError, match=message):
            cs.parse_source(bad)
    assert cs.is_cloud_source("ec2://a/b") and not cs.is_cloud_source("sample:kvm")


def test_environment_json_and_file_round_trip(tmp_path: Path) -> None:
    clouds = cs.parse_clouds(CLOUDS, "test")
    dumped = cs.dump_clouds(clouds)
    assert "s3cr3t" in dumped and "pw" in dumped  # for the run's environment only
    assert "s3cr3t" not in repr(clouds) and "s3cr3t" not in str(clouds["aws"])
    assert cs.from_environment({cs.ENV: dumped}) == clouds
    path = tmp_path / "clouds.json"
    path.write_text(json.dumps({"clouds": json.loads(dumped)}))
    assert cs.from_environment({cs.ENV: str(path)}) == clouds
    assert cs.from_environment({}) == {}
    with pytest.raises(ParameterError, match="IMAGING_CLOUDS is not a JSON object"):
        cs.from_environment({cs.ENV: "{nope"})
    with pytest.raises(ParameterError, match="cannot read /nonexistent"):
        cs.from_environment({cs.ENV: "/nonexistent"})
    with pytest.raises(ParameterError, match=r"no cloud 'gcp' is configured \(configured: aws, euca, os\)"):
        cs.cloud_for("ec2", "gcp", clouds)
    with pytest.raises(ParameterError, match="cloud 'os' is a openstack cloud, not ec2"):
        cs.cloud_for("ec2", "os", clouds)


def test_bad_settings_never_quote_a_secret() -> None:
    bad = {"aws": {**CLOUDS["aws"], "secret_access_key": {"x": "s3cr3t"}}}
    with pytest.raises(ParameterError) as e:
        cs.parse_clouds(bad, "service.yaml")
    assert "aws.ec2.secret_access_key" in str(e.value) and "s3cr3t" not in str(e.value)


@given(
    st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=255)
)
def test_every_display_name_has_a_safe_slug(name: str) -> None:
    name = name.strip() or "x"
    if not all(c.isprintable() or c == " " for c in name):
        return
    slug = config.slug(name)
    assert config.check_name(slug) == slug and len(slug) <= 60 and slug == config.slug(name)


def test_slugs_keep_plain_names_and_tell_others_apart() -> None:
    assert config.slug("demo-1.2") == "demo-1.2"
    assert config.slug("x y") != config.slug("x-y") and config.slug("x y").startswith("x-y-")
    assert config.slug("образ").startswith("image-")
    for bad in ("x\n", "a\tb", "\x1b[2J", "", "x" * 256, " x"):
        with pytest.raises(ParameterError):
            config.check_display_name(bad)


def test_ami_names_fit_ec2s_rules() -> None:
    name = ec2.ami_name("Débian «web» server; $(id) " + "x" * 300, "ir-0123456789ab")
    assert 3 <= len(name) <= 128 and name.endswith(" ir-0123456789ab")
    assert all(c.isalnum() or c in "()[] ./'@_-" for c in name)


def test_node_compress_takes_yaml_booleans_and_packs_over_a_network_only() -> None:
    from imaging.clouds import eucalyptus

    def node(address: str, **extra: object) -> cs.Eucalyptus:
        settings = {"kind": "eucalyptus", "nodes": [address], "key_file": "/k", "known_hosts": "/h", **extra}
        cloud = cs.parse_clouds({"n": settings}, "test")["n"]
        assert isinstance(cloud, cs.Eucalyptus)
        return cloud

    assert [node("nc1", compress=v).compress for v in (True, False, "auto")] == ["on", "off", "auto"]
    with pytest.raises(ParameterError):
        node("nc1", compress="fast")

    def found(address: str, packer: str = "zstd") -> eucalyptus.Found:
        return eucalyptus.Found(address, "/i/root", 1, 0, packer, "openssl")

    assert eucalyptus.packer_for(node("nc1.example.org"), found("nc1.example.org")) == "zstd"
    assert (
        eucalyptus.packer_for(node("127.0.0.1:22"), found("127.0.0.1:22")) is None
    )  # bound by the CPU there
    assert eucalyptus.packer_for(node("nc1", compress="on"), found("127.0.0.1")) == "zstd"
    assert eucalyptus.packer_for(node("nc1"), found("nc1", "gzip")) is None
    assert eucalyptus.packer_for(node("nc1", compress="on"), found("nc1", "gzip")) == "gzip"
    assert eucalyptus.packer_for(node("nc1", compress="off"), found("nc1")) is None
