"""The service's clouds: instances in them, destinations, and what a run gets to see."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imaging.clouds import settings as cs
from imaging.errors import ParameterError
from imaging.service import settings, worker
from imaging.service.store import Actor, Store

CLOUDS = {
    "aws": {"kind": "ec2", "access_key_id": "AKIAX", "secret_access_key": "aws-s3cr3t"},
    "os": {"kind": "openstack", "auth_type": "none", "image_endpoint": "http://127.0.0.1:9292"},
    "euca": {"kind": "eucalyptus", "nodes": ["node1"], "key_file": "/k", "known_hosts": "/h"},
}


def make(tmp_path: Path, **extra: object) -> settings.Settings:
    return settings.Settings(state_dir=tmp_path, clouds=CLOUDS, **extra)  # type: ignore[arg-type]


def test_instances_destinations_and_sources(tmp_path: Path) -> None:
    s = make(tmp_path, instances={"i-1": "ec2://aws/i-0123456789abcdef0"}, publish={"cloud": "os"})
    assert s.source_of("i-1") == "ec2://aws/i-0123456789abcdef0"
    assert s.source_of("euca/i-0123abcd") == "eucalyptus://euca/i-0123abcd"
    with pytest.raises(ParameterError, match="unknown instance 'gce/i-1'"):
        s.source_of("gce/i-1")
    with pytest.raises(ParameterError, match="is not a ec2 instance id"):
        s.source_of("aws/i-x;y")
    assert s.publishing() and s.default_destination() == "os" and s.check_destination("aws") == "aws"
    for bad in ("euca", "s3", "nowhere"):
        with pytest.raises(ParameterError):
            s.check_destination(bad)
    with pytest.raises(ValueError, match="instance i-2: no cloud 'gcp' is configured"):
        make(tmp_path, instances={"i-2": "ec2://gcp/i-0123456789abcdef0"})


def test_a_run_sees_only_the_clouds_its_request_uses(tmp_path: Path, database: str) -> None:
    s = make(tmp_path, instances={"i-1": "eucalyptus://euca/i-0123abcd", "i-2": "sample:kvm"})
    store = Store(database)
    store.add_user("alice")
    (alice,) = store.users(["alice"])
    owner = Actor("alice", "user", alice.id)
    req = store.create(owner, instance="i-1", name="a b", kind="image", vis="public", shared_with=[],
                       disk_format="qcow2", target="kvm", options={"destination": "aws", "clean": ["-logfiles"]})  # fmt: skip
    env = worker.child_env(s, req)
    seen = json.loads(env[cs.ENV])
    assert sorted(seen) == ["aws", "euca"] and seen["aws"]["secret_access_key"] == "aws-s3cr3t"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "IMAGING_S3_BUCKET" not in env
    argv = worker.command(s, req)
    assert argv[3:5] == ["export", "eucalyptus://euca/i-0123abcd"]
    assert {"--name=a b", "--destination=aws", "--clean=-logfiles", "--kind=image", "--vis=public"} <= set(
        argv
    )
    local = store.create(owner, instance="i-2", name="x", kind="export", vis=None, shared_with=[],
                         disk_format="raw", target="kvm", options={})  # fmt: skip
    assert cs.ENV not in worker.child_env(s, local)
    assert cs.ENV in settings.secret_env_names()
    store.close()


def test_an_image_is_made_for_the_cloud_it_is_published_to(tmp_path: Path, database: str) -> None:
    """EC2 registers Nitro machines from raw blocks; Glance serves OpenStack's KVM; the object store
    and exports keep the format's default target; a request naming its target or format wins."""
    from imaging.service import schemas

    s = make(tmp_path, instances={"i-1": "sample:kvm"}, publish={"cloud": "os", "bucket": "b"})
    store = Store(database)

    def made(**body: object) -> tuple[str, str]:
        fields = schemas.validated(schemas.CreateRequest(instance="i-1", name="n", **body), s, store)  # type: ignore[arg-type]
        return fields["target"], fields["disk_format"]

    assert made(vis="public", destination="aws") == ("aws", "raw")
    assert made(vis="public") == ("openstack", "qcow2")  # the service's default cloud
    assert made(vis="public", destination="s3") == ("kvm", "qcow2")
    assert made(vis="public", destination="aws", target="kvm") == ("kvm", "raw")
    assert made(disk_format="vmdk") == ("kvm", "vmdk")
    with pytest.raises(ParameterError, match="aws"):  # Glance's qcow2 is not what target aws takes
        made(vis="public", target="aws")
    # A Eucalyptus behind its EC2 API runs KVM guests: its settings say so, and are checked on load.
    euca = settings.Settings(
        state_dir=tmp_path, clouds={"euca": {"kind": "ec2", "image_target": "kvm", "image_format": "qcow2"}}
    )  # type: ignore[dict-item]
    assert euca.image_machine("euca") == ("kvm", "qcow2")
    with pytest.raises(ValueError, match="image_target/image_format: unknown target 'nitro'"):
        settings.Settings(state_dir=tmp_path, clouds={"x": {"kind": "ec2", "image_target": "nitro"}})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="image_target/image_format: .*qcow2"):
        settings.Settings(state_dir=tmp_path, clouds={"x": {"kind": "ec2", "image_format": "qcow2"}})  # type: ignore[dict-item]
    store.close()
