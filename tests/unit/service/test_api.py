"""The HTTP API in process (no worker, no mail): bad input of every kind gets a one-line JSON
error with the right 4xx code, users see only their own requests, only admins approve, and an
approval link is shown before it is used, used once, and refused when expired or forged."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from imaging import config
from imaging.service import api, approvals, settings
from imaging.service.store import Store

URL = "/api/v1/request_image/"


class Service:
    def __init__(
        self, client: TestClient, store: Store, conf: settings.Settings, tokens: dict[str, str]
    ) -> None:
        self.client, self.store, self.settings, self.tokens = client, store, conf, tokens

    def call(self, method: str, path: str, user: str | None = "alice", **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}
        return self.client.request(method, path, headers=headers | kw.pop("headers", {}), **kw)

    def create(self, user: str = "alice", **body: Any) -> Any:
        return self.call("POST", URL, user, json={"instance": "i-1", "name": "demo", **body})

    def link(self, request_id: str, admin: str = "root", **kw: Any) -> str:
        (user,) = self.store.users([admin])
        version = self.store.get(request_id).version
        return approvals.sign_approval(self.settings.signing_key(), request_id, user.id, version, **kw)


def make_settings(tmp_path: Path, database: str, **extra: Any) -> settings.Settings:
    return settings.Settings(**{"state_dir": tmp_path, "instances": {"i-1": "sample:kvm"}, "database_url": database,
                                "secret_key": "the-test-signing-key", **extra})  # fmt: skip


@pytest.fixture
def svc(tmp_path: Path, database: str) -> Iterator[Service]:
    conf = make_settings(tmp_path, database, publish={"bucket": "images"})
    store = Store(conf.sqlalchemy_url)
    tokens = {"alice": store.add_user("alice"), "bob": store.add_user("bob"),
              "root": store.add_user("root", admin=True, email="root@example.org")}  # fmt: skip
    with TestClient(api.create_app(conf, recover=False)) as client:
        yield Service(client, store, conf, tokens)
    store.close()


def error(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and "\n" not in body["detail"]
    return str(body["detail"])


def test_export_request_starts_pending(svc: Service) -> None:
    r = svc.create(disk_format="qcow2")
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["state"], body["kind"], body["owner"], body["disk_format"], body["target"]) == (
        "pending", "export", "alice", "qcow2", "kvm")  # fmt: skip
    assert body["history"] == [{"time": body["created"], "actor": "alice", "from": None, "to": "pending",
                                "stage": None, "reason": "requested"}]  # fmt: skip
    assert svc.call("GET", URL + body["id"]).json()["id"] == body["id"]


def test_image_request(svc: Service) -> None:
    r = svc.create(vis="selected", shared_with=["bob", "bob"])
    assert r.status_code == 201, r.text
    assert (r.json()["kind"], r.json()["vis"], r.json()["shared_with"], r.json()["disk_format"]) == (
        "image", "selected", ["bob"], "qcow2")  # fmt: skip


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"disk_format": "qcow2", "colour": "blue"}, "unknown field 'colour'"),
        ({"vis": "friends"}, "vis: Input should be 'public', 'private' or 'selected'"),
        ({}, "vis: required for an image request"),
        ({"vis": "selected"}, "shared_with: required when vis is selected"),
        ({"vis": "selected", "shared_with": []}, "shared_with: required when vis is selected"),
        ({"vis": "public", "shared_with": ["bob"]}, "shared_with: only when vis is selected"),
        ({"vis": "selected", "shared_with": ["bob", "mallory"]}, "shared_with: unknown users 'mallory'"),
        ({"vis": "selected", "shared_with": ["../bob"]}, "shared_with: name '../bob' is not allowed"),
        ({"vis": "selected", "shared_with": "bob"}, "shared_with: Input should be a valid list"),
        (
            {"disk_format": "qcow2", "vis": "private"},
            "vis, shared_with and destination belong to image requests",
        ),
        (
            {"disk_format": "iso"},
            "unknown disk_format 'iso' (supported: raw, qcow2, vmdk, vdi, vhd, vhdx, ova, gce)",
        ),
        ({"disk_format": "qcow2", "target": "vmware"}, "unknown target 'vmware'"),
        ({"disk_format": "qcow2", "target": "../defaults"}, "unknown target '../defaults'"),
        ({"disk_format": "qcow2", "instance": "i-2"}, "unknown instance 'i-2'"),
        ({"disk_format": "qcow2", "instance": ""}, "instance: String should have at least 1 character"),
        ({"disk_format": "qcow2", "name": None}, "name: Input should be a valid string"),
    ],
)
def test_bad_fields(svc: Service, body: dict[str, Any], message: str) -> None:
    assert message in error(svc.create(**body), 422)
    assert svc.call("GET", URL, "root").json() == []  # nothing was created


@pytest.mark.parametrize(
    "name", ["My image (v2)", "../../etc/passwd", "a;rm -rf ~", "$(id)", "-rf", "naïve", "образ", "x" * 255]
)
def test_names_as_users_write_them(svc: Service, name: str) -> None:
    """Free text is the image's name; file names, run ids and the run's argv get a safe slug."""
    from imaging.service import worker

    r = svc.create(disk_format="qcow2", name=name)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == name
    req = svc.store.get(r.json()["id"])
    argv = worker.command(svc.settings, req)
    assert f"--name={name}" in argv  # one argv word, never a shell's; '-rf' is no option
    slug = config.slug(name)
    assert config.check_name(slug) == slug and len(slug) <= 60 and "/" not in slug


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("x\n", "control or unprintable character"),
        ("a\tb", "control or unprintable character"),
        ("\x1b[31mred", "control or unprintable character"),
        ("bell\x07", "control or unprintable character"),
        (" lead", "starts or ends with white space"),
        ("x" * 256, "at most 255 characters"),
        # would break the approval mail's headers, the .sha256 file and the published metadata
        ("x\r\nBcc: y", "control or unprintable character"),
    ],
)
def test_names_with_control_characters_are_refused(svc: Service, name: str, message: str) -> None:
    assert message in error(svc.create(disk_format="qcow2", name=name), 422)
    assert svc.call("GET", URL, "root").json() == []  # nothing was created


def test_body_that_is_not_json(svc: Service) -> None:
    r = svc.call("POST", URL, content=b"{nope", headers={"Content-Type": "application/json"})
    assert error(r, 400) == "the body is not valid JSON"
    r = svc.call("POST", URL, content=b"\xff\xfe{", headers={"Content-Type": "application/json"})
    assert error(r, 400) == "the body is not valid JSON"


def test_no_image_requests_where_nothing_is_published(tmp_path: Path, database: str) -> None:
    conf = make_settings(tmp_path, database)
    store = Store(conf.sqlalchemy_url)
    token = store.add_user("alice")
    with TestClient(api.create_app(conf, recover=False)) as client:
        r = client.post(URL, json={"instance": "i-1", "name": "x", "vis": "public"},
                        headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    assert "does not publish images" in error(r, 422)


def test_a_disk_over_its_formats_limit_is_refused_at_once(tmp_path: Path, database: str) -> None:
    # A 2045 GiB instance: its bootable disk (2046 GiB with the default +1G) is over what a VHD
    # holds; the request is refused now, not when its run ends. A broken source is the run's to
    # report, as before.
    big, broken = tmp_path / "big.img", tmp_path / "broken.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard",
                    big, "2045G"], check=True, capture_output=True)  # fmt: skip
    broken.write_bytes(b"not an image")
    conf = make_settings(tmp_path, database, instances={"i-big": str(big), "i-broken": str(broken)},
                         publish={"bucket": "images"})  # fmt: skip
    store = Store(conf.sqlalchemy_url)
    token = store.add_user("alice")
    with TestClient(api.create_app(conf, recover=False)) as client:

        def create(instance: str, **body: Any) -> Any:
            return client.post(URL, json={"instance": instance, "name": "x", **body},
                               headers={"Authorization": f"Bearer {token}"})  # fmt: skip

        assert "over what vhd holds: 2040 GiB" in error(create("i-big", disk_format="vhd"), 422)
        assert "over what ova (its streamOptimized VMDK) holds" in error(
            create("i-big", disk_format="ova"), 422
        )
        assert create("i-big", disk_format="qcow2").status_code == 201
        assert create("i-big", vis="private").status_code == 201  # an image request: qcow2
        assert create("i-broken", disk_format="vhd").status_code == 201
    store.close()


def test_authentication(svc: Service) -> None:
    r = svc.call("GET", URL, None)
    assert error(r, 401) == "a bearer token is required" and r.headers["www-authenticate"] == "Bearer"
    r = svc.client.get(URL, headers={"Authorization": "Bearer imaging_forged"})
    assert error(r, 401) == "unknown bearer token"
    r = svc.client.get(URL, headers={"Authorization": f"Basic {svc.tokens['alice']}"})
    assert r.status_code == 401
    assert svc.call("GET", "/api/v1/me", "root").json() == {"name": "root", "role": "admin",
                                                             "email": "root@example.org"}  # fmt: skip


def test_another_users_request(svc: Service) -> None:
    rid = svc.create(disk_format="qcow2").json()["id"]
    for method, path, body in [
        ("GET", "", None),
        ("PATCH", "", {"status": "cancel"}),
        ("GET", "/artifact", None),
        ("GET", "/notebooks", None),
        ("GET", "/audit", None),
        ("GET", "/notebooks/00-acquire", None),
    ]:
        assert error(svc.call(method, URL + rid + path, "bob", json=body), 404) == f"no image request {rid}"
    assert svc.call("GET", URL, "bob").json() == []
    assert [r["id"] for r in svc.call("GET", URL, "root").json()] == [rid]


def test_only_admins_approve(svc: Service) -> None:
    rid = svc.create(disk_format="qcow2").json()["id"]
    assert (
        error(svc.call("PATCH", URL + rid, json={"status": "approve"}), 403)
        == "only admins may approve a request"
    )
    assert (
        error(svc.call("PATCH", URL + rid, json={"status": "deny"}), 403) == "only admins may deny a request"
    )
    r = svc.call("PATCH", URL + rid, "root", json={"status": "approve", "reason": "ok"})
    assert r.status_code == 200 and r.json()["state"] == "approved"
    assert r.json()["history"][-1] | {"time": 0} == {
        "time": 0,
        "actor": "root",
        "from": "pending",
        "to": "approved",
        "stage": None,
        "reason": "ok",
    }
    assert "cannot approve a request that is approved" in error(
        svc.call("PATCH", URL + rid, "root", json={"status": "approve"}), 409
    )
    assert svc.call("PATCH", URL + rid, json={"status": "cancel"}).json()["state"] == "cancelled"


@pytest.mark.parametrize(
    "body", [{"status": "approved"}, {"status": "approve", "force": True}, {}, {"status": 1}]
)
def test_bad_patch(svc: Service, body: dict[str, Any]) -> None:
    rid = svc.create(disk_format="qcow2").json()["id"]
    error(svc.call("PATCH", URL + rid, "root", json=body), 422)


@pytest.mark.parametrize(
    "path",
    [
        "ir-nothere",
        "ir-000000000000",
        "..%2F..%2Fetc",
        "ir-000000000000/notebooks/..%2Fx",
        "ir-000000000000/notebooks/00-a;b",
    ],
)
def test_bad_ids_and_names(svc: Service, path: str) -> None:
    r = svc.call("GET", URL + path, "root")
    assert r.status_code in (404, 422), r.text
    error(r, r.status_code)


def test_no_artifact_before_completion(svc: Service) -> None:
    rid = svc.create(disk_format="qcow2").json()["id"]
    assert (
        error(svc.call("GET", URL + rid + "/artifact"), 409)
        == f"request {rid} is pending: no artifact to download"
    )
    assert svc.call("GET", URL + rid + "/notebooks").json() == []


def test_list_filters(svc: Service) -> None:
    a = svc.create(disk_format="qcow2").json()["id"]
    svc.create(disk_format="raw")
    svc.call("PATCH", URL + a, "root", json={"status": "deny"})
    assert [r["id"] for r in svc.call("GET", URL + "?state=denied").json()] == [a]
    assert len(svc.call("GET", URL + "?limit=1").json()) == 1
    error(svc.call("GET", URL + "?state=lost"), 422)
    error(svc.call("GET", URL + "?limit=0"), 422)


def test_approval_link(svc: Service) -> None:
    rid = svc.create(disk_format="qcow2").json()["id"]
    token = svc.link(rid)
    page = svc.client.get("/api/v1/approve", params={"token": token})
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert rid in page.text and "<form method='post'>" in page.text and "Approve as root" in page.text
    svc.client.get("/api/v1/approve", params={"token": token})
    assert svc.call("GET", URL + rid).json()["state"] == "pending"  # a GET never changes state
    done = svc.client.post("/api/v1/approve", params={"token": token})
    assert done.status_code == 200 and "approved" in done.text
    last = svc.call("GET", URL + rid).json()["history"][-1]
    assert (last["actor"], last["to"], last["reason"]) == (
        "root",
        "approved",
        "approved by the link in the mail",
    )
    assert (
        error(svc.client.post("/api/v1/approve", params={"token": token}), 409)
        == "this approval link was used already"
    )
    assert error(svc.client.get("/api/v1/approve", params={"token": token}), 409).startswith(
        "this approval link is out of date"
    )


def test_expired_forged_and_stale_links(svc: Service) -> None:
    rid = svc.create(disk_format="qcow2").json()["id"]
    expired = svc.link(rid, now=time.time() - svc.settings.approval_ttl_seconds - 10)
    assert "expired" in error(svc.client.post("/api/v1/approve", params={"token": expired}), 410)
    forged = approvals.sign_approval("not the service's key" * 2, rid, 3, 1)
    assert (
        error(svc.client.post("/api/v1/approve", params={"token": forged}), 403)
        == "this approval link is not valid"
    )
    (alice,) = svc.store.users(["alice"])
    as_user = approvals.sign_approval(svc.settings.signing_key(), rid, alice.id, 1)
    assert "no longer an admin" in error(svc.client.post("/api/v1/approve", params={"token": as_user}), 403)
    stale = svc.link(rid)
    svc.call("PATCH", URL + rid, json={"status": "cancel"})
    assert "out of date: the request is cancelled now" in error(
        svc.client.post("/api/v1/approve", params={"token": stale}), 409)  # fmt: skip
    error(svc.client.post("/api/v1/approve"), 422)
    assert svc.call("GET", URL + rid).json()["state"] == "cancelled"


def test_openapi_documents_the_errors(svc: Service) -> None:
    spec = svc.client.get("/openapi.json").json()
    post = spec["paths"]["/api/v1/request_image/"]["post"]
    assert {"201", "401", "422"} <= set(post["responses"])
    assert post["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    history = spec["components"]["schemas"]["TransitionOut"]["properties"]
    assert {"time", "actor", "from", "to", "stage", "reason"} == set(history)


@pytest.mark.parametrize(
    "options",
    [
        {"clean": ["no-such-operation"]},
        {"profile": "plan9"},
        {"packages_install": ["vim;id"]},
        {"packages_remove": ["-rf"]},
        {"boot_marker": "(unclosed"},
    ],
)
def test_options_are_checked_like_the_clis(svc: Service, options: dict[str, Any]) -> None:
    """The same model, the same one-line error as `imaging export` would give."""
    from imaging.errors import ParameterError
    from imaging.run.request import Request

    with pytest.raises(ParameterError) as cli:
        Request.create(source="sample:kvm", name="demo", **options)
    assert error(svc.create(disk_format="qcow2", **options), 422) == str(cli.value)
    assert svc.call("GET", URL, "root").json() == []


def test_options_are_shown_to_the_approving_admin(svc: Service) -> None:
    body = {"disk_format": "raw", "profile": "debian", "clean": ["-logfiles", "cloud-init"],
            "packages_install": ["openssh-server"], "layout": "legacy"}  # fmt: skip
    created = svc.create(**body)
    assert created.status_code == 201, created.text
    rid = created.json()["id"]
    assert created.json()["options"] == {k: v for k, v in body.items() if k != "disk_format"}
    page = svc.client.get(f"/api/v1/approve?token={svc.link(rid)}")
    for shown in ("debian", "-logfiles, cloud-init", "openssh-server", "legacy"):
        assert shown in page.text
    assert error(svc.create(disk_format="raw", destination="aws"), 422).startswith(
        "vis, shared_with and destination belong to image requests"
    )
    assert (
        error(svc.create(vis="public", destination="nowhere"), 422)
        == "unknown destination 'nowhere' (known: s3)"
    )


def test_report_is_served_once_the_run_has_ended(svc: Service) -> None:
    rid = svc.create(disk_format="raw").json()["id"]
    assert (
        error(svc.call("GET", URL + rid + "/report"), 409)
        == f"request {rid} has no report yet: its run has not ended"
    )
    run = config.runs_dir() / rid
    run.mkdir(parents=True)
    (run / "report.html").write_text("<html><body>Audit record</body></html>")
    page = svc.call("GET", URL + rid + "/report")
    assert page.status_code == 200 and "Audit record" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert svc.call("GET", URL + rid + "/report", "bob").status_code == 404  # not bob's
    assert svc.call("GET", URL + rid).json()["links"]["report"].endswith(f"/{rid}/report")
