"""AWS, and Eucalyptus by its endpoints, through the EC2 and EBS direct APIs (boto3).

Copying out: instance -> its root volume -> a new snapshot (waited for, within a time limit) ->
the snapshot's blocks (ListSnapshotBlocks, GetSnapshotBlock), fetched in parallel into a sparse
raw disk, each block's length and SHA256 checked against what EBS says; blocks EBS does not
list were never written and stay holes. The snapshot made for the copy is deleted afterwards.

Publishing: the verified disk's non-zero blocks go into a new snapshot (StartSnapshot,
PutSnapshotBlock with each block's SHA256, CompleteSnapshot), the snapshot becomes an image
(RegisterImage), and the image's launch permissions say who may use it: ``all`` for public,
the users' account ids for selected, nobody else for private. The image's boot mode is the disk's
firmware (:data:`BOOT_MODES`). An upload that fails leaves no snapshot or image behind.

Throttling and server errors are retried by botocore with exponential backoff (its ``standard``
mode, ``max_attempts`` per call); a block whose body is cut or whose checksum does not match is
fetched again, a few times, then the run fails. Credentials come from the cloud's settings, never
from a parameter, and are never part of a message.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import math
import os
import random
import re
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaging import sparse
from imaging.clouds.kept import KEEP, find_snapshot, forget_snapshot, note_snapshot
from imaging.clouds.resume import Cut, resumable_download
from imaging.clouds.settings import EC2, CloudSource
from imaging.clouds.transfer import Fetched
from imaging.errors import ImagingError, ParameterError, SourceError
from imaging.progress import bytes_bar
from imaging.records import Record
from imaging.sparse import content_digest, data_extents

GIB = 1 << 30
EBS_BLOCK = 512 << 10  # what EBS direct writes and reads: 512 KiB blocks
_BLOCK_ATTEMPTS = 5
_AUTH = {"AuthFailure", "UnrecognizedClientException", "InvalidClientTokenId", "SignatureDoesNotMatch",
         "InvalidAccessKeyId", "AccessDeniedException", "UnauthorizedOperation", "AccessDenied"}  # fmt: skip
_NOT_FOUND = {"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed", "InvalidVolume.NotFound",
              "InvalidSnapshot.NotFound", "ResourceNotFoundException"}  # fmt: skip
# RegisterImage's BootMode for the disk's firmware: a hybrid disk is uefi-preferred (UEFI on the
# instance types that have it, BIOS on the others). Said for a BIOS disk too, so that the image,
# not the instance type's default boot mode, decides.
BOOT_MODES = {"bios": "legacy-bios", "uefi": "uefi", "hybrid": "uefi-preferred"}


class CloudError(ImagingError):
    """A cloud refused or failed a call; the message names the call, never a credential."""


def client(cloud: EC2, service: str, *, retries: bool = True) -> Any:
    """A boto3 client of the cloud; ``retries=False`` for the block reads, whose throttling
    :class:`Window` handles itself (botocore's retries would hide it)."""
    import boto3
    from botocore.config import Config

    endpoint = cloud.ebs_endpoint_url if service == "ebs" else cloud.endpoint_url
    return boto3.client(
        service,
        region_name=cloud.region,
        endpoint_url=endpoint or None,
        aws_access_key_id=cloud.access_key_id.get_secret_value() or None,
        aws_secret_access_key=cloud.secret_access_key.get_secret_value() or None,
        config=Config(
            connect_timeout=10,
            read_timeout=120,
            retries={"max_attempts": cloud.max_attempts if retries else 1, "mode": "standard"},
            max_pool_connections=max(10, cloud.block_workers + 2),
        ),
    )


def _code(e: BaseException) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _explain(e: BaseException, what: str, cloud_name: str) -> ImagingError:
    """A botocore error as one line: what we asked, the cloud's code and message."""
    from botocore.exceptions import ClientError

    if isinstance(e, ClientError):
        code = _code(e)
        message = " ".join(str(e.response.get("Error", {}).get("Message", "")).split())
        if code in _AUTH:
            return CloudError(f"{cloud_name}: {what}: the cloud refused the credentials ({code}: {message})")
        if code in _NOT_FOUND:
            return SourceError(f"{cloud_name}: {what}: not found ({code}: {message})")
        return CloudError(f"{cloud_name}: {what}: {code}: {message}")
    return CloudError(f"{cloud_name}: {what}: {' '.join(str(e).split()) or type(e).__name__}")


def _call(cloud_name: str, what: str, fn: Any, **kwargs: Any) -> Any:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kwargs)
    except (ClientError, BotoCoreError) as e:
        raise _explain(e, what, cloud_name) from None


