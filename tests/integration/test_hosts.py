"""Many conversion hosts (servicekit.hosts_world): two worker processes that share nothing but
the database and the record store, each with its own state and runs directories, and the API on
a third runs directory.

Five requests approved at once all complete, exactly once. A worker killed with SIGKILL mid-stage
has its request queued again by the other within the heartbeat timeout and taken over: from its
first stage when the stage's input disk was not kept (host A keeps none: the abandoned attempt
stays in the record), at the stage it was in when it was (host B keeps them). Every run's
notebooks, audit chain and artifact come from the API whichever host ran it, and verify.

The bulk is five full exports of the small sample:kvm (qcow2, boot check included): the cheapest
request the service takes that still runs every stage, so the kills can land mid-pipeline and
the takeovers resume at a stage with a real input disk. Five, not four: after the first kill
and its takeover, each host still has a request of its own to run, so host B surely runs one
that can be killed. Twenty requests at once, and their queue order, are the load campaign's
(tests/campaigns/load.py).
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from imaging import config

from .conftest import leftovers
from .servicekit import HEARTBEAT, STALLED, Host, World, hosts_world, s3_client, wait_for

URL = "/api/v1/request_image/"
COUNT = 5
STAGES = config.pipeline_stages("export")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("hosts")
    with hosts_world(root) as w:
        yield w
    assert leftovers(root) == []


def show(world: World, rid: str) -> dict[str, Any]:
    with world.api.client("root") as c:
        found: dict[str, Any] = c.get(URL + rid).json()
    return found


def running_on(world: World, host: Host, stages: tuple[str, ...], exclude: tuple[str, ...]) -> str | None:
    """A request that ``host``'s worker runs, in one of ``stages`` (its last transition: that
    worker saw its run enter the stage)."""
    with world.api.client("root") as c:
        for req in c.get(URL, params={"state": "running"}).json():
            if req["id"] in exclude or not (req["worker"] or "").endswith(f":{host.worker_pid}"):
                continue
            last = c.get(URL + req["id"]).json()["history"][-1]
            if last["reason"] in {f"stage {s}" for s in stages} and last["actor"] == req["worker"]:
                return str(req["id"])
    return None


def kill_mid_stage(
    world: World, host: Host, stages: tuple[str, ...], exclude: tuple[str, ...] = ()
) -> tuple[str, str, float]:
    """SIGKILL ``host``'s worker while a request of it is in one of ``stages``, its notebook
    executing: (request, stage, when)."""

    def executing() -> tuple[str, str] | None:
        rid = running_on(world, host, stages, exclude)
        stage = show(world, rid)["stage"] if rid else None
        # papermill's notebook, as the stage runs
        if rid and stage and (host.root / "runs" / rid / "notebooks" / f".{stage}.part.ipynb").exists():
            return rid, stage
        return None

    rid, stage = wait_for(f"a request on host {host.name} in {stages}", executing, 400, 0.1)
    assert host.proc is not None
    host.proc.kill()
    killed = time.monotonic()
    host.proc.wait(timeout=30)
    assert show(world, rid)["stage"] == stage
    return rid, stage, killed


def requeued(world: World, rid: str, after: int) -> dict[str, Any] | None:
    history = show(world, rid)["history"]
    found = [h for h in history[after:] if h["actor"] == "system" and h["to"] == "approved"]
    return found[0] if found else None


def test_requests_on_two_hosts_with_a_worker_killed_on_each(world: World) -> None:
    t0 = time.monotonic()
    a, b = world.hosts["a"], world.hosts["b"]
    a.start()
    b.start()
    alice, root = world.api.client("alice"), world.api.client("root")
    ids = [alice.post(URL, json={"instance": "i-sample", "name": f"host test {i}", "disk_format": "qcow2"}).json()["id"]
           for i in range(COUNT)]  # fmt: skip
    with ThreadPoolExecutor(COUNT) as pool:  # approved at once
        assert all(
            r.status_code == 200
            for r in pool.map(lambda rid: root.patch(URL + rid, json={"status": "approve"}), ids)
        )

    # Host A keeps no input disks: its request killed mid-stage starts again from the first
    # stage on host B, its abandoned attempt kept in the record.
    first, first_stage, killed = kill_mid_stage(world, a, ("20-migrate", "30-bootable"))
    n = len(show(world, first)["history"])
    event = wait_for(f"{first} to be queued again", lambda: requeued(world, first, n - 1), 60, 0.2)
    taken = time.monotonic() - killed
    assert taken <= STALLED + 4 * HEARTBEAT + 3, taken  # the heartbeat timeout, and a little
    assert f":{a.worker_pid}" in event["reason"] and "no heartbeat" in event["reason"]
    claim = wait_for(f"{first} to be claimed again", lambda: next(
        (h for h in show(world, first)["history"][n:] if h["reason"] == "claimed"), None), 400, 0.5)  # fmt: skip
    assert claim["actor"].endswith(f":{b.worker_pid}")  # the other host took it
    a.start()  # host A back, with a new worker

    # Host B keeps them: its request killed mid-stage resumes at that stage on host A.
    second, second_stage, killed = kill_mid_stage(world, b, ("20-migrate", "30-bootable"), exclude=(first,))
    n2 = len(show(world, second)["history"])
    wait_for(f"{second} to be queued again", lambda: requeued(world, second, n2 - 1), 60, 0.2)
    assert time.monotonic() - killed <= STALLED + 4 * HEARTBEAT + 3
    claim = wait_for(f"{second} to be claimed again", lambda: next(
        (h for h in show(world, second)["history"][n2:] if h["reason"] == "claimed"), None), 400, 0.5)  # fmt: skip
    assert claim["actor"].endswith(f":{a.worker_pid}")
    b.start()

    done = {rid: world.api.wait_state("root", rid, {"completed", "error"}, timeout=900) for rid in ids}
    elapsed = time.monotonic() - t0
    print(f"\n{COUNT} requests on 2 hosts, 2 workers killed: {elapsed:.0f} s", file=sys.stderr)
    for rid, req in done.items():
        assert req["state"] == "completed", (rid, req["error"])
        assert [h["to"] for h in req["history"]].count("completed") == 1  # exactly once
        claims = [h for h in req["history"] if h["reason"] == "claimed"]
        requeues = [h for h in req["history"] if h["actor"] == "system"]
        assert len(claims) == 1 + len(requeues) and len(requeues) == (rid in (first, second))
    engine = create_engine(world.database)
    with engine.connect() as conn:
        jobs = conn.execute(text("SELECT args->>'request_id', status, count(*) FROM procrastinate_jobs "
                                 "GROUP BY 1, 2")).all()  # fmt: skip
    engine.dispose()
    # Succeeded jobs are deleted; the lost workers' jobs stay, failed: one each, nothing else left.
    assert sorted((r, s) for r, s, _ in jobs) == sorted([(first, "failed"), (second, "failed")])

    # The first kill: attempt 1's completed stages kept as abandoned, the failed stage's
    # interrupted notebook kept, then every stage again.
    names = [nb["name"] for nb in root.get(URL + first + "/notebooks").json()]
    before = STAGES[: STAGES.index(first_stage)]
    assert set(names) == {*STAGES, *(f"{s}.attempt-1" for s in before), f"{first_stage}.failed-1"}, names
    # The second: resumed at the stage it was killed in, on the other host.
    names = [nb["name"] for nb in root.get(URL + second + "/notebooks").json()]
    assert set(names) == {*STAGES, f"{second_stage}.failed-1"}, names
    # The stages it entered: up to the one it was killed in, then from that one on.
    stages = [h["stage"] for h in done[second]["history"] if h["reason"].startswith("stage ")]
    at = STAGES.index(second_stage)
    assert stages == [*STAGES[: at + 1], *STAGES[at:]], stages

    # The API, on a host that ran nothing, serves every run's record from the store.
    assert not any((world.api.runs).glob("*/notebooks"))
    for rid, req in done.items():
        record = root.get(URL + rid + "/audit").json()
        assert record["ok"] and record["head"] == req["result"]["audit_head"], (rid, record["problems"])
        for nb in root.get(URL + rid + "/notebooks").json():
            assert nb["html"], (rid, nb)  # every notebook rendered, failed and abandoned ones too
            page = root.get(nb["html"])
            assert page.status_code == 200 and "<html" in page.text, (rid, nb["name"])
        download = root.get(URL + rid + "/artifact")
        assert (
            hashlib.sha256(download.content).hexdigest()
            == req["result"]["sha256"]
            == download.headers["x-checksum-sha256"]
        )
        assert root.get(URL + rid + "/report").status_code == 200
    moved = [e for e in root.get(URL + first + "/audit").json()["entries"] if e["kind"] == "moved"]
    assert {e["from"] for e in moved} >= {f"notebooks/{s}.ipynb" for s in before}
    # Nothing kept in the store once the runs completed: no input disk, no partial file.
    keys = [o["Key"] for o in s3_client(world.s3_url).list_objects_v2(Bucket="records").get("Contents", [])]
    assert not [k for k in keys if "/work/" in k or ".part" in k], keys
