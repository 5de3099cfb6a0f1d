"""The three test clouds, on loopback only, started by the tests:

- a Eucalyptus node controller: Debian's real OpenSSH server (``sshd``) on a port of its own, with
  its own host key, a user key in authorized_keys, and a node's instances directory holding an
  instance's root disk;
- EC2 + EBS direct: moto's server with what it lacks filled in (``ec2_server.py``);
- OpenStack: Debian's real Glance (``glance-api``) with a SQLite database and a file store and no
  Keystone, and for Nova, which cannot run here, a stub of its two calls (server show, the
  createImage action), written from the published Compute API reference
  (docs.openstack.org/api-ref/compute: "Show Server Details", "Create Image (createImage
  Action)", microversion 2.45 and later: the new image's id in the response body). Like Nova,
  it creates the snapshot image in Glance (queued) and uploads the server's disk to it in the
  background, so the image goes queued -> saving -> active.

Also a TCP proxy that cuts a connection after a number of bytes, for copies cut mid-way.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from imaging import config

from .servicekit import free_port, wait_for

PROJECT = Path(__file__).resolve().parents[2]


def _need(tool: str, package: str) -> str:
    found = shutil.which(tool, path=os.environ["PATH"] + ":/usr/sbin:/sbin")
    assert found, f"the cloud tests need {tool}: apt install {package} (make setup does)"
    return found


# Eucalyptus: a node controller over SSH


@dataclass
class Node:
    port: int
    key_file: Path  # the client's private key, in authorized_keys on the node
    known_hosts: Path  # the node's real host key, as an operator would have checked it
    instances_dir: Path
    disk: Path  # the instance's root disk on the node
    instance: str
    root: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cloud(self, **extra: Any) -> dict[str, Any]:
        return {"kind": "eucalyptus", "nodes": [self.address], "user": "root", "key_file": str(self.key_file),
                "known_hosts": str(self.known_hosts), "instances_dir": str(self.instances_dir), "timeout": 10,
                **extra}  # fmt: skip


def _keygen(path: Path, comment: str) -> None:
    subprocess.run([_need("ssh-keygen", "openssh-client"), "-q", "-t", "ed25519", "-N", "", "-C", comment,
                    "-f", str(path)], check=True)  # fmt: skip


@contextmanager
def eucalyptus_node(root: Path, disk: Path, instance: str = "i-0123abcd") -> Iterator[Node]:
    """sshd on a loopback port, serving a node's instances directory with ``instance``'s disk
    (a sparse copy of ``disk``) at ``<instances>/work/admin/<instance>/root`` (Eucalyptus 3+)."""
    sshd = _need("sshd", "openssh-server")
    root.mkdir(parents=True, exist_ok=True)
    host_key, user_key = root / "ssh_host_ed25519_key", root / "id_ed25519"
    _keygen(host_key, "node")
    _keygen(user_key, "imaging")
    authorized = root / "authorized_keys"
    authorized.write_text(Path(f"{user_key}.pub").read_text())
    instances = root / "instances"
    where = instances / "work" / "admin" / instance
    where.mkdir(parents=True)
    subprocess.run(["cp", "--sparse=always", str(disk), str(where / "root")], check=True)
    (where / "instance.xml").write_text(f"<instance><name>{instance}</name></instance>\n")
    port = free_port()
    config = root / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {authorized}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\n"
    )
    known = root / "known_hosts"
    host_pub = Path(f"{host_key}.pub").read_text().split()
    known.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    log = open(root / "sshd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    try:
        wait_for("sshd", lambda: proc.poll() is not None or _listening(port), 30)
        assert proc.poll() is None, (root / "sshd.log").read_text()
        yield Node(port, user_key, known, instances, where / "root", instance, root)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# EC2 + EBS direct


@dataclass
class EC2Cloud:
    url: str
    access_key_id: str
    secret_access_key: str

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, region_name="us-east-1", endpoint_url=self.url,
                            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key)  # fmt: skip

    def cloud(self, **extra: Any) -> dict[str, Any]:
        return {"kind": "ec2", "endpoint_url": self.url, "ebs_endpoint_url": self.url,
                "access_key_id": self.access_key_id, "secret_access_key": self.secret_access_key,
                "poll_seconds": 0.2, "block_workers": 4, **extra}  # fmt: skip

    def faults(self, **counts: int) -> dict[str, int]:
        return (
            dict(httpx.post(f"{self.url}/_faults", json=counts).json())
            if counts
            else dict(httpx.get(f"{self.url}/_faults").json())
        )

    def instance_from_disk(self, disk: Path, *, tags: dict[str, str] | None = None) -> str:
        """An instance whose root volume holds ``disk``: its blocks written through EBS direct
        into a snapshot, an image registered from it, the instance run from that."""
        import base64
        import hashlib

        ebs, ec2 = self.client("ebs"), self.client("ec2")
        size = disk.stat().st_size
        gib = max(1, -(-size // (1 << 30)))
        snap = ebs.start_snapshot(VolumeSize=gib)["SnapshotId"]
        block = 512 << 10
        written = 0
        with open(disk, "rb") as f:
            fd = f.fileno()
            offset = 0
            while offset < size:
                try:
                    data_at = os.lseek(fd, offset, os.SEEK_DATA)
                except OSError:
                    break
                index = data_at // block
                data = os.pread(fd, block, index * block).ljust(block, b"\0")
                if data.count(0) != block:
                    ebs.put_snapshot_block(SnapshotId=snap, BlockIndex=index, BlockData=data, DataLength=block,
                                           Checksum=base64.b64encode(hashlib.sha256(data).digest()).decode(),
                                           ChecksumAlgorithm="SHA256")  # fmt: skip
                    written += 1
                offset = (index + 1) * block
        ebs.complete_snapshot(SnapshotId=snap, ChangedBlocksCount=written)
        image = ec2.register_image(Name=f"source {snap}", RootDeviceName="/dev/sda1", VirtualizationType="hvm",
                                   BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snap}}])  # fmt: skip
        spec: list[dict[str, Any]] = []
        if tags:
            spec = [{"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
        run = ec2.run_instances(ImageId=image["ImageId"], MinCount=1, MaxCount=1, TagSpecifications=spec,
                                BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snap, "VolumeSize": gib}}])  # fmt: skip
        return str(run["Instances"][0]["InstanceId"])


@contextmanager
def ec2_cloud() -> Iterator[EC2Cloud]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.ec2_server", str(port)], cwd=PROJECT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        key = json.loads(proc.stdout.readline() or "{}")
        assert key, "the EC2 test server did not start"
        yield EC2Cloud(f"http://127.0.0.1:{port}", key["access_key_id"], key["secret_access_key"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# OpenStack: the real Glance, and a Nova stub


@dataclass
class Glance:
    url: str
    root: Path
    seconds: float  # how long it took to start (database made, server answering)

    def images(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/v2/images", params={"limit": 1000}).json()["images"])


_GLANCE_CONF = """[DEFAULT]
bind_host = 127.0.0.1
bind_port = {port}
workers = 0
log_file = {root}/glance-api.log
use_stderr = false
enabled_backends = local:file
[database]
connection = sqlite:///{root}/glance.db
[glance_store]
default_backend = local
[local]
filesystem_store_datadir = {root}/images
[os_glance_staging_store]
filesystem_store_datadir = {root}/staging
[os_glance_tasks_store]
filesystem_store_datadir = {root}/tasks
[paste_deploy]
# No flavor: the pipeline with the unauthenticated context, no Keystone.
flavor =
config_file = /etc/glance/glance-api-paste.ini
[oslo_concurrency]
lock_path = {root}/lock
[oslo_policy]
policy_file = {root}/policy.yaml
"""
# Making an image public takes role:admin; without Keystone every request is one unauthenticated
# context without roles, so nobody could. The service publishes as an admin of its cloud: here
# that is anyone ("@": always allowed).
_GLANCE_POLICY = 'publicize_image: "@"\n'


@contextmanager
def glance_server(root: Path) -> Iterator[Glance]:
    api, manage = _need("glance-api", "glance-api"), _need("glance-manage", "glance-api")
    t0 = time.monotonic()
    for d in ("images", "staging", "tasks", "lock"):
        (root / d).mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = root / "glance-api.conf"
    conf.write_text(_GLANCE_CONF.format(port=port, root=root))
    (root / "policy.yaml").write_text(_GLANCE_POLICY)
    # An empty database made by db_sync is kept per Glance version: making it is most of the
    # start-up (7-15 s here); the copy is as db_sync left it.
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "glance-api"], capture_output=True,
                             text=True).stdout.strip() or "unknown"  # fmt: skip
    cached = config.cache_dir() / f"glance-{version.replace(':', '_')}.db"
    if not cached.exists():
        subprocess.run(
            [manage, "--config-file", str(conf), "db_sync"], check=True, capture_output=True, timeout=300
        )
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "glance.db", cached.with_suffix(".part"))
        os.replace(cached.with_suffix(".part"), cached)
    else:
        shutil.copyfile(cached, root / "glance.db")
    log = open(root / "glance-api.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [api, "--config-file", str(conf)], stdout=log, stderr=log, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("glance-api", lambda: proc.poll() is not None or _answers(url), 120)
        assert proc.poll() is None, (root / "glance-api.out").read_text()[-3000:]
        yield Glance(url, root, round(time.monotonic() - t0, 2))
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/", timeout=2).status_code in (200, 300)
    except httpx.HTTPError:
        return False


@dataclass
class Server:
    id: str
    disk: Path
    disk_format: str  # what its snapshot is in Glance (qcow2 for a qcow2-backed instance)
    never_active: bool = False  # the snapshot is made but never uploaded (stays queued)


class NovaStub:
    """Nova's server show and createImage action, on loopback, in front of the real Glance."""

    def __init__(self, glance_url: str) -> None:
        self.glance = glance_url
        self.servers: dict[str, Server] = {}
        self.calls: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("OpenStack-API-Version", "compute 2.90")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                stub.calls.append(f"GET {self.path}")
                path = self.path.split("?")[0].rstrip("/")
                if path in ("", "/v2.1"):
                    version = stub.version()
                    self._send(
                        200 if path else 300, {"version": version} if path else {"versions": [version]}
                    )
                elif path.startswith("/v2.1/servers/"):
                    server = stub.servers.get(path.removeprefix("/v2.1/servers/"))
                    if server is None:
                        self._send(
                            404, {"itemNotFound": {"code": 404, "message": "Instance could not be found."}}
                        )
                    else:
                        self._send(200, {"server": stub.show(server)})
                else:
                    self._send(404, {"itemNotFound": {"code": 404, "message": "Not found"}})

            def do_POST(self) -> None:  # noqa: N802
                stub.calls.append(f"POST {self.path}")
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) == 4 and parts[:2] == ["v2.1", "servers"] and parts[3] == "action":
                    server = stub.servers.get(parts[2])
                    if server is None:
                        self._send(
                            404, {"itemNotFound": {"code": 404, "message": "Instance could not be found."}}
                        )
                    elif "createImage" in body:
                        image_id = stub.create_image(server, body["createImage"])
                        self._send(
                            202, {"image_id": image_id}, {"Location": f"{stub.glance}/v2/images/{image_id}"}
                        )
                    else:
                        self._send(400, {"badRequest": {"code": 400, "message": "unknown action"}})
                else:
                    self._send(404, {"itemNotFound": {"code": 404, "message": "Not found"}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v2.1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def version(self) -> dict[str, Any]:
        return {"id": "v2.1", "status": "CURRENT", "version": "2.90", "min_version": "2.1",
                "updated": "2013-07-23T11:33:21Z", "links": [{"rel": "self", "href": self.url + "/"}]}  # fmt: skip

    def show(self, server: Server) -> dict[str, Any]:
        return {"id": server.id, "name": f"server {server.id[:8]}", "status": "ACTIVE", "tenant_id": "demo",
                "user_id": "demo", "created": "2026-01-01T00:00:00Z", "updated": "2026-01-01T00:00:00Z",
                "addresses": {}, "metadata": {}, "links": [], "OS-EXT-STS:vm_state": "active",
                "flavor": {"vcpus": 1, "ram": 512, "disk": 1, "original_name": "m1.tiny"}, "image": ""}  # fmt: skip

    def add(self, disk: Path, disk_format: str = "qcow2", *, never_active: bool = False) -> str:
        server = Server(str(uuid.uuid4()), disk, disk_format, never_active)
        self.servers[server.id] = server
        return server.id

    def create_image(self, server: Server, action: dict[str, Any]) -> str:
        """As Nova does: the image record at once, its data uploaded in the background."""
        meta = {str(k): str(v) for k, v in (action.get("metadata") or {}).items() if ":" not in str(k)}
        created = httpx.post(f"{self.glance}/v2/images", json={
            "name": action["name"], "disk_format": server.disk_format, "container_format": "bare",
            "visibility": "private", "image_type": "snapshot", "instance_uuid": server.id, **meta})  # fmt: skip
        created.raise_for_status()
        image_id = str(created.json()["id"])
        if not server.never_active:
            threading.Thread(target=self._upload, args=(image_id, server.disk), daemon=True).start()
        return image_id

    def _upload(self, image_id: str, disk: Path) -> None:
        time.sleep(0.5)  # Nova snapshots the disk first; the image waits in queued meanwhile
        with open(disk, "rb") as f:
            httpx.put(f"{self.glance}/v2/images/{image_id}/file", content=f,
                      headers={"Content-Type": "application/octet-stream"}, timeout=300)  # fmt: skip

    def __enter__(self) -> NovaStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def openstack_cloud(nova: NovaStub, glance: Glance, **extra: Any) -> dict[str, Any]:
    return {"kind": "openstack", "auth_type": "none", "compute_endpoint": nova.url,
            "image_endpoint": glance.url, "poll_seconds": 0.3, **extra}  # fmt: skip


# A connection cut mid-copy


class CuttingProxy:
    """Forwards TCP connections on loopback to ``port``; each connection is cut (both ways closed)
    once the server has sent ``cut_after`` bytes through it (None: never; read as each connection
    starts). ``sent`` counts the bytes the server sent through it, all connections together."""

    def __init__(self, port: int, cut_after: int | None) -> None:
        self.target, self.cut_after = port, cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cuts = 0
        self.sent = 0
        self._count = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, server, None, False), daemon=True).start()
            threading.Thread(
                target=self._pipe, args=(server, client, self.cut_after, True), daemon=True
            ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None, counted: bool) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: limit - sent])
                    self._count_sent(limit - sent, counted)
                    self.cuts += 1
                    break
                dst.sendall(data)
                sent += len(data)
                self._count_sent(len(data), counted)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _count_sent(self, n: int, counted: bool) -> None:
        if counted:
            with self._count:
                self.sent += n

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
