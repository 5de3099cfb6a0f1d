"""Stage 60-publish (image requests): the verified artifact becomes a cloud image, or goes to an
S3-compatible object store.

``DESTINATION`` names where: a configured cloud (an ``openstack`` cloud: a Glance image with its
visibility and members, ``clouds/openstack.py``; an ``ec2`` cloud: an EBS snapshot registered as
an image with its launch permissions, ``clouds/ec2.py``), or ``s3`` for sites without a cloud
image service (below). Either way the result names the new image (or object) and where it lives.

It runs after the boot check, not before it as DESIGN first had it (45-publish): an image that
does not boot must never reach users. Visibility is the object's ACL (``public`` is
``public-read``; ``private`` and ``selected`` are ``private``) and, for ``selected``, the users it
is shared with are recorded in the object's metadata and in a manifest beside it
(``<prefix><name>/<run>.json``), which is what a cloud's image registry reads: an S3 ACL can only
name the store's own accounts, not this service's users.

The disk's firmware (40-export's record: bios, uefi or hybrid; bios in a run from before UEFI)
goes with the image: a Glance image of a UEFI-only disk gets ``hw_firmware_type=uefi`` and
``hw_machine_type=q35``, an EC2 image its ``BootMode``; the manifest names it, and for a GCE
image the guest OS features its import needs (``UEFI_COMPATIBLE``).

Where to publish comes from the environment the request service gives the run
(``IMAGING_S3_BUCKET``, ``IMAGING_S3_ENDPOINT``, ``IMAGING_S3_REGION``, ``IMAGING_S3_PREFIX``), and
the credentials from boto3's own (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``): none of them
is a notebook parameter, so no secret lands in the executed notebook.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imaging import config, sparse, tools
from imaging.clouds import settings as cloud_settings
from imaging.errors import ImagingError, ParameterError
from imaging.records import Record
from imaging.workspace import Workspace

VISIBILITIES = ("public", "private", "selected")


@dataclass(frozen=True)
class Destination(Record):
    bucket: str
    endpoint: str
    region: str
    prefix: str

    @classmethod
    def from_env(cls) -> Destination:
        bucket = os.environ.get("IMAGING_S3_BUCKET", "")
        if not bucket:
            raise ParameterError(
                "no object store to publish to: set IMAGING_S3_BUCKET (the service's publish: bucket)"
            )
        prefix = os.environ.get("IMAGING_S3_PREFIX", "images/")
        return cls(
            bucket,
            os.environ.get("IMAGING_S3_ENDPOINT", ""),
            os.environ.get("IMAGING_S3_REGION", "us-east-1"),
            prefix if not prefix or prefix.endswith("/") else prefix + "/",
        )


@dataclass(frozen=True)
class Published(Record):
    bucket: str
    key: str
    manifest_key: str
    endpoint: str
    vis: str
    acl: str
    shared_with: list[str]
    sha256: str
    size_bytes: int
    etag: str
    seconds: float


def client(dest: Destination) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=dest.endpoint or None,
        region_name=dest.region,
        config=Config(connect_timeout=10, read_timeout=120, retries={"max_attempts": 3, "mode": "standard"}),
    )


@dataclass(frozen=True)
class CloudImage(Record):
    """An image published to a cloud: its id, where it lives, and who may use it."""

    destination: str  # the cloud's name in the settings
    kind: str  # ec2 | openstack
    image_id: str
    name: str
    vis: str
    shared_with: list[str]
    grantees: list[str]  # EC2 launch permissions (all, account ids), Glance members (project ids)
    location: str  # endpoint (or region) of the cloud
    sha256: str  # of the artifact the image was made from
    size_bytes: int
    seconds: float
    details: dict[str, Any]


def publish_to(ws: Workspace, destination: str, name: str, vis: str, shared_with: list[str]) -> Record:
    """Publish the run's verified artifact to ``destination``: ``s3`` or a configured cloud."""
    if destination == "s3":
        return publish(ws, config.slug(name), vis, shared_with)
    check_visibility(vis, shared_with)
    artifact, boot = ws.result("40-export"), ws.result("50-verify")
    if boot.get("verdict") != "booted":
        raise ImagingError(f"{name} did not pass the boot check ({boot.get('verdict')}): not publishing it")
    clouds = cloud_settings.from_environment()
    cloud = clouds.get(destination)
    if cloud is None:
        raise ParameterError(
            f"no cloud {destination!r} to publish to (configured: {', '.join(sorted(clouds)) or 'none'})"
        )
    path = Path(artifact["path"])
    firmware = artifact_firmware(artifact)
    if isinstance(cloud, cloud_settings.OpenStack):
        from imaging.clouds import openstack

        if artifact["format"] not in openstack.FORMATS:
            raise ParameterError(f"Glance images are published as qcow2 or raw, not {artifact['format']}")
        up = openstack.publish(cloud, destination, path, artifact["format"], name, ws.id, vis, shared_with,
                               firmware)  # fmt: skip
        return CloudImage(
            destination=destination, kind="openstack", image_id=up.image_id, name=name, vis=vis,
            shared_with=list(shared_with), grantees=up.members, location=cloud.image_endpoint or cloud.region,
            sha256=artifact["sha256"], size_bytes=up.size_bytes, seconds=up.seconds,
            details={"visibility": up.visibility, "disk_format": up.disk_format, "checksum": up.checksum,
                     "firmware": firmware, "properties": up.properties},
        )  # fmt: skip
    if isinstance(cloud, cloud_settings.EC2):
        from imaging.clouds import ec2

        t0 = time.monotonic()
        # EBS takes a raw disk's blocks; a temporary raw copy of any other format, removed
        # however the upload ends (the sweep after a killed stage takes its .part name too).
        raw = path if artifact["format"] == "raw" else sparse.part_path(ws.work / "publish.raw")
        try:
            if raw != path:
                raw.unlink(missing_ok=True)
                tools.run(["qemu-img", "convert", "-f", config.check_format(artifact["format"]).qemu_format,
                           "-O", "raw", path, raw], timeout=3600)  # fmt: skip
            reg = ec2.publish(cloud, destination, raw, name, ws.id, vis, shared_with, firmware)
        finally:
            if raw != path:
                raw.unlink(missing_ok=True)
        return CloudImage(
            destination=destination, kind="ec2", image_id=reg.image_id, name=name, vis=vis,
            shared_with=list(shared_with), grantees=reg.launch_permissions,
            location=cloud.endpoint_url or cloud.region, sha256=artifact["sha256"], size_bytes=reg.size_bytes,
            seconds=round(time.monotonic() - t0, 3),
            details={"snapshot_id": reg.snapshot_id, "blocks": reg.blocks, "ami_name": ec2.ami_name(name, ws.id),
                     "firmware": firmware, "boot_mode": reg.boot_mode},
        )  # fmt: skip
    raise ParameterError(
        f"cloud {destination!r} is a {cloud.kind} cloud: images are published to ec2 or openstack clouds"
    )


