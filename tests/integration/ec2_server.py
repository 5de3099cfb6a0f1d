"""The EC2 + EBS direct test cloud: moto's server on loopback, with what moto lacks for a real
round trip filled in, and faults a test can ask for.

``python -m tests.integration.ec2_server PORT`` prints one JSON line (the access key it made)
and serves until killed. Where moto 5.2 falls short of AWS (read in its source, moto/ebs and
moto/ec2/models/elastic_block_store.py) and what this adds:

- EBS direct reports 512-byte blocks; AWS's are 512 KiB (524288), which PutSnapshotBlock
  requires. Snapshots here have 512 KiB blocks.
- A snapshot made by EC2 CreateSnapshot has no blocks for EBS direct (moto keeps the two apart):
  here it gets the blocks of the snapshot its volume was created from, as AWS would.
- EC2 calls a snapshot started by EBS StartSnapshot ``completed`` at once; here it is ``pending``
  until CompleteSnapshot, as on AWS.
- RegisterImage ignores its block device mappings, root device and architecture (moto makes a
  new, empty snapshot for every image): here the image refers to the snapshot it was given.
  It ignores BootMode too (every image says ``uefi``, moto's default): here the image keeps the
  boot mode it was registered with, as AWS's DescribeImages shows it.
- moto checks no block checksum (PutSnapshotBlock) and ignores block tokens; the client checks
  what it reads.
- Credentials are checked (moto's IAM authentication, off by default): the key printed at start
  is the only one that works, on the EC2 calls. moto's signature check rejects some correctly
  signed EBS direct calls (CompleteSnapshot: SignatureDoesNotMatch), so EBS calls go unchecked;
  every copy and every publish starts with EC2 calls, which a wrong key fails.

Faults (POST ``/_faults`` with JSON; GET reads the counters back): ``throttle`` N answers the next
N GetSnapshotBlock calls with ThrottlingException (HTTP 400); ``cut`` N sends only half of the
next N block bodies and closes the connection; ``fail_after`` N answers the next N block reads
whole and cuts every one after them (a copy cut at that point; -1 ends it); ``corrupt`` N
changes a byte in each of the next N block bodies (their checksums no longer match); ``served`` counts
the block reads answered whole (set it to 0 to count afresh); a volume tagged ``imaging-test=never-completes``
gets snapshots that stay ``pending`` forever.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

ACCOUNT = "123456789012"
BLOCK = 512 << 10
_faults = {
    "throttle": 0,
    "cut": 0,
    "throttled": 0,
    "was_cut": 0,
    "fail_after": -1,
    "served": 0,
    "corrupt": 0,
}
_lock = threading.Lock()
_BLOCK_GET = re.compile(r"^/snapshots/[^/]+/blocks/[0-9]+$")


def patch_moto() -> None:
    from moto.ebs import models as ebs
    from moto.ec2.models import elastic_block_store as ebsm

    original_init = ebs.EBSSnapshot.__init__

    def init(self: Any, account_id: str, snapshot: Any) -> None:
        original_init(self, account_id, snapshot)
        self.block_size = BLOCK

    ebs.EBSSnapshot.__init__ = init  # type: ignore[method-assign]

    original_create = ebsm.EBSBackend.create_snapshot

    def create_snapshot(self: Any, volume_id: str, description: str, *args: Any, **kwargs: Any) -> Any:
        snapshot = original_create(self, volume_id, description, *args, **kwargs)
        volume = self.get_volume(volume_id)
        tags = {t["key"]: t["value"] for t in self.describe_tags(filters={"resource-id": [volume_id]})}
        if tags.get("imaging-test") == "never-completes":
            snapshot.status = "pending"
        store = ebs.ebs_backends[self.account_id][self.region_name]
        parent = store.snapshots.get(volume.snapshot_id or "")
        if parent is not None:
            copy = ebs.EBSSnapshot(account_id=self.account_id, snapshot=snapshot)
            copy.blocks = dict(parent.blocks)
            copy.status = "completed"
            store.snapshots[snapshot.id] = copy
        return snapshot

    ebsm.EBSBackend.create_snapshot = create_snapshot  # type: ignore[method-assign]

    original_start = ebs.EBSBackend.start_snapshot

    def start_snapshot(self: Any, *args: Any, **kwargs: Any) -> Any:
        snap = original_start(self, *args, **kwargs)
        self.ec2_backend.snapshots[snap.snapshot_id].status = "pending"
        return snap

    original_complete = ebs.EBSBackend.complete_snapshot

    def complete_snapshot(self: Any, snapshot_id: str) -> str:
        status = original_complete(self, snapshot_id)
        self.ec2_backend.snapshots[snapshot_id].status = "completed"
        return status

    from moto.ec2.responses.amis import AmisResponse

    original_register = AmisResponse.register_image

    def register_image(self: Any) -> Any:
        result = original_register(self)
        ami = self.ec2_backend.amis[result.result["ImageId"]] if hasattr(result, "result") else None
        mappings = self._get_param("BlockDeviceMappings") or []
        root = self._get_param("RootDeviceName")
        if ami is not None:
            for m in mappings:
                snap = (m.get("Ebs") or {}).get("SnapshotId")
                if snap and (root is None or m.get("DeviceName") == root):
                    ami.ebs_snapshot = self.ec2_backend.get_snapshot(snap)
            ami.root_device_name = root or ami.root_device_name
            ami.architecture = self._get_param("Architecture") or ami.architecture
            ami.boot_mode = self._get_param("BootMode") or ami.boot_mode
        return result

    AmisResponse.register_image = register_image  # type: ignore[method-assign]
    ebs.EBSBackend.start_snapshot = start_snapshot  # type: ignore[method-assign]
    ebs.EBSBackend.complete_snapshot = complete_snapshot  # type: ignore[method-assign]


def make_key() -> dict[str, str]:
    """An IAM user allowed everything, and its access key; then credentials are checked."""
    from moto import settings
    from moto.iam.models import iam_backends

    iam = iam_backends[ACCOUNT]["global"]
    iam.create_user("us-east-1", "imaging")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy("imaging", "everything", json.dumps(policy))
    key = iam.create_access_key("imaging")
    from moto.core.authorization import ActionAuthenticatorMixin

    checked = ActionAuthenticatorMixin._authenticate_and_authorize_action

    def authenticate(self: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "service_name", "") != "ebs":
            checked(self, *args, **kwargs)

    ActionAuthenticatorMixin._authenticate_and_authorize_action = authenticate  # type: ignore[method-assign]
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    return {"access_key_id": key.access_key_id, "secret_access_key": key.secret_access_key}


Start = Callable[[str, list[tuple[str, str]]], Any]


def faults(
    app: Callable[[dict[str, Any], Start], Iterable[bytes]],
) -> Callable[[dict[str, Any], Start], Iterable[bytes]]:
    def wrapped(environ: dict[str, Any], start: Start) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
        if path == "/_faults":
            if method == "POST":
                body = json.loads(
                    environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)) or b"{}"
                )
                with _lock:
                    _faults.update(
                        {
                            k: int(v)
                            for k, v in body.items()
                            if k in ("throttle", "cut", "fail_after", "served", "corrupt")
                        }
                    )
            with _lock:
                data = json.dumps(_faults).encode()
            start("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]
        if method == "GET" and _BLOCK_GET.match(path):
            with _lock:
                throttle = _faults["throttle"] > 0
                cut = not throttle and (_faults["cut"] > 0 or _faults["fail_after"] == 0)
                corrupt = not throttle and not cut and _faults["corrupt"] > 0
                if corrupt:
                    _faults["corrupt"] -= 1
                elif not throttle and not cut:
                    _faults["served"] += 1
                    if _faults["fail_after"] > 0:
                        _faults["fail_after"] -= 1
                if throttle:
                    _faults["throttle"] -= 1
                    _faults["throttled"] += 1
                if cut:
                    _faults["cut"] = max(0, _faults["cut"] - 1)
                    _faults["was_cut"] += 1
            if throttle:
                data = json.dumps({"Message": "Rate exceeded", "Reason": "REQUEST_LIMIT_EXCEEDED"}).encode()
                start("400 Bad Request", [("Content-Type", "application/json"),
                                          ("x-amzn-ErrorType", "ThrottlingException"),
                                          ("Content-Length", str(len(data)))])  # fmt: skip
                return [data]
            if cut or corrupt:
                seen: dict[str, Any] = {}

                def keep(status: str, headers: list[tuple[str, str]], *rest: Any) -> Any:
                    seen.update(status=status, headers=headers)
                    return lambda _: None

                body = b"".join(app(environ, keep))
                headers = [
                    (k, v) for k, v in seen["headers"] if k.lower() not in ("content-length", "connection")
                ]
                if corrupt:
                    start(seen["status"], [*headers, ("Content-Length", str(len(body)))])
                    return [body[:7] + bytes([body[7] ^ 1]) + body[8:]]
                start(
                    seen["status"], [*headers, ("Content-Length", str(len(body))), ("Connection", "close")]
                )
                return [body[: len(body) // 2]]
        return app(environ, start)

    return wrapped


def main(port: int) -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    patch_moto()
    key = make_key()
    server = make_server("127.0.0.1", port, faults(DomainDispatcherApplication(create_backend_app)), True,
                         request_handler=MotoRequestHandler)  # fmt: skip
    print(json.dumps(key), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]))
