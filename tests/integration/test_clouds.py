"""Copying instances out of the three test clouds and publishing into two of them, against real
servers on loopback (cloudkit.py): an OpenSSH node, moto's EC2 + EBS direct, the real Glance
with a Nova stub. Every fault is a one-line error that leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imaging import sparse
from imaging.clouds import ec2, eucalyptus, openstack
from imaging.clouds import settings as cs
from imaging.clouds.resume import Cut, RangeSet
from imaging.errors import ImagingError, ParameterError, SourceError

from .cloudkit import (
    CuttingProxy,
    EC2Cloud,
    Glance,
    Node,
    NovaStub,
    ec2_cloud,
    eucalyptus_node,
    openstack_cloud,
)


def nothing_left(directory: Path) -> None:
    assert sorted(p.name for p in directory.iterdir()) == [], "a partial download was left behind"


def same_content(a: Path, b: Path) -> bool:
    """Equal bytes over a's length; b may be longer (a volume rounded up), holding zeros there."""
    return (
        sparse.sha256(a, desc=None) == _sha256_prefix(b, a.stat().st_size)
        and sparse.data_bytes(b, a.stat().st_size) == 0
    )


def _sha256_prefix(path: Path, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left:
            chunk = f.read(min(16 << 20, left))
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


# Eucalyptus: the node over SSH


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, kvm_sample: Path) -> Iterator[Node]:
    with eucalyptus_node(tmp_path_factory.mktemp("node"), kvm_sample) as n:
        yield n


def euca(node: Node, **extra: Any) -> tuple[cs.CloudSource, cs.Eucalyptus]:
    cloud = cs.parse_clouds({"euca": node.cloud(**extra)}, "test")["euca"]
    assert isinstance(cloud, cs.Eucalyptus)
    return cs.parse_source(f"eucalyptus://euca/{node.instance}"), cloud


@pytest.mark.parametrize("compress", ["off", "on"])
def test_eucalyptus_copy_is_sparse_and_checked(
    node: Node, dest: Path, kvm_sample: Path, compress: str
) -> None:
    src, cloud = euca(node, compress=compress)
    got = eucalyptus.fetch(src, cloud, dest / "source.raw")
    assert (
        got.digest == "sha256:" + sparse.sha256(kvm_sample, desc=None)
        and got.size_bytes == kvm_sample.stat().st_size
    )
    assert got.verified == "size and sha256 computed on the node" and got.where.endswith(
        "/admin/i-0123abcd/root"
    )
    assert sparse.allocated_bytes(dest / "source.raw") < kvm_sample.stat().st_size // 4  # holes stayed holes
    assert sorted(p.name for p in dest.iterdir()) == ["source.raw"]


