"""A worker stopped mid-run (SIGTERM): its run stops cleanly and its request is queued again; the
next worker resumes it at the stage it was in. A request cancelled while it runs has its run
stopped, and the worker goes on. The database stopped mid-run: briefly, the run goes on; past
the worker's lease, the run is stopped and, once the database is back, queued again and
resumed. (A worker killed outright, and taken over by another host: test_hosts.py.) Bad
settings, a missing database: one line."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from imaging.config import pipeline_stages
from imaging.service import postgres

from .conftest import leftovers
from .servicekit import Service, free_port, started_stages, wait_for

URL = "/api/v1/request_image/"


def run_is(run: Path, wanted: str, stage: str) -> bool:
    """The run's own record says so: a stage takes half a second, less than the API's view of
    it (the worker's heartbeat) may lag."""
    try:
        now = json.loads((run / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(now["state"] == wanted and now["stage"] == stage)


def test_a_stopped_worker_queues_its_request_again_and_a_cancelled_run_stops(tmp_path: Path) -> None:
    config = {"instances": {"i-sample": "sample:kvm"},
              "worker": {"embedded": False, "poll_seconds": 0.5, "heartbeat_seconds": 1, "stalled_seconds": 5}}  # fmt: skip
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

        # SIGTERM while the disk is being made: the run is interrupted, cleaned up, queued again.
        first = service.worker()
        wait_for("stage 30-bootable", lambda: run_is(run, "running", "30-bootable"), 180)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0
        # Where the signal found it: 30-bootable, unless the machine's load let it finish first.
        at = json.loads((run / "state.json").read_text())["stage"]
        body = root.get(URL + rid).json()
        # Queued again by the worker itself, not by the API as a lost worker's: its heartbeat goes
        # on while the run cleans up (which took longer than stalled_seconds in one run of two,
        # and the request then went back to the stage the database last knew).
        assert (body["state"], body["stage"]) == ("approved", at), body
        assert f"stopped: its run was interrupted at {at}; queued again" in body["history"][-1]["reason"]
        assert not [h for h in body["history"] if " lost" in h["reason"]], body["history"]
        assert leftovers(tmp_path) == []

        # The next worker resumes it at that stage.
        second = service.worker("--concurrency", "2")
        try:
            done = service.wait_state("root", rid, {"completed", "error"})
            assert done["state"] == "completed", done["error"]
            stages = pipeline_stages("export")
            stopped = stages.index(at)
            assert started_stages(run) == [*stages[: stopped + 1], *stages[stopped:]]
            assert len({h["actor"] for h in done["history"] if h["reason"] == "claimed"}) == 2

            # Its owner cancels a running request: the worker stops the run and goes on.
            alice = service.client("alice")
            other = alice.post(URL, json={"instance": "i-sample", "name": "c", "disk_format": "raw"}).json()[
                "id"
            ]
            root.patch(URL + other, json={"status": "approve"})
            wait_for(
                "stage 30-bootable", lambda: run_is(service.runs / other, "running", "30-bootable"), 180
            )
            assert alice.patch(URL + other, json={"status": "cancel"}).json()["state"] == "cancelled"
            wait_for(
                "the run to stop",
                lambda: "interrupted" in str(service.runs.joinpath(other, "state.json").read_text()),
                60,
            )
            assert second.poll() is None and leftovers(tmp_path) == []
            assert root.get(URL + other).json()["state"] == "cancelled"
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=120)
    finally:
        service.stop()
    assert leftovers(tmp_path) == []


def test_worker_refuses_bad_settings_and_a_missing_database(tmp_path: Path) -> None:
    service = Service(tmp_path, tmp_path / "runs", {"worker": {"stalled_seconds": 1}})
    proc = subprocess.run(service.worker_argv(), capture_output=True, text=True, env=service.env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"imaging: error: {service.config_file}: worker.stalled_seconds: Input should be greater than or equal to 2"
    ]
    # No database_url, and no serve on this host to have started the private one.
    service = Service(tmp_path / "b", tmp_path / "b" / "runs", {})
    proc = subprocess.run(service.worker_argv(), capture_output=True, text=True, env=service.env, timeout=60)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("imaging: error: no database_url is set, and this host's private database") and (
        "start `python -m imaging serve` here first, or set database_url" in line
    )


def test_a_worker_outlives_a_database_that_goes_away(tmp_path: Path) -> None:
    """The shared database stops while a worker runs a request. For longer than the worker's
    lease (stalled_seconds less a heartbeat: 9 s here): the run is stopped while the database is
    still away, and once it is back the request is queued again (by the worker, or by the
    recovery of its stalled job) and the same worker resumes it at the stage it was stopped in,
    to completion. For less than the lease, during the resumed run: nothing changes. The worker process never
    stops; the request never says running while no run runs for it."""
    cluster = postgres.Cluster(tmp_path / "pg", durable=False, tcp_port=free_port())
    cluster.start()
    config = {"instances": {"i-sample": "sample:kvm"}, "database_url": cluster.url, "secret_key": "k" * 40,
              "worker": {"embedded": False, "poll_seconds": 0.5, "heartbeat_seconds": 1, "stalled_seconds": 10,
                         "check_seconds": 0.5}}  # fmt: skip
    service = Service(tmp_path, tmp_path / "runs", config)
    service.cli("db", "upgrade", "--config", str(service.config_file))
    service.add_user("alice")
    service.add_user("root", admin=True)
    service.start()
    root = service.client("root")
    worker = service.worker()
    try:
        rid = service.client("alice").post(
            URL, json={"instance": "i-sample", "name": "db", "disk_format": "raw"}
        )
        rid = rid.json()["id"]
        root.patch(URL + rid, json={"status": "approve"})
        state = service.runs / rid / "state.json"

        # Longer than the lease, with four stages and the boot still to run (about 13 s): the
        # run stops while the database is away.
        wait_for("stage 10-clean", lambda: run_is(service.runs / rid, "running", "10-clean"), 180)
        cluster.stop()
        stopped = time.monotonic()
        wait_for("the run to stop", lambda: json.loads(state.read_text())["error"] == "interrupted", 60)
        assert time.monotonic() - stopped < 10 + 60  # the lease, and the run's own clean-up
        time.sleep(2)
        assert worker.poll() is None
        cluster.start()

        # Resumed; during its boot check (10 s), shorter than the lease: nothing changes.
        wait_for("the boot check", lambda: run_is(service.runs / rid, "running", "50-verify"), 180)
        cluster.stop()
        time.sleep(2)
        cluster.start()
        done = service.wait_state("root", rid, {"completed", "error"})
        assert done["state"] == "completed", done["error"]
        (requeued,) = [h for h in done["history"] if (h["from"], h["to"]) == ("running", "approved")]
        assert "unreachable from worker" in requeued["reason"] or "no heartbeat" in requeued["reason"], (
            requeued
        )
        claims = [h["actor"] for h in done["history"] if h["reason"] == "claimed"]
        assert len(claims) == 2 and len(set(claims)) == 1  # the same worker, both times
        runs = json.loads(state.read_text())["history"]
        assert [h["error"] for h in runs if h["state"] == "error"] == ["interrupted"]  # the long outage only
        stages = [h["stage"] for h in runs if h["state"] == "running"]
        assert stages[:2] == ["00-acquire", "10-clean"] and stages[-1] == "50-verify"
        assert len(stages) == len(set(stages)) + 1  # resumed at the stage it was stopped in
        assert worker.poll() is None and leftovers(tmp_path) == []
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=120)
        service.stop()
        cluster.stop()
