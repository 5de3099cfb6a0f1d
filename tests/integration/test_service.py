"""The request service end to end: the real server on loopback, a real SMTP server whose mails are
read, the pipeline running on sample:kvm (boots included), and a real S3-compatible server for
published images. Then no token or password may be found in any record or log."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imaging import config
from imaging.samples import catalog, kvm

from . import planted
from .conftest import leftovers
from .servicekit import (
    S3_KEY_ID,
    S3_SECRET,
    SMTP_PASSWORD,
    SMTP_USER,
    Mailbox,
    Service,
    approve_link,
    assert_no_secrets,
    s3_client,
    s3_server,
    smtp_server,
    started_stages,
)

URL = "/api/v1/request_image/"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Mailbox, str, Path]]:
    root = tmp_path_factory.mktemp("service")
    fake_bin = root / "bin"  # empty; a test puts a broken tool here to break a stage
    fake_bin.mkdir()
    leaky = _leaky_kvm(root)
    with smtp_server() as (mailbox, smtp_port), s3_server() as s3_url:
        s3_client(s3_url).create_bucket(Bucket="images")
        config = {
            "instances": {"i-sample": "sample:kvm", "i-leaky": str(leaky)},
            "smtp": {
                "host": "127.0.0.1",
                "port": smtp_port,
                "username": SMTP_USER,
                "password": SMTP_PASSWORD,
            },
            "publish": {
                "endpoint_url": s3_url,
                "bucket": "images",
                "access_key_id": S3_KEY_ID,
                "secret_access_key": S3_SECRET,
            },
            "worker": {"concurrency": 1, "poll_seconds": 0.5},
        }
        service = Service(root, root / "runs", config, env={"PATH": f"{fake_bin}:{os.environ['PATH']}"})
        service.add_user("alice", email="alice@example.org")
        service.add_user("bob")
        service.add_user("root", admin=True, email="root@example.org")
        service.start()
        try:
            yield service, mailbox, s3_url, fake_bin
        finally:
            service.stop()
    assert leftovers(root) == []


LEAKED = planted.kinds()
KEY, AWS = next(i for i in LEAKED if i.path == "/opt/app/deploy_key"), LEAKED[0]


def _leaky_kvm(root: Path) -> Path:
    """The KVM sample with an SSH key a user left for a deploy and AWS CLI credentials."""
    image = root / "leaky.raw"  # the test's search for leaks passes over disks
    subprocess.run(["cp", "--sparse=always", str(catalog.ensure_sample("kvm")), str(image)], check=True)
    image.chmod(0o644)
    mnt = root / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        planted.plant(mnt, [KEY, AWS], uid=0)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        mnt.rmdir()
    return image


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_export_request_approved_by_mail_then_broken_fixed_and_resumed(world: Any) -> None:
    service, mailbox, _, fake_bin = world
    alice, root = service.client("alice"), service.client("root")

    # alice asks; the admins get a mail with a link to a confirmation page.
    r = alice.post(URL, json={"instance": "i-sample", "name": "demo", "disk_format": "qcow2"})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    mail = mailbox.wait(f"approve {rid}", to="root@example.org")
    assert "alice asks for an export of i-sample as qcow2" in mail.get_content()
    link = approve_link(mail)
    page = httpx.get(link)
    assert page.status_code == 200 and "Approve as root" in page.text
    assert alice.get(URL + rid).json()["state"] == "pending"  # following the link changes nothing
    assert httpx.post(link).status_code == 200
    assert httpx.post(link).status_code == 409  # a link works once

    done = service.wait_state("alice", rid, {"completed", "error"})
    assert done["state"] == "completed", done["error"]
    result = done["result"]
    assert result["verified"] and result["boot"]["verdict"] == "booted" and result["run"] == rid
    stages = [(h["to"], h["stage"]) for h in done["history"] if h["to"] == "running" and h["stage"]]
    assert stages == [("running", s) for s in config.pipeline_stages("export")]
    assert [h["actor"] for h in done["history"][:2]] == ["alice", "root"]

    # The completion mail: sha256, the boot verdict, the audit record.
    mail = mailbox.wait(f"{rid} completed", to="root@example.org")
    text = mail.get_content()
    for expected in (result["sha256"], "boot check  booted", result["audit_head"], f"{URL}{rid}/audit"):
        assert expected in text, expected

    # The owner downloads the artifact; its sha256 is the one reported.
    download = alice.get(URL + rid + "/artifact")
    assert download.status_code == 200
    assert sha256(download.content) == result["sha256"] == download.headers["x-checksum-sha256"]
    assert service.client("bob").get(URL + rid + "/artifact").status_code == 404

    # The audit record: notebooks as HTML, and the chain verified by the API and the CLI.
    notebooks = alice.get(URL + rid + "/notebooks").json()
    assert [n["name"] for n in notebooks] == config.pipeline_stages("export")
    html = alice.get(next(n["html"] for n in notebooks if n["name"] == "30-bootable"))
    assert html.status_code == 200 and "block_total" in html.text and "<html" in html.text
    record = alice.get(URL + rid + "/audit").json()
    assert (
        record["ok"]
        and record["head"] == result["audit_head"]
        and len(record["entries"]) == 2 * len(notebooks) + 2
    )
    assert record["entries"][-1]["kind"] == "artifact"
    check = service.cli("audit", rid, "--head", result["audit_head"])
    assert json.loads(check.stdout)["ok"]
    # A notebook changed after the fact is named.
    nb = service.runs / rid / "notebooks" / "40-export.html"
    original = nb.read_bytes()
    nb.write_bytes(original.replace(b"qcow2", b"QCOW2"))
    changed = subprocess.run([sys.executable, "-m", "imaging", "audit", rid], capture_output=True, text=True,
                             env=service.env)  # fmt: skip
    assert (
        changed.returncode == 1
        and "notebooks/40-export.html changed since it was recorded" in changed.stderr
    )
    assert "40-export.html changed" in alice.get(URL + rid + "/audit").json()["problems"][0]
    nb.write_bytes(original)

    # A broken QEMU: the boot check fails, the request goes to error, the admins are told.
    (fake_bin / "qemu-system-x86_64").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "qemu-system-x86_64").chmod(0o755)
    rid2 = alice.post(URL, json={"instance": "i-sample", "name": "again", "disk_format": "raw"}).json()["id"]
    assert root.patch(URL + rid2, json={"status": "approve"}).json()["state"] == "approved"
    failed = service.wait_state("alice", rid2, {"completed", "error"})
    assert (failed["state"], failed["stage"]) == ("error", "50-verify")
    assert "did not boot" in failed["error"]
    mail = mailbox.wait(f"{rid2} failed at 50-verify", to="root@example.org")
    assert (
        "did not boot" in mail.get_content() and "approve again to resume at 50-verify" in mail.get_content()
    )
    assert [n["name"] for n in alice.get(URL + rid2 + "/notebooks").json()][-1] == "50-verify.failed-1"

    # Fixed; approved again (by the link in the error mail): the run resumes at the failed stage.
    (fake_bin / "qemu-system-x86_64").unlink()
    assert httpx.post(approve_link(mail)).status_code == 200
    resumed = service.wait_state("alice", rid2, {"completed", "error"})
    assert resumed["state"] == "completed", resumed["error"]
    assert started_stages(service.runs / rid2) == [*config.pipeline_stages("export"), "50-verify"]
    after = resumed["history"][[h["to"] for h in resumed["history"]].index("error") + 1 :]
    assert [h["stage"] for h in after if h["to"] == "running" and h["from"] == "running"] == ["50-verify"]
    raw = alice.get(URL + rid2 + "/artifact")
    assert sha256(raw.content) == resumed["result"]["sha256"]
    assert alice.get(URL + rid2 + "/audit").json()["ok"]
    assert_no_secrets(service, mailbox, [S3_SECRET])


def test_image_request_is_published_with_its_visibility(world: Any) -> None:
    service, mailbox, s3_url, _ = world
    alice = service.client("alice")
    body = {"instance": "i-sample", "name": "shared", "vis": "selected", "shared_with": ["bob"]}
    rid = alice.post(URL, json=body).json()["id"]
    assert service.client("root").patch(URL + rid, json={"status": "approve"}).status_code == 200
    done = service.wait_state("alice", rid, {"completed", "error"})
    assert done["state"] == "completed", done["error"]
    published = done["result"]["published"]
    assert (published["bucket"], published["vis"], published["shared_with"]) == (
        "images",
        "selected",
        ["bob"],
    )
    s3 = s3_client(s3_url)
    head = s3.head_object(Bucket="images", Key=published["key"])
    assert (
        head["Metadata"]["shared-with"] == "bob" and head["Metadata"]["sha256"] == done["result"]["sha256"]
    )
    assert head["ContentLength"] == done["result"]["size_bytes"]
    manifest = json.loads(s3.get_object(Bucket="images", Key=published["manifest_key"])["Body"].read())
    assert manifest["shared_with"] == ["bob"] and manifest["boot"] == "booted"
    grants = s3.get_object_acl(Bucket="images", Key=published["key"])["Grants"]
    assert not [g for g in grants if "AllUsers" in str(g.get("Grantee", {}))]  # not public
    assert [n["name"] for n in alice.get(URL + rid + "/notebooks").json()][-1] == "60-publish"
    assert_no_secrets(service, mailbox, [S3_SECRET])


def test_a_public_image_with_a_secret_stops_until_an_admin_allows_it(world: Any) -> None:
    service, mailbox, s3_url, _ = world
    alice, root = service.client("alice"), service.client("root")
    body = {
        "instance": "i-leaky",
        "name": "leaky",
        "vis": "public",
        "profile": "generic",
        "boot_marker": kvm.MARKER,
    }
    rid = alice.post(URL, json=body).json()["id"]
    assert root.patch(URL + rid, json={"status": "approve"}).status_code == 200
    failed = service.wait_state("alice", rid, {"completed", "error"})
    assert (failed["state"], failed["stage"]) == ("error", "25-secrets"), failed["error"]
    assert "60-publish" not in started_stages(service.runs / rid)
    mail = mailbox.wait(f"{rid} failed at 25-secrets", to="root@example.org").get_content()
    found = re.findall(r"(/\S+):(\d+) ([^\[;]+) \[([0-9a-f]{16})\]", mail)
    by_path = {path: fingerprint for path, _, _, fingerprint in found}
    assert set(by_path) == {KEY.path, AWS.path}, mail
    # Only an admin answers, and only with an approval.
    key_only = {"status": "approve", "allow": [by_path[KEY.path]], "secrets": "clean"}
    assert alice.patch(URL + rid, json=key_only).status_code == 403
    assert root.patch(URL + rid, json={"status": "deny", "allow": [by_path[KEY.path]]}).status_code == 422

    # The deploy key is meant to be there; the AWS credentials go (clean); the run resumes.
    assert root.patch(URL + rid, json=key_only).status_code == 200
    done = service.wait_state("alice", rid, {"completed", "error"})
    assert done["state"] == "completed", done["error"]
    assert done["result"]["published"]["vis"] == "public"
    answer = [h for h in done["history"] if "allowed secret findings" in h["reason"]]
    assert [(h["actor"], h["reason"]) for h in answer] == [
        ("root", f"approved; allowed secret findings {by_path[KEY.path]}; secrets: clean")
    ]
    scanned = json.loads((service.runs / rid / "results" / "25-secrets.json").read_text())
    assert scanned["removed"] == [AWS.path] and scanned["allowed"] == [by_path[KEY.path]]
    assert_no_secrets(service, mailbox, [S3_SECRET, *KEY.values, *AWS.values])