def root_volume(src: CloudSource, cloud: EC2) -> tuple[str, int]:
    """(volume id, size in bytes) of the instance's root volume."""
    ec2 = client(cloud, "ec2")
    found = _call(
        src.cloud, f"describe instance {src.instance}", ec2.describe_instances, InstanceIds=[src.instance]
    )
    instances = [i for r in found.get("Reservations", []) for i in r.get("Instances", [])]
    if not instances:
        raise SourceError(f"{src.cloud}: no instance {src.instance}")
    inst = instances[0]
    root = inst.get("RootDeviceName")
    volumes = [
        m["Ebs"]["VolumeId"]
        for m in inst.get("BlockDeviceMappings", [])
        if m.get("DeviceName") == root and "Ebs" in m
    ]
    if not volumes:
        raise SourceError(
            f"{src.cloud}: instance {src.instance} has no EBS root volume ({root or 'no root device'}): "
            "an instance-store instance is copied from its node (eucalyptus://)"
        )
    vol = _call(src.cloud, f"describe volume {volumes[0]}", ec2.describe_volumes, VolumeIds=volumes)[
        "Volumes"
    ][0]
    return volumes[0], int(vol["Size"]) * GIB


def wait_snapshot(ec2: Any, cloud: EC2, cloud_name: str, snapshot_id: str, what: str) -> None:
    """Until the snapshot is completed; CloudError when it fails or the time limit passes."""
    deadline = time.monotonic() + cloud.snapshot_timeout
    while True:
        snap = _call(cloud_name, f"describe snapshot {snapshot_id}", ec2.describe_snapshots,
                     SnapshotIds=[snapshot_id])["Snapshots"][0]  # fmt: skip
        state = snap.get("State")
        if state == "completed":
            return
        if state == "error":
            raise CloudError(
                f"{cloud_name}: snapshot {snapshot_id} of {what} failed: {snap.get('StateMessage', '')}"
            )
        if time.monotonic() >= deadline:
            raise CloudError(
                f"{cloud_name}: snapshot {snapshot_id} of {what} did not complete within "
                f"{cloud.snapshot_timeout:g} s (still {state}, {snap.get('Progress') or '0%'})"
            )
        time.sleep(min(cloud.poll_seconds, max(0.0, deadline - time.monotonic())))


