"""Crash consistency of the request service (issue 29), part of ``python -m tests.campaigns.crash``.

The API (``imaging serve``) and one worker (``imaging worker``) on loopback, sharing a PostgreSQL
cluster the campaign starts, as hosts share one (``serve``'s private cluster outlives a killed
``serve``: the next one takes it over, and stops it when it stops).

- Worker kills: a request approved, its worker SIGKILLed (the worker, not the run) at a random
  moment of the run; a few seconds later no process of the run is alive and nothing of it is
  mounted; within the heartbeat timeout the request is no longer ``running`` (no worker runs
  it); a new worker started, the request completes, once, its audit chain intact.
- API kills: requests created and approved by a client while the API is SIGKILLed at random
  moments and started again; the client, when an answer is lost, looks before it asks again (as
  any client must: a lost answer says nothing of whether the request was made). Every request
  made exists once and completes once; no process the API started outlives it.

Booted (``boot=True``, crash.py at ``--boot-share 1``): each request's whole export, its boot
check included. Unbooted (``make campaign``): the hosts' export pipeline ends at 40-export
(servicekit.unbooted_parameters) and nothing boots: what is tested is the service's survival of
its kills, and kills inside a boot are the CLI campaign's (crash.py's booted runs).
"""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from imaging.service import postgres
from tests.campaigns.crash import SETTLE, mounted, run_processes
from tests.integration.conftest import leftovers
from tests.integration.servicekit import Service, free_port, unbooted_parameters, wait_for

URL = "/api/v1/request_image/"
HEARTBEAT, STALLED = 1.0, 5.0
# An export of sample:kvm on the quiet machine from its state.json on, booted and not: a worker
# kill is uniform over it. (Unbooted, 15 s had a third of the kills after the run had completed.)
SPAN, SPAN_UNBOOTED = 45.0, 10.0


def _marked(state: Path) -> list[int]:
    """Live processes started by the service (IMAGING_STATE in their environment)."""
    mark = f"IMAGING_STATE={state}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if mark not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            status = (entry / "stat").read_text()
        except OSError:
            continue
        if status[status.rindex(")") + 2] not in "ZX":
            found.append(int(entry.name))
    return found


def _descends(pid: int, ancestors: set[int]) -> bool:
    while pid > 1:
        if pid in ancestors:
            return True
        try:
            status = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(status[status.rindex(")") + 2 :].split()[1])
    return False


def _request(client: httpx.Client, method: str, url: str, **kw: Any) -> httpx.Response | None:
    with contextlib.suppress(httpx.TransportError):
        return client.request(method, url, **kw)
    return None


class World:
    def __init__(self, root: Path, boot: bool = True) -> None:
        self.root = root
        site = {} if boot else {"IMAGING_PARAMETERS": str(unbooted_parameters(root))}
        self.cluster = postgres.Cluster(root / "postgres", durable=False, tcp_port=free_port())
        self.cluster.start()
        cfg = {"database_url": self.cluster.url, "instances": {"i-sample": "sample:kvm"},
               "secret_key": "the crash campaign's signing key, one for every process",
               "worker": {"embedded": False, "concurrency": 1, "poll_seconds": 0.5, "heartbeat_seconds": HEARTBEAT,
                          "stalled_seconds": STALLED, "check_seconds": 1}}  # fmt: skip
        self.api = Service(root, root / "runs", cfg, site)  # the worker gets the API's environment
        self.worker: subprocess.Popen[bytes] | None = None
        try:
            subprocess.run([sys.executable, "-m", "imaging", "db", "upgrade", "--config", str(self.api.config_file)],
                           check=True, capture_output=True, env=self.api.env, timeout=120)  # fmt: skip
            self.api.add_user("alice")
            self.api.add_user("root", admin=True)
            self.api.start()
        except BaseException:
            self.stop()
            raise

    def start_worker(self) -> None:
        log = self.root / "worker.log"
        before = log.read_bytes().count(b"started") if log.exists() else 0
        self.worker = self.api.worker()
        wait_for("the worker", lambda: log.read_bytes().count(b"started") > before, 120)

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            self.worker.wait(timeout=150)
        with contextlib.suppress(Exception):
            self.api.stop()
        self.cluster.stop()

    def show(self, rid: str) -> dict[str, Any]:
        with self.api.client("root") as c:
            found: dict[str, Any] = c.get(URL + rid).json()
        return found

    def completed_once(self, rid: str) -> list[str]:
        req = self.api.wait_state("root", rid, {"completed", "error"}, timeout=900)
        problems = []
        if req["state"] != "completed":
            problems.append(f"{rid} ended {req['state']}: {req.get('error')}")
        if (n := [h["to"] for h in req["history"]].count("completed")) != int(req["state"] == "completed"):
            problems.append(f"{rid} completed {n} times")
        with self.api.client("root") as c:
            audit = c.get(URL + rid + "/audit").json()
        if req["state"] == "completed" and not audit.get("ok"):
            problems.append(f"{rid}: audit {audit.get('problems')}")
        return problems


