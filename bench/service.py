"""Requests per hour on this machine: the request service with one worker, then two, each a host
of its own (its own state and runs directories) sharing only PostgreSQL (on loopback) and the
record store (moto's S3 on loopback), as ``tests/integration/test_hosts.py`` sets them up.

Each measurement queues REQUESTS export requests of the sample (qcow2, boot check included),
approved at once, and times them from the approval to the last completion; every run's record
goes to the store as it is made. The workers run one request at a time each. The baseline is the
same exports run by the CLI itself, one after the other, with no service, database or record
store: what the service costs per request is the difference.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import WORK  # noqa: E402
from imaging.service import postgres  # noqa: E402
from imaging.service.store import Actor, Store  # noqa: E402

REQUESTS = 4
KEY, SECRET = "AKIABENCH", "bench-secret"


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)


def measure(workers: int, root: Path, database: str, s3: str) -> float:
    """Seconds for REQUESTS requests on ``workers`` hosts."""
    conf = {"database_url": database, "secret_key": "bench-signing-key-" + "x" * 30,
            "instances": {"i-sample": "sample:kvm"},
            "records": {"endpoint_url": s3, "bucket": "records", "access_key_id": KEY, "secret_access_key": SECRET},
            "worker": {"embedded": False, "poll_seconds": 1}}  # fmt: skip
    store = Store(database)
    owner = Actor("bench", "user", store.users(["bench"])[0].id)
    admin = Actor("root", "admin", store.users(["root"])[0].id)
    ids = [store.create(owner, instance="i-sample", name=f"bench {workers}-{i}", kind="export", vis=None,
                        shared_with=[], disk_format="qcow2", target="kvm", options={}).id
           for i in range(REQUESTS)]  # fmt: skip
    procs = []
    for n in range(workers):
        home = root / f"w{workers}-{n}"
        home.mkdir()
        (home / "service.yaml").write_text(yaml.safe_dump(conf))
        env = {**os.environ, "IMAGING_STATE": str(home / "state"), "IMAGING_RUNS": str(home / "runs"),
               "IMAGING_PROGRESS": "0"}  # fmt: skip
        log = open(home / "worker.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([sys.executable, "-m", "imaging", "worker", "--config", str(home / "service.yaml")],
                                      stdout=log, stderr=log, env=env))  # fmt: skip
    _wait("the workers", lambda: all(b"started" in (root / f"w{workers}-{n}" / "worker.log").read_bytes()
                                     for n in range(workers)), 120)  # fmt: skip
    t0 = time.monotonic()
    for rid in ids:
        store.transition(rid, "approve", admin)
    _wait("the requests", lambda: all(store.get(r).state in ("completed", "error") for r in ids), 3600)
    seconds = time.monotonic() - t0
    failed = [r for r in ids if store.get(r).state != "completed"]
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=150)
    store.close()
    if failed:
        raise SystemExit(f"requests failed: {failed} (see {root}/*/worker.log)")
    return seconds


def plain(root: Path) -> float:
    """Seconds for REQUESTS exports by the CLI, one after the other."""
    env = {**os.environ, "IMAGING_RUNS": str(root / "plain-runs"), "IMAGING_PROGRESS": "0"}
    t0 = time.monotonic()
    for i in range(REQUESTS):
        subprocess.run([sys.executable, "-m", "imaging", "export", "sample:kvm", "--name", f"plain {i}",
                        "--format", "qcow2", "--target", "kvm", "--run", f"plain-{i}"],
                       check=True, capture_output=True, env=env)  # fmt: skip
    return time.monotonic() - t0


def main() -> list[tuple[str, str, str]]:
    WORK.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(dir=WORK, prefix="service-"))
    cluster = postgres.Cluster(root / "postgres", durable=False, tcp_port=_port())
    cluster.start()
    port = _port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    s3 = f"http://127.0.0.1:{port}"
    try:
        import boto3

        time.sleep(3)
        boto3.client("s3", endpoint_url=s3, region_name="us-east-1", aws_access_key_id=KEY,
                     aws_secret_access_key=SECRET).create_bucket(Bucket="records")  # fmt: skip
        env = {**os.environ, "IMAGING_STATE": str(root / "state"), "IMAGING_DATABASE_URL": cluster.url}
        for argv in (["db", "upgrade"], ["users", "add", "bench"], ["users", "add", "root", "--admin"]):
            subprocess.run(
                [sys.executable, "-m", "imaging", *argv], check=True, capture_output=True, env=env
            )
        base = plain(root)
        one = measure(1, root, cluster.url, s3)
        two = measure(2, root, cluster.url, s3)
    finally:
        moto.terminate()
        moto.wait()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    per_hour = {n: REQUESTS * 3600 / t for n, t in ((0, base), (1, one), (2, two))}
    return [
        (f"the CLI: {REQUESTS} exports of sample:kvm (qcow2, booted), one after the other",
         f"{per_hour[0]:.0f} exports/h", f"{base:.0f} s for {REQUESTS}; {base / REQUESTS:.0f} s each: the baseline"),
        (f"service, 1 worker ({REQUESTS} export requests of sample:kvm)", f"{per_hour[1]:.0f} requests/h",
         f"{one:.0f} s for {REQUESTS}; {one / REQUESTS:.0f} s each; {per_hour[1] / per_hour[0]:.2f}x the CLI's rate"),
        (f"service, 2 workers on 2 hosts ({REQUESTS} requests)", f"{per_hour[2]:.0f} requests/h",
         f"{two:.0f} s for {REQUESTS}; {per_hour[2] / per_hour[1]:.2f}x one worker, on the same 2 cores"),
    ]  # fmt: skip


if __name__ == "__main__":
    for row in main():
        print("| " + " | ".join(row) + " |", flush=True)