def _checksum(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


_THROTTLED = {"ThrottlingException", "RequestThrottledException", "SlowDown", "RequestLimitExceeded",
              "ConcurrentLimitExceededException"}  # fmt: skip
_THROTTLED_ATTEMPTS = 30  # a block throttled this often in a row fails the run (AWS asks for retries)


class Window:
    """How many block reads are in flight: additive increase, multiplicative decrease (AIMD), as
    TCP does. EBS direct answers too many requests for an account or a snapshot with
    ThrottlingException or RequestThrottledException, whose limits it does not publish per
    snapshot: each throttle halves the window (down to 1) and the throttled read waits and goes
    again; every ``size`` reads that succeed in a row widen it by one, up to ``ceiling``."""

    def __init__(self, ceiling: int, start: int = 8) -> None:
        self.ceiling = ceiling
        self.size = min(start, ceiling)
        self.in_flight = 0
        self.throttles = 0
        self.peak = self.size
        self._run = 0
        self._cond = threading.Condition()

    def __enter__(self) -> Window:
        with self._cond:
            self._cond.wait_for(lambda: self.in_flight < self.size)
            self.in_flight += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    def succeeded(self) -> None:
        with self._cond:
            self._run += 1
            if self._run >= self.size and self.size < self.ceiling:
                self.size += 1
                self.peak = max(self.peak, self.size)
                self._run = 0
                self._cond.notify_all()

    def throttled(self) -> None:
        with self._cond:
            self.throttles += 1
            self.size = max(1, self.size // 2)
            self._run = 0


def _get_block(ebs: Any, cloud_name: str, snapshot_id: str, index: int, token: str, size: int,
               window: Window) -> bytes:  # fmt: skip
    """One block, read whole and checked. A cut body, a server error or a bad checksum is fetched
    again, a few times; a throttled read shrinks the window, waits and goes again. Reads that
    fail every time are a :class:`Cut`; checksums that never match are not (nothing is kept)."""
    from botocore.exceptions import ClientError

    problem, attempts, throttled = "", 0, 0
    while attempts < _BLOCK_ATTEMPTS:
        try:
            with window:
                got = ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index, BlockToken=token)
                data = got["BlockData"].read()
        except ClientError as e:
            code, status = _code(e), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _THROTTLED and throttled < _THROTTLED_ATTEMPTS:
                window.throttled()
                throttled += 1
                time.sleep(min(0.05 * 2**throttled, 2.0) * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
                continue
            if int(status) < 500 and code not in _THROTTLED:
                raise _explain(e, f"block {index} of {snapshot_id}", cloud_name) from None
            problem = f"{code or status}"
        except Exception as e:  # a cut body: urllib3's, http.client's and botocore's errors
            problem = f"read failed ({' '.join(str(e).split()) or type(e).__name__})"
        else:
            window.succeeded()
            if len(data) != int(got.get("DataLength", -1)) or len(data) != size:
                problem = f"{len(data)} bytes, expected {size}"
            elif got.get("ChecksumAlgorithm") != "SHA256" or got.get("Checksum") != _checksum(data):
                problem = "checksum does not match its data"
            else:
                return bytes(data)
        attempts += 1
        if attempts < _BLOCK_ATTEMPTS:
            time.sleep(min(0.05 * 2**attempts, 5.0))
    error = CloudError if problem == "checksum does not match its data" else Cut
    raise error(f"{cloud_name}: block {index} of {snapshot_id}: {problem} after {_BLOCK_ATTEMPTS} attempts")


def _blocks(ebs: Any, cloud_name: str, snapshot_id: str) -> tuple[list[tuple[int, str]], int, int]:
    blocks: list[tuple[int, str]] = []
    kwargs: dict[str, Any] = {"SnapshotId": snapshot_id, "MaxResults": 10000}
    while True:
        page = _call(cloud_name, f"list the blocks of {snapshot_id}", ebs.list_snapshot_blocks, **kwargs)
        blocks += [(int(b["BlockIndex"]), str(b["BlockToken"])) for b in page.get("Blocks", [])]
        if not page.get("NextToken"):
            return blocks, int(page["BlockSize"]), int(page["VolumeSize"]) * GIB
        kwargs["NextToken"] = page["NextToken"]


def _parallel(workers: int, items: list[Any], work: Any) -> None:
    """``work(item)`` on every item, ``workers`` at a time; the first failure stops the rest."""
    stop = threading.Event()

    def one(item: Any) -> None:
        if not stop.is_set():
            work(item)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(one, item) for item in items]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in done if f.exception() is not None), None)
        if failed is not None:
            stop.set()
            for f in futures:
                f.cancel()
            raise failed.exception()  # type: ignore[misc]


@dataclass(frozen=True)
class Copied:
    blocks: int  # listed in the snapshot
    fetched: int  # read this time (the others were held from a cut copy)
    data_bytes: int
    peak_window: int
    throttles: int


def _wanted(
    blocks: list[tuple[int, str]], block_size: int, missing: list[tuple[int, int]]
) -> list[tuple[int, str]]:
    """The blocks not wholly held: those overlapping a missing byte range."""
    starts = [start for start, _ in missing]
    wanted = []
    for index, token in blocks:
        lo, hi = index * block_size, (index + 1) * block_size
        i = bisect.bisect_right(starts, lo) - 1
        if (i >= 0 and missing[i][1] > lo) or (i + 1 < len(missing) and missing[i + 1][0] < hi):
            wanted.append((index, token))
    return wanted


def copy_blocks(
    cloud: EC2, cloud_name: str, snapshot_id: str, dest: Path, desc: str | None = None
) -> Copied:
    """The snapshot's blocks into ``dest`` (raw, sparse), as many in flight as EBS allows (up to
    ``block_workers``, :class:`Window`). Blocks a cut copy of the same snapshot holds are not read
    again."""
    ebs, reader = client(cloud, "ebs"), client(cloud, "ebs", retries=False)
    ceiling = cloud.block_workers
    blocks, block_size, size = _blocks(ebs, cloud_name, snapshot_id)
    window = Window(ceiling)
    with resumable_download(dest, size, {"snapshot": snapshot_id, "block_size": block_size}) as out:
        todo = _wanted(blocks, block_size, out.missing())
        with bytes_bar(len(blocks) * block_size, desc) as bar:
            bar.update((len(blocks) - len(todo)) * block_size)
            lock = threading.Lock()
            fetched = [0]

            def get(block: tuple[int, str]) -> None:
                index, token = block
                data = _get_block(reader, cloud_name, snapshot_id, index, token, block_size, window)
                out.write(index * block_size, data)
                with lock:
                    fetched[0] += 1
                    bar.update(len(data))

            _parallel(ceiling, todo, get)
    return Copied(len(blocks), fetched[0], sparse.data_bytes(dest), window.peak, window.throttles)