def worker_kills(world: World, count: int, rng: random.Random, span: float) -> list[str]:
    """``count`` requests, each one's worker killed at a moment uniform over ``span`` seconds
    of its run."""
    problems: list[str] = []
    alice = world.api.client("alice")
    root = world.api.client("root")
    for i in range(count):
        rid = alice.post(
            URL, json={"instance": "i-sample", "name": f"worker kill {i}", "disk_format": "qcow2"}
        ).json()["id"]
        root.patch(URL + rid, json={"status": "approve"})
        run = world.api.runs / rid
        world.start_worker()
        assert world.worker is not None
        wait_for(f"{rid} to start", lambda: (run / "state.json").exists(), 300, 0.05)  # noqa: B023
        time.sleep(rng.uniform(0, span))
        stage = world.show(rid)["stage"]
        world.worker.kill()
        world.worker.wait()
        killed = time.monotonic()
        while (run_processes(run) or mounted(world.root)) and time.monotonic() - killed < SETTLE:
            time.sleep(0.1)
        left = run_processes(run) + mounted(world.root)
        settled = time.monotonic() - killed
        if left:
            problems.append(f"worker kill {i} ({stage}): {SETTLE:.0f} s later: {left}")
        # No worker runs it now: within the heartbeat timeout it is not `running` any more.
        timeout = STALLED + 4 * HEARTBEAT + 5

        def left_running(rid: str = rid) -> dict[str, Any] | None:
            now = world.show(rid)
            return now if now["state"] != "running" else None

        try:
            after = wait_for(f"{rid} to leave running", left_running, timeout, 0.2)
        except AssertionError:
            problems.append(
                f"worker kill {i}: {rid} still running {timeout:.0f} s after its worker was killed"
            )
            after = world.show(rid)
        world.start_worker()
        problems += world.completed_once(rid)
        print(f"worker kill {i}: in {stage}, settled in {settled:.1f} s, then {after['state']}; "
              f"{'ok' if not problems else problems}", flush=True)  # fmt: skip
        world.worker.send_signal(signal.SIGTERM)
        world.worker.wait(timeout=150)
        world.worker = None
    alice.close()
    root.close()
    return problems


def api_kills(world: World, count: int, rng: random.Random) -> list[str]:
    """``count`` requests made and approved while the API is killed ``count`` times."""
    problems: list[str] = []
    made: list[str] = []
    done = threading.Event()

    def client() -> None:
        alice = world.api.client("alice")
        root = world.api.client("root")
        for i in range(count):
            name = f"api kill {i}"
            rid = None
            while rid is None:
                r = _request(
                    alice, "POST", URL, json={"instance": "i-sample", "name": name, "disk_format": "qcow2"}
                )
                if r is not None and r.status_code < 300:
                    rid = r.json()["id"]
                    break
                time.sleep(0.2)  # the answer lost: was it made?
                listed = _request(alice, "GET", URL)
                if listed is not None and listed.status_code == 200:
                    rid = next((q["id"] for q in listed.json() if q["name"] == name), None)
            made.append(rid)
            while True:
                r = _request(root, "PATCH", URL + rid, json={"status": "approve"})
                if r is not None and r.status_code == 200:
                    break
                time.sleep(0.2)
                got = _request(root, "GET", URL + rid)
                if got is not None and got.status_code == 200 and got.json()["state"] != "pending":
                    break
            time.sleep(rng.uniform(0, 1.0))
        done.set()

    world.start_worker()
    thread = threading.Thread(target=client)
    thread.start()
    for k in range(count):
        time.sleep(rng.uniform(0, 2.0))
        assert world.api.proc is not None
        world.api.proc.kill()
        world.api.proc.wait()
        world.api.start()
        # Nothing the killed API started outlives it (the worker and its runs are not the API's).
        keep = {world.api.proc.pid, *([world.worker.pid] if world.worker else [])}
        stray = [p for p in _marked(world.api.state) if not _descends(p, keep)]
        if stray:
            problems.append(f"API kill {k}: processes left by the killed API: {stray}")
    thread.join(timeout=600)
    if not done.is_set():
        problems.append("the client did not finish")
    with world.api.client("root") as c:
        listed = [q for q in c.get(URL).json() if q["name"].startswith("api kill ")]
    names = sorted(q["name"] for q in listed)
    if names != sorted(f"api kill {i}" for i in range(count)):
        problems.append(f"requests made: {names}")
    for rid in made:
        problems += world.completed_once(rid)
    print(
        f"API kills: {count} kills, {len(made)} requests: {'ok' if not problems else problems}", flush=True
    )
    return problems


def campaign(count: int, seed: int, root: Path, boot: bool = True, span: float | None = None) -> bool:
    """``count`` worker kills, then ``count`` API kills; True if every check held. ``boot``: the
    requests' runs boot their artifacts; ``span``: a run's duration (default: SPAN or
    SPAN_UNBOOTED)."""
    t0 = time.monotonic()
    root.mkdir(parents=True)
    rng = random.Random(seed)
    world = World(root, boot)
    problems: list[str] = []
    try:
        problems += worker_kills(world, count, rng, span or (SPAN if boot else SPAN_UNBOOTED))
        problems += api_kills(world, count, rng)
    finally:
        world.stop()
    problems += [f"after the service stopped: {x}" for x in leftovers(root)]
    print(f"\nservice{'' if boot else ' (unbooted)'}: {count} worker kills, {count} API kills, {len(problems)} problems, "
          f"in {time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
    for p in problems:
        print(f"  {p}", flush=True)
    return not problems


if __name__ == "__main__":
    sys.exit(0 if campaign(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])) else 1)