def test_eucalyptus_host_key_mismatch_unknown_host_and_wrong_key(
    node: Node, dest: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong_known = tmp_path / "known_hosts"
    wrong_known.write_text(
        f"[127.0.0.1]:{node.port} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n"
    )
    src, cloud = euca(node, known_hosts=str(wrong_known))
    with pytest.raises(SourceError) as e:
        eucalyptus.fetch(src, cloud, dest / "source.raw")
    assert "its host key (ssh-ed25519 " in str(e.value) and "does not match" in str(e.value)
    assert "\n" not in str(e.value)
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(SourceError, match=rf"node 127.0.0.1:{node.port} is not in .*refusing to connect"):
        eucalyptus.fetch(src, euca(node, known_hosts=str(empty))[1], dest / "source.raw")
    with pytest.raises(SourceError, match="root cannot log in with .*other_key .authentication failed"):
        eucalyptus.fetch(src, euca(node, key_file=str(other))[1], dest / "source.raw")
    nothing_left(dest)


def test_eucalyptus_unknown_instance(node: Node, dest: Path) -> None:
    _, cloud = euca(node)
    with pytest.raises(
        SourceError, match=r"instance i-00000bad is on none of the nodes of euca \(127.0.0.1:"
    ):
        eucalyptus.fetch(cs.parse_source("eucalyptus://euca/i-00000bad"), cloud, dest / "source.raw")
    with pytest.raises(ParameterError, match="'i-x;rm' is not a eucalyptus instance id"):
        cs.parse_source("eucalyptus://euca/i-x;rm")
    nothing_left(dest)


@pytest.fixture(scope="module")
def small_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node whose disk is small (64 MiB, copied in well under a second) but not uniform: data
    that does not compress, a hole, text that does, and data that does not again."""
    root = tmp_path_factory.mktemp("small-node")
    disk = root / "disk.raw"
    with open(disk, "wb") as f:
        f.write(os.urandom(16 << 20))
        f.truncate(24 << 20)
        f.seek(24 << 20)
        f.write(
            b"".join(b"line %08d of a log that compresses well\n" % i for i in range(600_000))[: 24 << 20]
        )
        f.write(os.urandom(16 << 20))
    with eucalyptus_node(root / "node", disk) as n:
        yield n


def through(node: Node, proxy: CuttingProxy, directory: Path, **extra: Any) -> cs.Eucalyptus:
    """The node's cloud settings, reached through ``proxy``."""
    # The proxy's address is another host:port to known_hosts: give it the node's key there.
    known = directory / "proxy_known_hosts"
    known.write_text(f"[127.0.0.1]:{proxy.port} {node.known_hosts.read_text().split(' ', 1)[1]}")
    settings = node.cloud(nodes=[f"127.0.0.1:{proxy.port}"], known_hosts=str(known), **extra)
    cloud = cs.parse_clouds({"euca": settings}, "test")["euca"]
    assert isinstance(cloud, cs.Eucalyptus)
    return cloud


def cut_copy(node: Node, dest: Path, proxy: CuttingProxy, cloud: cs.Eucalyptus) -> str:
    """A copy cut by the proxy: its one-line error; what arrived stays for the next attempt."""
    src = cs.parse_source(f"eucalyptus://euca/{node.instance}")
    with pytest.raises(Cut) as e:
        eucalyptus.fetch(src, cloud, dest / "source.raw")
    message = str(e.value)
    assert proxy.cuts >= 1 and "\n" not in message
    assert message.startswith(f"copy of {node.instance} from 127.0.0.1:{proxy.port} was cut after ")
    assert message.endswith("are kept, and imaging resume fetches the rest")
    assert sorted(p.name for p in dest.iterdir()) == [".source.raw.part", ".source.raw.part.json"]
    return message


@pytest.mark.parametrize(("percent", "compress"), [(10, "off"), (50, "off"), (99, "off"), (50, "on")])
def test_eucalyptus_cut_copy_resumes_with_the_rest(
    small_node: Node, dest: Path, percent: int, compress: str
) -> None:
    node = small_node
    size = node.disk.stat().st_size
    whole = sparse.sha256(node.disk, desc=None)
    proxy = CuttingProxy(node.port, cut_after=None)
    try:
        cloud = through(node, proxy, dest.parent, compress=compress)
        src = cs.parse_source(f"eucalyptus://euca/{node.instance}")
        if compress == "on":  # the packed stream's length, cut at a share of that
            eucalyptus.fetch(src, cloud, dest / "source.raw")
            (dest / "source.raw").unlink()
            stream = proxy.sent
        else:
            stream = size
        proxy.cut_after, proxy.sent = stream * percent // 100, 0
        cut_copy(node, dest, proxy, cloud)
        kept = RangeSet(
            [tuple(r) for r in json.loads((dest / ".source.raw.part.json").read_text())["held"]]
        ).prefix()
        assert 0 < kept < size
        proxy.cut_after, proxy.sent = None, 0
        got = eucalyptus.fetch(src, cloud, dest / "source.raw")
    finally:
        proxy.close()
    assert got.digest == f"sha256:{whole}" and sparse.sha256(dest / "source.raw", desc=None) == whole
    assert sorted(p.name for p in dest.iterdir()) == ["source.raw"]
    # Only the rest crossed the wire (and the SSH handshakes, the node's sha256 line, and what
    # the cut left in the pipes, unwritten: a few MiB at most).
    assert proxy.sent < stream - stream * percent // 100 + (3 << 20), (proxy.sent, stream, kept)


def test_eucalyptus_changed_node_file_starts_again_and_a_mismatch_keeps_nothing(
    small_node: Node, dest: Path
) -> None:
    node = small_node
    size = node.disk.stat().st_size
    proxy = CuttingProxy(node.port, cut_after=size // 2)
    src = cs.parse_source(f"eucalyptus://euca/{node.instance}")
    try:
        cloud = through(node, proxy, dest.parent, compress="off")
        cut_copy(node, dest, proxy, cloud)
        # The node's file changed (its mtime says so): what was kept is not of this file.
        st = node.disk.stat()
        os.utime(node.disk, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        proxy.cut_after, proxy.sent = None, 0
        got = eucalyptus.fetch(src, cloud, dest / "source.raw")
        assert proxy.sent > size and got.digest == "sha256:" + sparse.sha256(node.disk, desc=None)
        (dest / "source.raw").unlink()
        # Kept bytes that are not the node's (a disk error here, say): the whole copy's sha256
        # differs from the node's, and nothing is kept.
        proxy.cut_after = size // 2
        cut_copy(node, dest, proxy, cloud)
        part = dest / ".source.raw.part"
        with open(part, "r+b") as f:
            at = os.lseek(f.fileno(), 0, os.SEEK_DATA)
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0xFF]))
        proxy.cut_after = None
        with pytest.raises(SourceError, match=r"does not match the node's sha256 .*: nothing kept$"):
            eucalyptus.fetch(src, cloud, dest / "source.raw")
    finally:
        proxy.close()
    nothing_left(dest)


