"""Stage 60-publish against a real S3-compatible server on loopback (moto in server mode)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imaging.clouds import publish
from imaging.errors import ImagingError, ParameterError
from imaging.workspace import Workspace

from .servicekit import S3_KEY_ID, S3_SECRET, s3_client, s3_server


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[str, Any]]:
    with s3_server() as url:
        client = s3_client(url)
        client.create_bucket(Bucket="images")
        yield url, client


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3: tuple[str, Any]) -> Workspace:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    ws = Workspace.open(tmp_path / "run-7")
    artifact = ws.root / "out" / "img.qcow2"
    artifact.parent.mkdir()
    artifact.write_bytes(b"QFI\xfb" + bytes(64 << 10))
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    ws.save_result("40-export", {"path": str(artifact), "sha256": digest, "format": "qcow2"})
    ws.save_result("50-verify", {"verdict": "booted"})
    return ws


def dest(url: str) -> publish.Destination:
    return publish.Destination(bucket="images", endpoint=url, region="us-east-1", prefix="images/")


def public_read(client: Any, key: str) -> bool:
    grants = client.get_object_acl(Bucket="images", Key=key)["Grants"]
    return any("AllUsers" in str(g["Grantee"].get("URI", "")) and g["Permission"] == "READ" for g in grants)


@pytest.mark.parametrize(
    ("vis", "shared"), [("public", []), ("private", []), ("selected", ["bob", "carol"])]
)
def test_visibility(ws: Workspace, s3: tuple[str, Any], vis: str, shared: list[str]) -> None:
    url, client = s3
    done = publish.publish(ws, "img", vis, shared, dest(url))
    assert (done.key, done.manifest_key) == ("images/img/run-7.qcow2", "images/img/run-7.json")
    body = client.get_object(Bucket="images", Key=done.key)
    assert hashlib.sha256(body["Body"].read()).hexdigest() == done.sha256
    assert body["Metadata"] == {
        "sha256": done.sha256,
        "vis": vis,
        "shared-with": ",".join(shared),
        "run": "run-7",
        "image-name": "img",
    }
    manifest = json.loads(client.get_object(Bucket="images", Key=done.manifest_key)["Body"].read())
    assert (manifest["vis"], manifest["shared_with"], manifest["sha256"]) == (vis, shared, done.sha256)
    assert public_read(client, done.key) is (vis == "public")
    assert public_read(client, done.manifest_key) is (vis == "public")
    # A 40-export record from before UEFI names no firmware: the disk is a BIOS disk.
    assert (manifest["firmware"], manifest["secure_boot"]) == (
        "bios",
        False,
    ) and "guest_os_features" not in manifest


def test_the_manifest_says_what_the_image_boots_with(ws: Workspace, s3: tuple[str, Any]) -> None:
    url, client = s3
    record = ws.result("40-export")
    ws.save_result("40-export", {**record, "format": "gce", "firmware": "uefi", "secure_boot": True,
                                 "details": {"guest_os_features": ["UEFI_COMPATIBLE"]}})  # fmt: skip
    done = publish.publish(ws, "img", "private", [], dest(url))
    manifest = json.loads(client.get_object(Bucket="images", Key=done.manifest_key)["Body"].read())
    assert (manifest["format"], manifest["firmware"], manifest["secure_boot"]) == ("gce", "uefi", True)
    assert manifest["guest_os_features"] == ["UEFI_COMPATIBLE"]  # what GCE's import must be told


def test_an_image_that_did_not_boot_is_not_published(ws: Workspace, s3: tuple[str, Any]) -> None:
    ws.save_result("50-verify", {"verdict": "no-marker"})
    with pytest.raises(ImagingError, match="did not pass the boot check"):
        publish.publish(ws, "img", "public", [], dest(s3[0]))


def test_bad_visibility_and_destination(
    ws: Workspace, s3: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ParameterError, match="when, and only when, vis is selected"):
        publish.publish(ws, "img", "selected", [], dest(s3[0]))
    with pytest.raises(ParameterError, match="not allowed"):
        publish.publish(ws, "img", "selected", ["../x"], dest(s3[0]))
    monkeypatch.delenv("IMAGING_S3_BUCKET", raising=False)
    with pytest.raises(ParameterError, match="no object store to publish to"):
        publish.Destination.from_env()
    missing = publish.Destination(bucket="nope", endpoint=s3[0], region="us-east-1", prefix="")
    with pytest.raises(ImagingError, match="cannot publish to s3://nope/img/run-7.qcow2: .*NoSuchBucket"):
        publish.publish(ws, "img", "private", [], missing)
