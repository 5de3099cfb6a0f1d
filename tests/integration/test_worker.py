"""Workers stopped mid-run: SIGTERM stops the run cleanly and leaves the request in error; SIGKILL
takes the run down with it and the worker's lease expires into error. Either way, approving again
resumes the run at the stage it was in."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx

from .conftest import leftovers
from .servicekit import Service, started_stages, wait_for
from .test_interrupt import alive, children, qemu_running

URL = "/api/v1/request_image/"


def stage_is(client: httpx.Client, rid: str, stage: str) -> bool:
    body = client.get(URL + rid).json()
    return bool(body["state"] == "running" and body["stage"] == stage)


def test_stopped_and_killed_workers_leave_requests_that_resume(tmp_path: Path) -> None:
    config = {"instances": {"i-sample": "sample:kvm"},
              "worker": {"embedded": False, "poll_seconds": 0.5, "lease_seconds": 4}}  # fmt: skip
    service = Service(tmp_path, tmp_path / "runs", config)
    service.add_user("alice")
    service.add_user("root", admin=True)
    service.start()
    root = service.client("root")
    try:
        rid = (
            service.client("alice")
            .post(URL, json={"instance": "i-sample", "name": "w", "disk_format": "qcow2"})
            .json()["id"]
        )
        root.patch(URL + rid, json={"status": "approve"})
        run = service.runs / rid

        # SIGTERM while the disk is being made: the run is interrupted and cleaned up.
        first = service.worker()
        wait_for("stage 30-bootable", lambda: stage_is(root, rid, "30-bootable"), 180)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0
        body = root.get(URL + rid).json()
        assert (body["state"], body["stage"]) == ("error", "30-bootable"), body
        assert "the worker was stopped" in body["error"]
        assert leftovers(tmp_path) == []

        # Approved again: resumes; SIGKILL during the boot check.
        root.patch(URL + rid, json={"status": "approve"})
        second = service.worker()
        wait_for("the boot check", lambda: qemu_running(run), 180)
        runs = children(second.pid)
        second.kill()
        second.wait(timeout=30)
        # The run got SIGTERM from the kernel (PDEATHSIG), stops QEMU and exits.
        wait_for("QEMU to stop", lambda: not qemu_running(run), 30)
        wait_for("the run to exit", lambda: not any(alive(p) for p in runs), 60)
        assert root.get(URL + rid).json()["state"] == "running"  # until the lease runs out
        # The service (no embedded worker) expires the lease; the admins would be mailed.
        body = service.wait_state("root", rid, {"error"}, timeout=60)
        assert "lease expired" in body["history"][-1]["reason"] and body["history"][-1]["actor"] == "system"
        assert leftovers(tmp_path) == []

        # Approved again, a new worker finishes the run from the boot check.
        root.patch(URL + rid, json={"status": "approve"})
        third = service.worker("--concurrency", "2")
        try:
            done = service.wait_state("root", rid, {"completed", "error"})
            assert done["state"] == "completed", done["error"]
            assert started_stages(run) == [
                "00-acquire",
                "10-clean",
                "20-migrate",
                "30-bootable",
                "30-bootable",
                "40-export",
                "50-verify",
                "50-verify",
            ]
            assert len({h["actor"] for h in done["history"] if h["reason"] == "claimed"}) == 3

            # Its owner cancels a running request: the worker stops the run and goes on.
            alice = service.client("alice")
            other = alice.post(URL, json={"instance": "i-sample", "name": "c", "disk_format": "raw"}).json()[
                "id"
            ]
            root.patch(URL + other, json={"status": "approve"})
            wait_for("stage 30-bootable", lambda: stage_is(root, other, "30-bootable"), 180)
            assert alice.patch(URL + other, json={"status": "cancel"}).json()["state"] == "cancelled"
            wait_for(
                "the run to stop",
                lambda: "interrupted" in str(service.runs.joinpath(other, "state.json").read_text()),
                60,
            )
            assert third.poll() is None and leftovers(tmp_path) == []
        finally:
            third.send_signal(signal.SIGTERM)
            third.wait(timeout=120)
    finally:
        service.stop()
    assert leftovers(tmp_path) == []


def test_worker_refuses_bad_settings(tmp_path: Path) -> None:
    service = Service(tmp_path, tmp_path / "runs", {"worker": {"lease_seconds": 1}})
    proc = subprocess.run(
        [*service.worker_argv()], capture_output=True, text=True, env=service.env, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"imaging: error: {service.config_file}: worker.lease_seconds: Input should be greater than or equal to 3"
    ]