def artifact_firmware(artifact: dict[str, Any]) -> str:
    """The firmware the artifact's disk boots with, from 40-export's record (bios, uefi, hybrid);
    a record from before UEFI has none: its disk is a BIOS disk."""
    return config.Firmware(artifact.get("firmware") or "bios").value


def check_visibility(vis: str, shared_with: list[str]) -> None:
    if vis not in VISIBILITIES:
        raise ParameterError(f"vis must be public, private or selected, not {vis!r}")
    if (vis == "selected") != bool(shared_with):
        raise ParameterError(
            "shared_with names the users an image is shared with when, and only when, vis is selected"
        )
    for name in shared_with:
        config.check_name(name)


def publish(
    ws: Workspace, name: str, vis: str, shared_with: list[str], dest: Destination | None = None
) -> Published:
    """Upload the run's verified artifact with its visibility, and a manifest beside it."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    check_visibility(vis, shared_with)
    config.check_name(name)
    artifact, boot = ws.result("40-export"), ws.result("50-verify")
    if boot.get("verdict") != "booted":
        raise ImagingError(f"{name} did not pass the boot check ({boot.get('verdict')}): not publishing it")
    dest = dest or Destination.from_env()
    path = Path(artifact["path"])
    key = f"{dest.prefix}{name}/{ws.id}.{artifact['format']}"
    manifest_key = f"{dest.prefix}{name}/{ws.id}.json"
    acl = "public-read" if vis == "public" else "private"
    metadata = {"sha256": artifact["sha256"], "vis": vis, "shared-with": ",".join(shared_with), "run": ws.id,
                "image-name": name}  # fmt: skip
    manifest = {
        "name": name,
        "key": key,
        "format": artifact["format"],
        "sha256": artifact["sha256"],
        "size_bytes": path.stat().st_size,
        "vis": vis,
        "shared_with": shared_with,
        "run": ws.id,
        "boot": boot.get("verdict"),
        "firmware": artifact_firmware(artifact),
        "secure_boot": bool(artifact.get("secure_boot", False)),
        "published": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    # What importing the image into its cloud must be told (GCE: UEFI_COMPATIBLE), from 40-export.
    if "guest_os_features" in artifact.get("details", {}):
        manifest["guest_os_features"] = artifact["details"]["guest_os_features"]
    s3 = client(dest)
    t0 = time.monotonic()
    try:
        s3.upload_file(
            str(path),
            dest.bucket,
            key,
            ExtraArgs={"ACL": acl, "Metadata": metadata, "ContentType": "application/octet-stream"},
        )
        head = s3.head_object(Bucket=dest.bucket, Key=key)
        s3.put_object(
            Bucket=dest.bucket,
            Key=manifest_key,
            Body=json.dumps(manifest, indent=2).encode(),
            ACL=acl,
            ContentType="application/json",
        )
    except (Boto3Error, BotoCoreError, ClientError) as e:
        raise ImagingError(
            f"cannot publish to s3://{dest.bucket}/{key}: {' '.join(str(e).split())}"
        ) from None
    if int(head["ContentLength"]) != path.stat().st_size:
        raise ImagingError(
            f"s3://{dest.bucket}/{key} holds {head['ContentLength']} bytes, not {path.stat().st_size}"
        )
    return Published(
        bucket=dest.bucket,
        key=key,
        manifest_key=manifest_key,
        endpoint=dest.endpoint,
        vis=vis,
        acl=acl,
        shared_with=list(shared_with),
        sha256=artifact["sha256"],
        size_bytes=path.stat().st_size,
        etag=str(head.get("ETag", "")).strip('"'),
        seconds=round(time.monotonic() - t0, 3),
    )