# EC2 + EBS direct


@pytest.fixture(scope="module")
def aws(kvm_sample: Path) -> Iterator[tuple[EC2Cloud, str]]:
    with ec2_cloud() as cloud:
        yield cloud, cloud.instance_from_disk(kvm_sample)


def ec2_settings(cloud: EC2Cloud, **extra: Any) -> cs.EC2:
    found = cs.parse_clouds({"aws": cloud.cloud(**extra)}, "test")["aws"]
    assert isinstance(found, cs.EC2)
    return found


def test_ec2_copy_through_a_snapshot_with_throttling_and_cut_blocks(
    aws: tuple[EC2Cloud, str], dest: Path, kvm_sample: Path
) -> None:
    cloud, instance = aws
    before = {s["SnapshotId"] for s in cloud.client("ec2").describe_snapshots()["Snapshots"]}
    # Three throttled block reads (retried by botocore with backoff), two bodies cut half-way
    # (fetched again): the copy is whole all the same.
    cloud.faults(throttle=3, cut=2)
    got = ec2.fetch(cs.parse_source(f"ec2://aws/{instance}"), ec2_settings(cloud), dest / "source.raw")
    counters = cloud.faults()
    assert (counters["throttled"], counters["was_cut"], counters["throttle"], counters["cut"]) == (
        3,
        2,
        0,
        0,
    )
    assert same_content(kvm_sample, dest / "source.raw")
    assert got.size_bytes == 1 << 30 and got.verified.endswith("each against its SHA256 from EBS")
    assert sparse.allocated_bytes(dest / "source.raw") <= got.data_bytes + (
        1 << 20
    )  # unlisted blocks: holes
    # The snapshot made for the copy is gone again.
    assert {s["SnapshotId"] for s in cloud.client("ec2").describe_snapshots()["Snapshots"]} == before