def _kept_snapshot(ec2: Any, src: CloudSource, volume_id: str, work: Path) -> str | None:
    """The snapshot a cut copy of this instance kept, if EC2 still has it, of the same volume."""
    from botocore.exceptions import BotoCoreError, ClientError

    snapshot_id = find_snapshot(work, str(src))
    if snapshot_id is None:
        return None
    try:
        found = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
    except (ClientError, BotoCoreError):
        found = []
    if found and found[0].get("VolumeId") == volume_id and found[0].get("State") in ("pending", "completed"):
        return snapshot_id
    _delete_snapshot(ec2, snapshot_id)
    forget_snapshot(work)
    return None


def _delete_snapshot(ec2: Any, snapshot_id: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        ec2.delete_snapshot(SnapshotId=snapshot_id)
    except (ClientError, BotoCoreError):
        pass


def fetch(src: CloudSource, cloud: EC2, dest: Path) -> Fetched:
    """Copy the instance's root volume to ``dest`` (raw, sparse) through a snapshot of it. A copy
    cut mid-way keeps the blocks that arrived and the snapshot (noted beside ``dest``): the next
    call reads the rest of the same snapshot, the same point in time."""
    t0 = time.monotonic()
    volume_id, size = root_volume(src, cloud)
    ec2 = client(cloud, "ec2")
    work = dest.parent
    snapshot_id = _kept_snapshot(ec2, src, volume_id, work)
    if snapshot_id is None:
        snap = _call(
            src.cloud, f"snapshot volume {volume_id}", ec2.create_snapshot, VolumeId=volume_id,
            Description=f"imaging: copy of {src.instance}",
            TagSpecifications=[{"ResourceType": "snapshot", "Tags": [{"Key": "imaging:source", "Value": src.instance}]}],
        )  # fmt: skip
        snapshot_id = str(snap["SnapshotId"])
        note_snapshot(work, str(src), snapshot_id)
    cut = False
    try:
        wait_snapshot(ec2, cloud, src.cloud, snapshot_id, f"volume {volume_id}")
        got = copy_blocks(cloud, src.cloud, snapshot_id, dest, f"copy {src.instance}")
        whole = content_digest(dest)  # the data only: unlisted blocks are holes
    except Cut as e:
        cut = True
        raise Cut(
            f"{e}; the blocks that arrived and snapshot {snapshot_id} are kept for the resume"
        ) from None
    except KEEP:  # what arrived stays (resume.py): so does the snapshot it is of
        cut = True
        raise
    finally:
        if not cut:  # the snapshot was ours, made only for this copy
            forget_snapshot(work)
            _delete_snapshot(ec2, snapshot_id)
    return Fetched(
        source=str(src), cloud=src.cloud, kind="ec2", path=str(dest), format="raw", size_bytes=dest.stat().st_size,
        data_bytes=got.data_bytes, digest=whole,
        verified=f"{got.blocks} blocks of {EBS_BLOCK} bytes, each against its SHA256 from EBS",
        seconds=round(time.monotonic() - t0, 3), where=f"{volume_id} via {snapshot_id}", snapshot=snapshot_id,
    )  # fmt: skip


@dataclass(frozen=True)
class Registered(Record):
    cloud: str
    image_id: str
    snapshot_id: str
    name: str
    vis: str
    launch_permissions: list[str]
    blocks: int
    size_bytes: int
    seconds: float
    boot_mode: str  # what RegisterImage was told (BOOT_MODES)


_AMI_NAME = re.compile(r"[^A-Za-z0-9()\[\] ./'@_-]+")


def ami_name(name: str, run: str) -> str:
    """EC2 image names allow 3-128 of a few characters and must be unique: the display name,
    cleaned, and the run id."""
    suffix = f" {run}"
    cleaned = " ".join(_AMI_NAME.sub(" ", name).split())
    return (cleaned[: 128 - len(suffix)].rstrip() + suffix).strip()[:128]


def permissions(cloud: EC2, cloud_name: str, vis: str, shared_with: list[str]) -> list[dict[str, str]]:
    if vis == "public":
        return [{"Group": "all"}]
    if vis == "private":
        return []
    missing = [u for u in shared_with if u not in cloud.accounts]
    if missing:
        raise ParameterError(
            f"{cloud_name}: no account id for {', '.join(missing)} (add them under clouds.{cloud_name}.accounts)"
        )
    return [{"UserId": cloud.accounts[u]} for u in shared_with]


def publish(cloud: EC2, cloud_name: str, disk: Path, name: str, run: str, vis: str, shared_with: list[str],
            firmware: str = "bios") -> Registered:  # fmt: skip
    """The raw disk as a new snapshot and image, with its launch permissions and the boot mode of
    its ``firmware`` (bios, uefi, hybrid)."""
    t0 = time.monotonic()
    grants = permissions(cloud, cloud_name, vis, shared_with)
    boot_mode = BOOT_MODES[firmware]
    ec2, ebs = client(cloud, "ec2"), client(cloud, "ebs")
    size = disk.stat().st_size
    volume_gib = max(1, math.ceil(size / GIB))
    fd = os.open(disk, os.O_RDONLY)
    try:
        indexes = sorted({i for off, n in data_extents(fd, 0, size)
                          for i in range(off // EBS_BLOCK, (off + n - 1) // EBS_BLOCK + 1)})  # fmt: skip
    finally:
        os.close(fd)
    started = _call(
        cloud_name, "start a snapshot", ebs.start_snapshot, VolumeSize=volume_gib, Timeout=60,
        Description=f"imaging: {name[:200]} ({run})",
        Tags=[{"Key": "imaging:run", "Value": run}],
    )  # fmt: skip
    snapshot_id, image_id = str(started["SnapshotId"]), ""
    written: list[int] = []
    try:
        lock = threading.Lock()
        with open(disk, "rb") as f, bytes_bar(len(indexes) * EBS_BLOCK, f"upload to {cloud_name}") as bar:
            fileno = f.fileno()

            def put(index: int) -> None:
                data = os.pread(fileno, EBS_BLOCK, index * EBS_BLOCK).ljust(EBS_BLOCK, b"\0")
                if data.count(0) == EBS_BLOCK:
                    return  # a hole's worth of zeros: EBS reads unwritten blocks as zeros
                _call(cloud_name, f"put block {index} of {snapshot_id}", ebs.put_snapshot_block,
                      SnapshotId=snapshot_id, BlockIndex=index, BlockData=data, DataLength=EBS_BLOCK,
                      Checksum=_checksum(data), ChecksumAlgorithm="SHA256")  # fmt: skip
                with lock:
                    written.append(index)
                    bar.update(EBS_BLOCK)

            _parallel(cloud.block_workers, indexes, put)
        _call(cloud_name, f"complete snapshot {snapshot_id}", ebs.complete_snapshot, SnapshotId=snapshot_id,
              ChangedBlocksCount=len(written))  # fmt: skip
        wait_snapshot(ec2, cloud, cloud_name, snapshot_id, name)
        image = _call(
            cloud_name, f"register an image from {snapshot_id}", ec2.register_image,
            Name=ami_name(name, run), Description=name[:255], Architecture=cloud.architecture,
            RootDeviceName=cloud.root_device, VirtualizationType="hvm", EnaSupport=True, BootMode=boot_mode,
            BlockDeviceMappings=[{"DeviceName": cloud.root_device,
                                  "Ebs": {"SnapshotId": snapshot_id, "DeleteOnTermination": True}}],
        )  # fmt: skip
        image_id = str(image["ImageId"])
        _call(cloud_name, f"tag {image_id}", ec2.create_tags, Resources=[image_id],
              Tags=[{"Key": "Name", "Value": name[:255]}, {"Key": "imaging:run", "Value": run}])  # fmt: skip
        if grants:
            _call(cloud_name, f"share {image_id}", ec2.modify_image_attribute, ImageId=image_id,
                  LaunchPermission={"Add": grants})  # fmt: skip
    except BaseException:
        _undo(ec2, image_id, snapshot_id)
        raise
    return Registered(
        cloud=cloud_name, image_id=image_id, snapshot_id=snapshot_id, name=name, vis=vis,
        launch_permissions=[g.get("Group") or g["UserId"] for g in grants], blocks=len(written),
        size_bytes=volume_gib * GIB, seconds=round(time.monotonic() - t0, 3), boot_mode=boot_mode,
    )  # fmt: skip


def _undo(ec2: Any, image_id: str, snapshot_id: str) -> None:
    """Nothing half-published stays: the image, then the snapshot under it."""
    from botocore.exceptions import BotoCoreError, ClientError

    for call, kwargs in (
        (ec2.deregister_image, {"ImageId": image_id}),
        (ec2.delete_snapshot, {"SnapshotId": snapshot_id}),
    ):
        if next(iter(kwargs.values())):
            try:
                call(**kwargs)
            except (ClientError, BotoCoreError):
                pass
