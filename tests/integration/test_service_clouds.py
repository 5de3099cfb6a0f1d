"""The request service with real clouds, end to end: an export request whose instance lives in
each of the three test clouds (a Eucalyptus node over SSH, EC2 + EBS direct, OpenStack), and image
requests published to Glance and to the EC2 API with their visibility and members, read back
through each cloud's API. No cloud credential may be found in any record or log."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from imaging import config, sparse

from .cloudkit import EC2Cloud, Glance, Node, NovaStub, ec2_cloud, eucalyptus_node, openstack_cloud
from .conftest import leftovers
from .servicekit import SMTP_PASSWORD, SMTP_USER, Mailbox, Service, assert_no_secrets, smtp_server

URL = "/api/v1/request_image/"


@dataclass
class World:
    service: Service
    mailbox: Mailbox
    node: Node
    aws: EC2Cloud
    aws_instance: str
    nova: NovaStub
    server: str
    glance: Glance


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, kvm_sample: Path, glance: Glance) -> Iterator[World]:
    root = tmp_path_factory.mktemp("clouds-service")
    qcow2 = root / "server.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(kvm_sample), str(qcow2)], check=True)
    with (
        smtp_server() as (mailbox, smtp_port),
        eucalyptus_node(tmp_path_factory.mktemp("node"), kvm_sample) as node,
        ec2_cloud() as aws,
        NovaStub(glance.url) as nova,
    ):
        aws_instance = aws.instance_from_disk(kvm_sample)
        server = nova.add(qcow2)
        settings = {
            "instances": {"i-euca": f"eucalyptus://euca/{node.instance}", "i-aws": f"ec2://aws/{aws_instance}",
                          "i-sample": "sample:kvm"},
            "clouds": {
                "euca": node.cloud(compress="on"),  # the sample is mostly holes: zstd -1 packs them
                # EC2's images are made for Nitro (target aws) by default; the busybox sample has
                # no NVMe driver, so this cloud takes KVM images, as a Eucalyptus behind its EC2 API does.
                "aws": aws.cloud(accounts={"bob": "111122223333"}, image_target="kvm"),
                "os": openstack_cloud(nova, glance, projects={"bob": "proj-bob"}),
            },
            "publish": {"cloud": "os"},
            "smtp": {"host": "127.0.0.1", "port": smtp_port, "username": SMTP_USER, "password": SMTP_PASSWORD},
            "worker": {"concurrency": 2, "poll_seconds": 0.5},
        }  # fmt: skip
        service = Service(root, root / "runs", settings)
        service.add_user("alice", email="alice@example.org")
        service.add_user("bob")
        service.add_user("root", admin=True, email="root@example.org")
        service.start()
        try:
            yield World(service, mailbox, node, aws, aws_instance, nova, server, glance)
        finally:
            service.stop()
    assert leftovers(root) == []


def ask(world: World, body: dict[str, Any]) -> str:
    # The sample's own init prints its marker and powers off: no login prompt to wait for. Inside
    # a cloud it is no longer "sample:kvm": a busybox guest no profile knows, so it is named.
    if not body["instance"].startswith("i-sample"):
        body = {"profile": "generic", **body, "boot_marker": "IMAGING-SAMPLE-OK"}
    r = world.service.client("alice").post(URL, json=body)
    assert r.status_code == 201, r.text
    rid = str(r.json()["id"])
    assert world.service.client("root").patch(URL + rid, json={"status": "approve"}).status_code == 200
    return rid


def test_exports_from_three_clouds_and_images_into_two(world: World, kvm_sample: Path) -> None:
    service = world.service
    alice = service.client("alice")
    # An export from each cloud: its node over SSH (with options the admin sees in the mail), EC2
    # through an EBS snapshot, OpenStack (by CLOUD/SERVER, no instances: entry) through Nova and Glance.
    euca = ask(world, {"instance": "i-euca", "name": "Web server (node 3)", "disk_format": "raw",
                       "profile": "generic", "clean": ["-logfiles"], "layout": "legacy"})  # fmt: skip
    aws = ask(world, {"instance": "i-aws", "name": "aws export", "disk_format": "raw"})
    ostack = ask(world, {"instance": f"os/{world.server}", "name": "openstack export", "disk_format": "raw"})
    # Image requests: to Glance (the service's default cloud), shared with bob's project; to EC2, public.
    to_glance = ask(world, {"instance": "i-sample", "name": "Débian «shared»", "vis": "selected",
                            "shared_with": ["bob"]})  # fmt: skip
    to_aws = ask(
        world, {"instance": "i-sample", "name": "public AMI", "vis": "public", "destination": "aws"}
    )
    # An instance no cloud has: a one-line error, no run.
    missing = ask(world, {"instance": "aws/i-0000000000000bad0", "name": "missing", "disk_format": "raw"})

    mail = world.mailbox.wait(f"approve {euca}", to="root@example.org").get_content()
    for line in (
        "profile     generic",
        "clean       -logfiles",
        "layout      legacy",
        "name        Web server (node 3)",
    ):
        assert line in mail, (line, mail)

    done = {rid: service.wait_state("alice", rid, {"completed", "error"}, timeout=900)
            for rid in (euca, aws, ostack, to_glance, to_aws, missing)}  # fmt: skip
    for rid in (euca, aws, ostack, to_glance, to_aws):
        assert done[rid]["state"] == "completed", (rid, done[rid]["error"])
        result = done[rid]["result"]
        assert result["verified"] and result["boot"]["verdict"] == "booted"
        report = alice.get(URL + rid + "/report")
        assert report.status_code == 200 and f"Audit record of run {rid}" in report.text
    assert done[missing]["state"] == "error"
    assert (
        "aws: describe instance i-0000000000000bad0: not found (InvalidInstanceID.NotFound"
        in done[missing]["error"]
    )
    assert "\n" not in done[missing]["error"]

    # What each export copied out of its cloud, and how it was checked.
    fetched = {rid: done[rid]["result"]["fetched"] for rid in (euca, aws, ostack)}
    assert fetched[euca]["kind"] == "eucalyptus" and fetched[euca]["digest"] == "sha256:" + sparse.sha256(
        kvm_sample, desc=None
    )
    assert done[euca]["result"]["source_digest"] == fetched[euca]["digest"]
    assert fetched[aws]["kind"] == "ec2" and fetched[aws]["verified"].endswith(
        "each against its SHA256 from EBS"
    )
    assert (
        fetched[ostack]["format"] == "qcow2"
        and fetched[ostack]["verified"] == "size, MD5 and sha512 from Glance"
    )
    assert done[euca]["options"] == {"profile": "generic", "clean": ["-logfiles"], "layout": "legacy",
                                     "boot_marker": "IMAGING-SAMPLE-OK"}  # fmt: skip
    request = json.loads((service.runs / euca / "request.json").read_text())
    assert (request["name"], request["profile"], request["clean"], request["layout"]) == (
        "Web server (node 3)", "generic", ["-logfiles"], "legacy")  # fmt: skip
    assert Path(done[euca]["result"]["path"]).name == f"{config.slug('Web server (node 3)')}.raw"
    download = alice.get(URL + aws + "/artifact")
    assert hashlib.sha256(download.content).hexdigest() == done[aws]["result"]["sha256"]

    # Glance: the image, its visibility and members, read back through Glance's API.
    # Each image is made for its cloud: Glance's for OpenStack as qcow2, this EC2's as its settings say.
    assert (done[to_glance]["target"], done[to_glance]["disk_format"]) == ("openstack", "qcow2")
    assert (done[to_aws]["target"], done[to_aws]["disk_format"]) == ("kvm", "raw")
    published = done[to_glance]["result"]["published"]
    assert (published["destination"], published["kind"], published["vis"]) == ("os", "openstack", "selected")
    image = httpx.get(f"{world.glance.url}/v2/images/{published['image_id']}").json()
    assert (image["name"], image["visibility"], image["status"], image["disk_format"]) == (
        "Débian «shared»", "shared", "active", "qcow2")  # fmt: skip
    members = httpx.get(f"{world.glance.url}/v2/images/{published['image_id']}/members").json()["members"]
    assert [m["member_id"] for m in members] == ["proj-bob"]
    # EC2: the image and its launch permissions, read back through the EC2 API.
    published = done[to_aws]["result"]["published"]
    ec2 = world.aws.client("ec2")
    ami = ec2.describe_images(ImageIds=[published["image_id"]])["Images"][0]
    assert ami["Name"] == f"public AMI {to_aws}" and ami["State"] == "available"
    perms = ec2.describe_image_attribute(ImageId=published["image_id"], Attribute="launchPermission")
    assert perms["LaunchPermissions"] == [{"Group": "all"}]
    mail = world.mailbox.wait(f"{to_aws} completed", to="root@example.org").get_content()
    assert f"image       {published['image_id']} in aws" in mail

    assert_no_cloud_secrets(world)


def assert_no_cloud_secrets(world: World) -> None:
    """The EC2 secret key and the SSH private key (every line of it), besides the service's own."""
    key_lines = [
        line
        for line in world.node.key_file.read_text().splitlines()
        if line and not line.startswith("-----")
    ]
    assert_no_secrets(world.service, world.mailbox, [world.aws.secret_access_key, *key_lines])