def test_ec2_faults_are_one_line_errors_that_leave_nothing(aws: tuple[EC2Cloud, str], dest: Path) -> None:
    cloud, instance = aws
    src = cs.parse_source(f"ec2://aws/{instance}")
    with pytest.raises(
        SourceError, match=r"aws: describe instance i-0123456789abcdef0: not found \(InvalidInstanceID"
    ):
        ec2.fetch(cs.parse_source("ec2://aws/i-0123456789abcdef0"), ec2_settings(cloud), dest / "source.raw")
    with pytest.raises(
        ImagingError, match=r"aws: describe instance i-.*: the cloud refused the credentials \(AuthFailure"
    ):
        ec2.fetch(src, ec2_settings(cloud, secret_access_key="wrong-secret"), dest / "source.raw")
    nothing_left(dest)


def snapshots(cloud: EC2Cloud, instance: str) -> set[str]:
    """The snapshots made to copy ``instance`` (by their tag: moto lists its AMIs' hundreds too,
    slowly)."""
    tagged = [{"Name": "tag:imaging:source", "Values": [instance]}]
    return {s["SnapshotId"] for s in cloud.client("ec2").describe_snapshots(Filters=tagged)["Snapshots"]}


def cut_ec2_copy(cloud: EC2Cloud, src: cs.CloudSource, dest: Path, after: int) -> str:
    """A copy cut after ``after`` blocks (every read after them cut, every time): the blocks that
    arrived and the snapshot are kept; returns the snapshot."""
    cloud.faults(fail_after=after, served=0)
    try:
        with pytest.raises(SourceError) as e:
            ec2.fetch(src, ec2_settings(cloud), dest / "source.raw")
    finally:
        served = cloud.faults(fail_after=-1)["served"]
    message = str(e.value)
    assert re.fullmatch(r"aws: block [0-9]+ of (snap-\S+): read failed .* after 5 attempts; the blocks that arrived "
                        r"and snapshot \1 are kept for the resume", message), message  # fmt: skip
    assert served == after
    return json.loads((dest / "source.snapshot.json").read_text())["snapshot"]


