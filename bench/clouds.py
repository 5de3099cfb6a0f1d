"""Copying an instance's disk out of the test clouds: ours against the plain tools.

node   ``eucalyptus.fetch`` (SFTP with paramiko's prefetch, written sparse, hashed, the node's
       sha256 compared; and with ``compress``: gzip -1 on the node) against OpenSSH's ``scp`` of
       the same file from the same sshd, and a bare paramiko SFTP get
ebs    ``ec2.fetch`` (snapshot, blocks fetched 8 at a time, each checked) against the same with one
       block at a time, as a plain boto3 loop would

The disk is a 2 GiB ext3 holding ~1 GiB of files shaped like an OS root (bench/common.py), on the
node and in moto's EBS; page cache warm.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import WORK, ext3_with_files, timed  # noqa: E402
from imaging.clouds import ec2, eucalyptus  # noqa: E402
from imaging.clouds import settings as cs  # noqa: E402
from tests.integration.cloudkit import ec2_cloud, eucalyptus_node  # noqa: E402

GIB = 1 << 30


def _sftp(node: object, cloud: cs.Eucalyptus, path: str, dest: Path) -> None:
    client = eucalyptus.connect(cloud, cloud.nodes[0])
    try:
        with client.open_sftp() as sftp:
            sftp.get(path, str(dest))
    finally:
        client.close()


def main() -> list[tuple[str, str, str]]:
    WORK.mkdir(parents=True, exist_ok=True)
    disk = ext3_with_files(WORK / "files-1g.img", "2G", GIB)
    rows = []
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        root = Path(tmp)
        with eucalyptus_node(root / "node", disk) as node:
            cloud = cs.parse_clouds({"euca": node.cloud()}, "bench")["euca"]
            assert isinstance(cloud, cs.Eucalyptus)
            src = cs.parse_source(f"eucalyptus://euca/{node.instance}")
            ours = timed(lambda: eucalyptus.fetch(src, cloud, root / "ours.raw"), repeat=3)
            packed = cs.parse_clouds({"euca": node.cloud(compress=True)}, "bench")["euca"]
            assert isinstance(packed, cs.Eucalyptus)
            gz = timed(lambda: eucalyptus.fetch(src, packed, root / "gz.raw"), repeat=1)
            scp = ["scp", "-q", "-P", str(node.port), "-i", str(node.key_file), "-o", f"UserKnownHostsFile={node.known_hosts}",
                   "-o", "StrictHostKeyChecking=yes", f"root@127.0.0.1:{node.disk}", str(root / "scp.raw")]  # fmt: skip
            plain = timed(lambda: subprocess.run(scp, check=True), repeat=3)
            sftp = timed(lambda: _sftp(node, cloud, str(node.disk), root / "sftp.raw"), repeat=3)
            rows.append(("node over SSH: ours (SFTP, sparse, both ends hash)", f"{ours:.2f} s",
                         f"bare paramiko SFTP get {sftp:.2f} s ({ours / sftp:.2f}x); scp {plain:.2f} s "
                         f"({ours / plain:.2f}x); ours with compress (gzip -1 on the node) {gz:.2f} s"))  # fmt: skip
        with ec2_cloud() as aws:
            instance = aws.instance_from_disk(disk)
            src = cs.parse_source(f"ec2://aws/{instance}")
            many = cs.parse_clouds({"aws": aws.cloud(block_workers=8)}, "bench")["aws"]
            one = cs.parse_clouds({"aws": aws.cloud(block_workers=1)}, "bench")["aws"]
            assert isinstance(many, cs.EC2) and isinstance(one, cs.EC2)
            ours = timed(lambda: ec2.fetch(src, many, root / "ebs.raw"), repeat=3)
            serial = timed(lambda: ec2.fetch(src, one, root / "ebs1.raw"), repeat=1)
            rows.append(("EBS direct: ours (8 blocks at a time, each checked)", f"{ours:.2f} s",
                         f"one at a time {serial:.2f} s ({ours / serial:.2f}x); moto on loopback"))  # fmt: skip
    return rows


if __name__ == "__main__":
    for row in main():
        print("| " + " | ".join(row) + " |")
