"""Campaign: the service under load (issue 29), in the world of servicekit.hosts_world
(PostgreSQL and S3 on loopback, the API, two worker hosts).

1. The API: ``--clients`` concurrent clients (threads, each its own connection) creating,
   listing and reading ``--requests`` requests in all, each client in turn creating one (a user),
   listing the newest (an admin, 100 a page) and reading one made so far. Printed: each call's
   p50 and p99 latency, the errors (non-2xx or no answer; goal none, checked), the calls per
   second and the database's size. Nothing is approved: no run starts.
2. The queue: ``--approved`` requests of sample:kvm approved at once on the two workers: all
   complete, and in queue order (booted: each run's boot check, 50-verify, included; with
   ``--no-boot`` the hosts' export pipeline ends at 40-export and nothing boots: what is tested
   is the queue, which a boot only makes three times as long under TCG). The order is the job
   engine's: Procrastinate hands out the oldest job of the highest priority first
   (``ORDER BY priority DESC, id``), and a request's job is made in the transaction that
   approves it, so requests approved at one priority start in the order of their jobs' ids. Two workers fetch at once and then record their claims, so the
   claims may swap neighbours: a request is claimed no more than (workers - 1) places away from
   its job's place, checked.

    python -m tests.campaigns.load [--clients 50] [--requests 5000] [--approved 20] [--no-boot] [--dir DIR]

Root, loop devices, QEMU (part 2 booted: one boot per worker at a time). Exits 1 on a failed
check.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

from tests.integration.servicekit import World, hosts_world

URL = "/api/v1/request_image/"


@dataclass
class ApiFigures:
    clients: int
    requests: int
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    database_bytes: int = 0

    def show(self) -> str:
        lines = [f"API load: {self.clients} clients, {self.requests} requests created, listed and read in "
                 f"{self.seconds:.1f} s ({sum(map(len, self.latency.values())) / self.seconds:.0f} calls/s), "
                 f"{len(self.errors)} errors, database {self.database_bytes / 2**20:.1f} MiB"]  # fmt: skip
        for kind, values in sorted(self.latency.items()):
            lines.append(f"  {kind:<7} {len(values):>6} calls  p50 {percentile(values, 50) * 1000:7.1f} ms  "
                         f"p99 {percentile(values, 99) * 1000:7.1f} ms  max {max(values) * 1000:7.1f} ms")  # fmt: skip
        return "\n".join(lines)


def percentile(values: list[float], p: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def api_load(world: World, clients: int, requests: int, seed: int = 0) -> ApiFigures:
    """``clients`` threads create ``requests`` requests in all, each also listing and reading."""
    figures = ApiFigures(clients, requests)
    made: list[str] = []
    lock = threading.Lock()
    counter = itertools.count()

    def timed(kind: str, call: httpx.Client, method: str, url: str, **kw: object) -> httpx.Response | None:
        t = time.perf_counter()
        try:
            r = call.request(method, url, **kw)  # type: ignore[arg-type]
        except httpx.HTTPError as e:
            with lock:
                figures.errors.append(f"{kind}: {type(e).__name__}: {e}")
            return None
        took = time.perf_counter() - t
        with lock:
            figures.latency[kind].append(took)
            if not r.is_success:
                figures.errors.append(f"{kind}: {r.status_code} {r.text[:200]}")
        return r if r.is_success else None

    def client(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        with world.api.client("alice") as alice, world.api.client("root") as root:
            while next(counter) < requests:
                r = timed("create", alice, "POST", URL,
                          json={"instance": "i-sample", "name": f"load {n}", "disk_format": "qcow2"})  # fmt: skip
                if r is not None:
                    with lock:
                        made.append(r.json()["id"])
                timed("list", root, "GET", URL, params={"limit": 100})
                with lock:
                    one = rng.choice(made) if made else None
                if one:
                    timed("read", alice, "GET", URL + one)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    figures.seconds = time.perf_counter() - t0
    engine = create_engine(world.database)
    with engine.connect() as conn:
        figures.database_bytes = int(
            conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
        )
        stored = conn.execute(
            text("SELECT count(*) FROM image_requests WHERE name LIKE 'load %'")
        ).scalar_one()
    engine.dispose()
    assert stored == len(made), f"{len(made)} requests made, {stored} stored"
    return figures


@dataclass
class QueueFigures:
    approved: int
    seconds: float = 0.0
    displacement: list[int] = field(default_factory=list)

    def show(self) -> str:
        return (f"queue: {self.approved} requests approved at once on 2 workers, all completed in "
                f"{self.seconds:.0f} s; claimed in job order give or take {max(self.displacement, default=0)} "
                f"place(s)")  # fmt: skip


def queue_order(world: World, count: int) -> QueueFigures:
    """``count`` requests approved at once on both workers: all complete, in queue order."""
    figures = QueueFigures(count)
    hosts = list(world.hosts.values())
    for host in hosts:
        if not host.alive():
            host.start()
    t0 = time.monotonic()
    with world.api.client("alice") as alice, world.api.client("root") as root:
        ids = [alice.post(URL, json={"instance": "i-sample", "name": f"queue {i}", "disk_format": "qcow2",
                                     "firmware": "bios"}).json()["id"]  # at most one boot each
               for i in range(count)]  # fmt: skip
        with ThreadPoolExecutor(min(count, 10)) as pool:  # approved at once
            codes = list(
                pool.map(lambda rid: root.patch(URL + rid, json={"status": "approve"}).status_code, ids)
            )
        assert codes == [200] * count, codes
    done = {rid: world.api.wait_state("root", rid, {"completed", "error"}, timeout=300 + 120 * count)
            for rid in ids}  # fmt: skip
    figures.seconds = time.monotonic() - t0
    problems = [
        f"{rid} {req['state']}: {req['error']}" for rid, req in done.items() if req["state"] != "completed"
    ]
    problems += [f"{rid} completed {n} times" for rid, req in done.items()
                 if (n := [h["to"] for h in req["history"]].count("completed")) != 1]  # fmt: skip
    engine = create_engine(world.database)
    with engine.connect() as conn:
        query = text("SELECT id, job_id FROM image_requests WHERE id = ANY(:ids)")
        jobs: dict[str, int] = dict(conn.execute(query, {"ids": ids}).all())
        claims: dict[str, int] = dict(conn.execute(text("SELECT request_id, min(id) FROM transitions WHERE reason = 'claimed' "
                                        "AND request_id = ANY(:ids) GROUP BY 1"), {"ids": ids}).all())  # fmt: skip
    engine.dispose()
    by_job = sorted(ids, key=lambda rid: jobs[rid])
    by_claim = sorted(ids, key=lambda rid: claims[rid])
    figures.displacement = [abs(by_job.index(rid) - by_claim.index(rid)) for rid in ids]
    late = [(rid, d) for rid, d in zip(ids, figures.displacement, strict=True) if d > len(hosts) - 1]
    if late:
        problems.append(
            f"claimed out of queue order (request, places): {late}; by job {by_job}, by claim {by_claim}"
        )
    assert not problems, "\n".join(problems)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--approved", type=int, default=20)
    parser.add_argument("--boot", action=argparse.BooleanOptionalAction, default=True,
                        help="part 2's runs boot their artifacts (50-verify); --no-boot: they end at 40-export")  # fmt: skip
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the hosts live (default: a temporary one)"
    )
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="load-", dir=args.dir) as tmp,
        hosts_world(Path(tmp), boot=args.boot) as world,
    ):
        try:
            api = api_load(world, args.clients, args.requests)
            print(api.show(), flush=True)
            assert not api.errors, f"{len(api.errors)} errors, the first: {api.errors[:5]}"
            print(queue_order(world, args.approved).show(), flush=True)
        except AssertionError as e:
            print(f"load: FAILED: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