@pytest.fixture(scope="module")
def small(aws: tuple[EC2Cloud, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[EC2Cloud, str, Path]:
    """An instance whose disk holds 40 blocks of data no two alike, between holes: small enough
    that cutting and resuming its copy three times takes seconds on moto."""
    disk = tmp_path_factory.mktemp("small") / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
        for i in range(40):
            f.seek(i * (1 << 20) + (i % 2) * (512 << 10))
            f.write(os.urandom(512 << 10))
    return aws[0], aws[0].instance_from_disk(disk), disk


def test_ec2_copy_cut_and_resumed(small: tuple[EC2Cloud, str, Path], dest: Path) -> None:
    """Cut after 10 %, 50 % and 99 % of the blocks: the resume reads the same snapshot's other
    blocks only, and the copy is the disk, byte for byte; the snapshot goes after it."""
    cloud, instance, disk = small
    src = cs.parse_source(f"ec2://aws/{instance}")
    before = snapshots(cloud, instance)
    for fraction in (0.10, 0.50, 0.99):
        total = _blocks_of(cloud, instance)
        kept = cut_ec2_copy(cloud, src, dest, after=int(fraction * total))
        assert snapshots(cloud, instance) - before == {kept}
        cloud.faults(served=0)
        got = ec2.fetch(src, ec2_settings(cloud), dest / "source.raw")
        assert cloud.faults()["served"] == total - int(fraction * total)  # only the rest was read
        assert got.snapshot == kept and same_content(disk, dest / "source.raw")
        assert snapshots(cloud, instance) == before  # the kept snapshot went after the copy
        assert sorted(p.name for p in dest.iterdir()) == ["source.raw"]
        (dest / "source.raw").unlink()


def test_ec2_changed_snapshot_or_bad_checksums_after_a_cut(
    small: tuple[EC2Cloud, str, Path], dest: Path
) -> None:
    cloud, instance, disk = small
    src = cs.parse_source(f"ec2://aws/{instance}")
    before = snapshots(cloud, instance)
    total = _blocks_of(cloud, instance)
    # The kept snapshot was deleted meanwhile: a new one, every block read again.
    cloud.client("ec2").delete_snapshot(SnapshotId=cut_ec2_copy(cloud, src, dest, after=total // 2))
    cloud.faults(served=0)
    ec2.fetch(src, ec2_settings(cloud), dest / "source.raw")
    assert cloud.faults()["served"] == total and same_content(disk, dest / "source.raw")
    (dest / "source.raw").unlink()
    # Blocks whose checksum never matches: nothing is kept, the snapshot neither.
    cut_ec2_copy(cloud, src, dest, after=total // 2)
    cloud.faults(corrupt=1000)
    try:
        with pytest.raises(
            ImagingError, match=r"block [0-9]+ of snap-\S+: checksum does not match its data after 5"
        ):
            ec2.fetch(src, ec2_settings(cloud), dest / "source.raw")
    finally:
        cloud.faults(corrupt=0)
    nothing_left(dest)
    assert snapshots(cloud, instance) == before


def _blocks_of(cloud: EC2Cloud, instance: str) -> int:
    """How many blocks the instance's volume has in EBS (those a copy reads)."""
    ec2c, ebs = cloud.client("ec2"), cloud.client("ebs")
    found = ec2c.describe_instances(InstanceIds=[instance])["Reservations"][0]["Instances"][0]
    volume = found["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    parent = ec2c.describe_volumes(VolumeIds=[volume])["Volumes"][0]["SnapshotId"]
    blocks, token = 0, dict[str, str]()
    while True:
        page = ebs.list_snapshot_blocks(SnapshotId=parent, **token)
        blocks += len(page["Blocks"])
        if not page.get("NextToken"):
            return blocks
        token = {"NextToken": page["NextToken"]}


def test_ec2_snapshot_that_never_completes(aws: tuple[EC2Cloud, str], dest: Path, kvm_sample: Path) -> None:
    cloud, _ = aws
    stuck = cloud.instance_from_disk(kvm_sample, tags={"imaging-test": "never-completes"})
    with pytest.raises(
        ImagingError,
        match=r"aws: snapshot snap-\S+ of volume vol-\S+ did not complete within 1 s \(still pending",
    ):
        ec2.fetch(
            cs.parse_source(f"ec2://aws/{stuck}"),
            ec2_settings(cloud, snapshot_timeout=1),
            dest / "source.raw",
        )
    nothing_left(dest)
    pending = [s for s in cloud.client("ec2").describe_snapshots()["Snapshots"] if s["State"] == "pending"]
    assert pending == []  # the stuck snapshot was deleted, not left behind


def test_ec2_publish_with_launch_permissions_and_back(aws: tuple[EC2Cloud, str], dest: Path, tmp_path: Path,
                                                     kvm_sample: Path) -> None:  # fmt: skip
    cloud, _ = aws
    settings = ec2_settings(cloud, accounts={"bob": "111122223333", "carol": "444455556666"})
    client = cloud.client("ec2")
    disk = tmp_path / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(kvm_sample), str(disk)], check=True)
    for vis, shared, expected, firmware in [
        ("public", [], [{"Group": "all"}], "bios"), ("private", [], [], "uefi"),
        ("selected", ["bob", "carol"], [{"UserId": "111122223333"}, {"UserId": "444455556666"}], "hybrid"),
    ]:  # fmt: skip
        reg = ec2.publish(settings, "aws", disk, f"Debian (test) {vis}", "run-1", vis, shared, firmware)
        image = client.describe_images(ImageIds=[reg.image_id])["Images"][0]
        assert image["Name"] == f"Debian (test) {vis} run-1" and image["State"] == "available"
        # The disk's firmware as the image's boot mode (a hybrid disk: UEFI where the type has it).
        boot_mode = {"bios": "legacy-bios", "uefi": "uefi", "hybrid": "uefi-preferred"}[firmware]
        assert image["BootMode"] == reg.boot_mode == boot_mode
        assert image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"] == reg.snapshot_id
        perms = client.describe_image_attribute(ImageId=reg.image_id, Attribute="launchPermission")
        assert sorted(perms["LaunchPermissions"], key=str) == sorted(expected, key=str), vis
        assert (
            client.describe_snapshots(SnapshotIds=[reg.snapshot_id])["Snapshots"][0]["State"] == "completed"
        )
    # What was published reads back as the disk it was made of: an instance of it, copied out.
    run = client.run_instances(ImageId=reg.image_id, MinCount=1, MaxCount=1,
                               BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": reg.snapshot_id}}])  # fmt: skip
    back = ec2.fetch(
        cs.parse_source(f"ec2://aws/{run['Instances'][0]['InstanceId']}"), settings, dest / "back.raw"
    )
    assert same_content(kvm_sample, Path(back.path))
    with pytest.raises(
        ParameterError, match=r"aws: no account id for dave \(add them under clouds.aws.accounts\)"
    ):
        ec2.publish(settings, "aws", disk, "x", "run-1", "selected", ["dave"])


# OpenStack: Nova (stub) and Glance (real)


@pytest.fixture(scope="module")
def nova(
    glance: Glance, kvm_sample: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[NovaStub, str]]:
    qcow2 = tmp_path_factory.mktemp("nova") / "server.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(kvm_sample), str(qcow2)], check=True)
    with NovaStub(glance.url) as stub:
        yield stub, stub.add(qcow2)


def os_settings(nova: NovaStub, glance: Glance, **extra: Any) -> cs.OpenStack:
    found = cs.parse_clouds({"os": openstack_cloud(nova, glance, **extra)}, "test")["os"]
    assert isinstance(found, cs.OpenStack)
    return found


def test_openstack_snapshot_downloaded_and_removed(
    nova: tuple[NovaStub, str], glance: Glance, dest: Path
) -> None:
    stub, server = nova
    before = {i["id"] for i in glance.images()}
    got = openstack.fetch(cs.parse_source(f"openstack://os/{server}"), os_settings(stub, glance), dest)
    assert got.format == "qcow2" and got.verified == "size, MD5 and sha512 from Glance"
    assert Path(got.path).stat().st_size == got.size_bytes and Path(got.path).name == "source.qcow2"
    assert f"POST /v2.1/servers/{server}/action" in stub.calls
    assert {i["id"] for i in glance.images()} == before  # the snapshot image went after the copy


def test_openstack_faults(nova: tuple[NovaStub, str], glance: Glance, dest: Path, kvm_sample: Path) -> None:
    stub, server = nova
    with pytest.raises(SourceError, match=r"os: server 00000000-0000-0000-0000-000000000000: not found"):
        openstack.fetch(cs.parse_source("openstack://os/00000000-0000-0000-0000-000000000000"),
                        os_settings(stub, glance), dest)  # fmt: skip
    stuck = stub.add(kvm_sample, "raw", never_active=True)
    before = {i["id"] for i in glance.images()}
    with pytest.raises(
        ImagingError, match=r"os: image \S+ of server \S+ did not become active within 1 s \(still queued\)"
    ):
        openstack.fetch(
            cs.parse_source(f"openstack://os/{stuck}"), os_settings(stub, glance, image_timeout=1), dest
        )
    assert {i["id"] for i in glance.images()} == before  # the stuck snapshot image was deleted
    nothing_left(dest)


def glance_through(stub: NovaStub, glance: Glance, proxy: CuttingProxy) -> cs.OpenStack:
    settings = openstack_cloud(stub, glance)
    settings["image_endpoint"] = f"http://127.0.0.1:{proxy.port}"
    cloud = cs.parse_clouds({"os": settings}, "test")["os"]
    assert isinstance(cloud, cs.OpenStack)
    return cloud


def test_openstack_download_cut_and_resumed(nova: tuple[NovaStub, str], glance: Glance, dest: Path) -> None:
    """Cut at 10 %, 50 % and 99 %: the cut keeps what arrived and the snapshot image; the resume
    asks Glance for the rest only, and the copy is the server's disk, byte for byte."""
    stub, server = nova
    disk = stub.servers[server].disk
    size = disk.stat().st_size
    src = cs.parse_source(f"openstack://os/{server}")
    before = {i["id"] for i in glance.images()}
    port = int(glance.url.rsplit(":", 1)[1])
    for fraction in (0.10, 0.50, 0.99):
        cutting = CuttingProxy(port, cut_after=int(size * fraction))
        try:
            with pytest.raises(SourceError) as e:
                openstack.fetch(src, glance_through(stub, glance, cutting), dest)
        finally:
            cutting.close()
        message = str(e.value)
        assert re.fullmatch(r"os: download of image (\S+) (cut|ended) after [0-9,]+ of [0-9,]+ bytes.*: what arrived "
                            r"is kept for the next attempt; its snapshot image \1 is kept for the resume", message), message  # fmt: skip
        kept = {i["id"] for i in glance.images()} - before
        assert len(kept) == 1 and (dest / "source.snapshot.json").exists()
        counting = CuttingProxy(port, None)
        try:
            got = openstack.fetch(src, glance_through(stub, glance, counting), dest)
        finally:
            counting.close()
        # Only the rest came again: what the cut copy received, less the piece it was still
        # reading (up to a 1 MiB chunk) and the headers, was not asked for twice.
        rest = size - int(size * fraction)
        assert rest <= counting.sent <= rest + (1 << 20) + (64 << 10), (
            fraction,
            counting.sent,
            rest,
        )
        assert got.snapshot in kept and got.verified == "size, MD5 and sha512 from Glance"
        assert got.digest == "sha512:" + hashlib.sha512(disk.read_bytes()).hexdigest()
        assert _sha256_prefix(Path(got.path), size) == _sha256_prefix(disk, size)
        assert sorted(p.name for p in dest.iterdir()) == ["source.qcow2"]
        assert {i["id"] for i in glance.images()} == before  # the kept snapshot went after the copy
        Path(got.path).unlink()


def test_openstack_changed_or_corrupt_image_after_a_cut(
    nova: tuple[NovaStub, str], glance: Glance, dest: Path
) -> None:
    stub, server = nova
    size = stub.servers[server].disk.stat().st_size
    src = cs.parse_source(f"openstack://os/{server}")
    port = int(glance.url.rsplit(":", 1)[1])

    def cut_copy() -> str:
        cutting = CuttingProxy(port, cut_after=size // 2)
        try:
            with pytest.raises(SourceError, match="kept for the resume"):
                openstack.fetch(src, glance_through(stub, glance, cutting), dest)
        finally:
            cutting.close()
        return json.loads((dest / "source.snapshot.json").read_text())["snapshot"]

    # The kept snapshot image is gone from Glance: a new snapshot, copied from byte 0.
    httpx.delete(f"{glance.url}/v2/images/{cut_copy()}").raise_for_status()
    counting = CuttingProxy(port, None)
    try:
        got = openstack.fetch(src, glance_through(stub, glance, counting), dest)
    finally:
        counting.close()
    assert size <= counting.sent <= size + (64 << 10)
    Path(got.path).unlink()
    # The kept image's data changed in Glance's store after the cut (beyond what arrived): the
    # whole file does not match Glance's MD5, and nothing is kept, the snapshot image neither.
    image_id = cut_copy()
    stored = glance.root / "images" / image_id
    with open(stored, "r+b") as f:
        f.seek(size - 4096)
        f.write(b"x" * 4096)
    with pytest.raises(
        SourceError, match=rf"os: download of image {image_id} does not match its MD5: nothing kept"
    ):
        openstack.fetch(src, os_settings(stub, glance), dest)
    nothing_left(dest)
    assert image_id not in {i["id"] for i in glance.images()}


def test_glance_publish_visibility_and_members(nova: tuple[NovaStub, str], glance: Glance, tmp_path: Path,
                                               kvm_sample: Path) -> None:  # fmt: skip
    stub, _ = nova
    cloud = os_settings(stub, glance, projects={"bob": "proj-bob", "carol": "proj-carol"})
    qcow2 = tmp_path / "image.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(kvm_sample), str(qcow2)], check=True)
    digest = hashlib.md5(qcow2.read_bytes(), usedforsecurity=False).hexdigest()
    for vis, shared, visibility, members, firmware in [
        ("public", [], "public", [], "bios"), ("private", [], "private", [], "uefi"),
        ("selected", ["bob", "carol"], "shared", ["proj-bob", "proj-carol"], "hybrid"),
    ]:  # fmt: skip
        up = openstack.publish(
            cloud, "os", qcow2, "qcow2", f"Débian image «{vis}»", "run-1", vis, shared, firmware
        )
        image = httpx.get(f"{glance.url}/v2/images/{up.image_id}").json()
        # Nova boots a UEFI-only disk with UEFI on q35 when the image asks; BIOS boots the others.
        asked = {k: image[k] for k in ("hw_firmware_type", "hw_machine_type") if k in image}
        assert asked == up.properties == ({"hw_firmware_type": "uefi", "hw_machine_type": "q35"}
                                          if firmware == "uefi" else {})  # fmt: skip
        assert (image["name"], image["visibility"], image["status"]) == (
            f"Débian image «{vis}»",
            visibility,
            "active",
        )
        assert (image["disk_format"], image["container_format"], image["checksum"]) == (
            "qcow2",
            "bare",
            digest,
        )
        listed = httpx.get(f"{glance.url}/v2/images/{up.image_id}/members")
        if visibility == "shared":
            assert sorted(m["member_id"] for m in listed.json()["members"]) == members == up.members
        else:  # Glance: "Only shared images have members"
            assert listed.status_code == 403 and up.members == []
    with pytest.raises(ParameterError, match=r"os: no project id for dave"):
        openstack.publish(cloud, "os", qcow2, "qcow2", "x", "run-1", "selected", ["dave"])


def test_cloud_settings_refuse_what_is_wrong(tmp_path: Path) -> None:
    for data, message in [
        ({"aws": {"kind": "gce"}}, "does not match any of the expected tags"),
        ({"Bad Name": {"kind": "ec2"}}, "cloud name 'Bad Name'"),
        ({"aws": {"kind": "ec2", "accounts": {"bob": "12"}}}, "user bob: '12' is not a 12-digit account id"),
        ({"n": {"kind": "eucalyptus", "nodes": ["a;b"], "key_file": "/k", "known_hosts": "/h"}}, "is not host or host:port"),
        ({"n": {"kind": "eucalyptus", "nodes": ["a"], "key_file": "/k", "known_hosts": "/h", "instances_dir": "x/../y"}},
         "must be a plain absolute path"),
    ]:  # fmt: skip
        with pytest.raises(ParameterError, match=message):
            cs.parse_clouds(data, "test")
    with pytest.raises(ParameterError, match="secret"):
        # A message never quotes a secret: the wrong field is named, its value is not.
        try:
            cs.parse_clouds({"aws": {"kind": "ec2", "secret_access_key": ["the-secret"]}}, "test")
        except ParameterError as e:
            assert "the-secret" not in str(e)
            raise ParameterError(f"secret field refused: {e}") from None
    assert shutil.which("sshd", path=os.environ["PATH"] + ":/usr/sbin") is not None
