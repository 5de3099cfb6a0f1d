"""Copying an instance's disk out of Glance and EBS direct: ours against the clouds' own clients.

ebs    ``ec2.copy_blocks`` (the snapshot's blocks, as many in flight as the AIMD window allows up to
       ``block_workers``, each checked) against the same one at a time, and against
       ``aws ebs get-snapshot-block`` in a loop (awscli, a process per block: a sample of blocks,
       its rate extrapolated to the whole snapshot)
glance ``openstack.download`` (size, MD5 and multihash checked, written sparse) against
       ``glance image-download`` (python-glanceclient, which checks the multihash), alternating,
       on the same loopback Glance (Debian's glance-api), of the disk as a qcow2 snapshot

Glance and EBS run on the real-files disk (bench/common.real_disk) and on a disk of data that does
not compress; each side runs as its own process: seconds, MB/s, peak RSS, and CPU seconds of the
client and of the server (glance-api or moto) while it ran.
Page cache warm. The node copy over SSH is bench/node_copy.py.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    WORK,
    TreeMemory,
    incompressible_disk,
    load,
    mib,
    real_disk,
    run,
)
from imaging import sparse  # noqa: E402
from imaging.clouds import ec2  # noqa: E402
from imaging.clouds import settings as cs  # noqa: E402
from tests.integration.cloudkit import ec2_cloud, glance_server  # noqa: E402


def main() -> list[tuple[str, str, str]]:
    return api_rows()


# Glance and EBS direct (the clouds' APIs): each side a process of its own, measured alike.


@dataclass
class Side:
    seconds: float
    peak_rss: int
    cpu: float  # the client's user + system seconds
    server_cpu: float  # the server's, while the client ran


def _server(port: int) -> psutil.Process:
    """The process listening on ``port`` on loopback (glance-api, moto's server)."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    raise RuntimeError(f"nothing listens on port {port}")


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def _measure(argv: list[str], server: psutil.Process, env: dict[str, str] | None = None) -> Side:
    before, mine = _cpu(server), _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    # Sampled (PSS, every 50 ms): ru_maxrss would carry this process's own size over the exec.
    memory = TreeMemory(proc.pid)
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    memory.stop()
    if proc.returncode:
        raise RuntimeError(f"{argv[:3]} failed: {err.decode(errors='replace')[-500:]}")
    return Side(seconds, memory.peak_total, _children_cpu() - mine, _cpu(server) - before)


def _children_cpu() -> float:
    """CPU seconds of this process's reaped children: grows by each child's once it is waited for."""
    t = psutil.Process().cpu_times()
    return float(t.children_user + t.children_system)


def _side(argv: list[str], server: psutil.Process, out: Path) -> Side:
    """One measured run, its output (and any partial copy of it) removed after it."""
    try:
        return _measure(argv, server)
    finally:
        for path in (out, sparse.part_path(out), out.with_name(f".{out.name}.part.json")):
            path.unlink(missing_ok=True)


def _median(sides: list[Side]) -> Side:
    mid = sorted(sides, key=lambda s: s.seconds)[len(sides) // 2]
    return Side(mid.seconds, max(s.peak_rss for s in sides), statistics.median(s.cpu for s in sides),
                statistics.median(s.server_cpu for s in sides))  # fmt: skip


def _alternate(repeat: int, *runs: Callable[[], Side]) -> list[Side]:
    """Each run ``repeat`` times, taking turns (so the machine's other load falls on all alike)."""
    results: list[list[Side]] = [[] for _ in runs]
    for _ in range(repeat):
        for got, fn in zip(results, runs, strict=True):
            got.append(fn())
    return [_median(r) for r in results]


def _say(side: Side, size: int) -> str:
    return (f"{side.seconds:.2f} s, {size / side.seconds / 1e6:.0f} MB/s, peak {mib(side.peak_rss)}, "
            f"CPU {side.cpu:.1f} s (server {side.server_cpu:.1f} s)")  # fmt: skip


def _disks(root: Path) -> list[tuple[str, Path]]:
    """The real-files disk and one of data no deflate shrinks (as much data, 1.2 GB in 5 GiB);
    IMAGING_BENCH_QUICK: 64 MB of each, to try the benchmark out."""
    quick = bool(os.environ.get("IMAGING_BENCH_QUICK"))
    data = 64 << 20 if quick else 1200 << 20
    if quick:
        real = WORK / "real-quick.raw"
        if not real.exists():
            run("truncate", "-s", "256M", real)
            sparse.copy_range(
                real_disk(WORK / "real-5g.img"), real, src_offset=1 << 20, length=data, desc=None
            )
    else:
        real = real_disk(WORK / "real-5g.img")
    noise = incompressible_disk(WORK / f"noise-{data >> 20}m.raw", 5 << 30 if not quick else 256 << 20,
                                [(1 << 20, data)])  # fmt: skip
    return [("real files", real), ("incompressible", noise)]


def glance_rows(root: Path, repeat: int = 3) -> list[tuple[str, str, str]]:
    """Ours against ``glance image-download``, alternating, on the same Glance image (qcow2)."""
    glance_cli = Path(sys.executable).with_name("glance")
    rows = []
    with glance_server(root / "glance") as glance:
        server = _server(int(glance.url.rsplit(":", 1)[1]))
        for label, disk in _disks(root):
            image = root / "snapshot.qcow2"
            run("qemu-img", "convert", "-O", "qcow2", disk, image)
            size = image.stat().st_size
            made = httpx.post(f"{glance.url}/v2/images", json={"name": label, "disk_format": "qcow2",
                                                               "container_format": "bare"}).json()  # fmt: skip
            with open(image, "rb") as f:
                httpx.put(f"{glance.url}/v2/images/{made['id']}/file", content=f, timeout=3600,
                          headers={"Content-Type": "application/octet-stream"}).raise_for_status()  # fmt: skip
            image.unlink()
            out = root / "glance.out"
            ours_argv = [sys.executable, __file__, "--glance", glance.url, made["id"], str(out)]
            ref_argv = [str(glance_cli), "--os-image-url", glance.url, "--os-auth-token", "none",
                        "image-download", "--file", str(out), made["id"]]  # fmt: skip

            ours, ref = _alternate(
                repeat, partial(_side, ours_argv, server, out), partial(_side, ref_argv, server, out)
            )
            rows.append((f"Glance download, {label} ({size / 1e9:.2f} GB qcow2): ours (size, MD5, multihash)",
                         _say(ours, size), f"glance image-download {_say(ref, size)}: "
                         f"{ours.seconds / ref.seconds:.2f}x; load {load():.1f}"))  # fmt: skip
            httpx.delete(f"{glance.url}/v2/images/{made['id']}")
    return rows


def _glance_ours(url: str, image_id: str, dest: str) -> None:
    from imaging.clouds import openstack

    cloud = cs.parse_clouds({"os": {"kind": "openstack", "auth_type": "none", "compute_endpoint": url,
                                    "image_endpoint": url}}, "bench")["os"]  # fmt: skip
    assert isinstance(cloud, cs.OpenStack)
    conn = openstack.connect(cloud)
    openstack.download(conn, "bench", conn.image.get_image(image_id), Path(dest))


AWS_LOOP_SAMPLE = 40  # blocks fetched by ``aws ebs get-snapshot-block`` (a process each)


def ebs_rows(root: Path, repeat: int = 3) -> list[tuple[str, str, str]]:
    """Ours (the AIMD window up to block_workers) against one block at a time and against a loop
    of ``aws ebs get-snapshot-block`` over a sample of the blocks."""
    aws_cli = Path(os.environ.get("IMAGING_BENCH_AWS", WORK / "awscli-venv" / "bin" / "aws"))
    rows = []
    with ec2_cloud() as aws:
        server = _server(int(aws.url.rsplit(":", 1)[1]))
        ebs = aws.client("ebs")
        for label, disk in _disks(root):
            instance = aws.instance_from_disk(disk)
            ec2c = aws.client("ec2")
            found = ec2c.describe_instances(InstanceIds=[instance])["Reservations"][0]["Instances"][0]
            volume = found["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
            snapshot = ec2c.describe_volumes(VolumeIds=[volume])["Volumes"][0]["SnapshotId"]
            blocks = ebs.list_snapshot_blocks(SnapshotId=snapshot, MaxResults=10000)["Blocks"]
            size = len(blocks) * (512 << 10)
            out = root / "ebs.out"
            settings = json.dumps(aws.cloud())

            workers = cs.EC2(kind="ec2").block_workers
            argv = [sys.executable, __file__, "--ebs", settings, snapshot, str(out)]
            ours, serial = _alternate(repeat, partial(_side, [*argv, str(workers)], server, out),
                                      partial(_side, [*argv, "1"], server, out))  # fmt: skip
            env = {**os.environ, "AWS_ACCESS_KEY_ID": aws.access_key_id, "AWS_SECRET_ACCESS_KEY": aws.secret_access_key,
                   "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
            sample = blocks[:: max(1, len(blocks) // AWS_LOOP_SAMPLE)][:AWS_LOOP_SAMPLE]
            loop = Side(0.0, 0, 0.0, 0.0)
            for block in sample:
                one = _measure([str(aws_cli), "ebs", "get-snapshot-block", "--endpoint-url", aws.url,
                                "--snapshot-id", snapshot, "--block-index", str(block["BlockIndex"]),
                                "--block-token", block["BlockToken"], str(out)], server, env)  # fmt: skip
                loop = Side(loop.seconds + one.seconds, max(loop.peak_rss, one.peak_rss), loop.cpu + one.cpu,
                            loop.server_cpu + one.server_cpu)  # fmt: skip
            out.unlink(missing_ok=True)
            scale = len(blocks) / len(sample)
            loop = Side(loop.seconds * scale, loop.peak_rss, loop.cpu * scale, loop.server_cpu * scale)
            rows.append((f"EBS direct, {label} ({len(blocks)} blocks): ours (AIMD window up to {workers})",
                         _say(ours, size) + f", {len(blocks) / ours.seconds:.0f} blocks/s",
                         f"one at a time {_say(serial, size)}: {ours.seconds / serial.seconds:.2f}x; "
                         f"aws ebs get-snapshot-block loop ({len(sample)} blocks, scaled) {_say(loop, size)}: "
                         f"{ours.seconds / loop.seconds:.3f}x; load {load():.1f}"))  # fmt: skip
    return rows


def _ebs_ours(settings: str, snapshot: str, dest: str, workers: str) -> None:
    cloud = cs.parse_clouds({"aws": {**json.loads(settings), "block_workers": int(workers)}}, "bench")["aws"]
    assert isinstance(cloud, cs.EC2)
    ec2.copy_blocks(cloud, "bench", snapshot, Path(dest))


def api_rows() -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        return glance_rows(Path(tmp)) + ebs_rows(Path(tmp))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--glance"]:
        _glance_ours(*sys.argv[2:5])
    elif sys.argv[1:2] == ["--ebs"]:
        _ebs_ours(*sys.argv[2:6])
    else:
        for row in main():
            print("| " + " | ".join(row) + " |", flush=True)
