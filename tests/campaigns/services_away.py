"""Campaign: the services a conversion service leans on go away at random points of many
requests (issue 29). Requests of sample:kvm (qcow2, BIOS) through the API and two worker hosts
(servicekit.hosts_world); meanwhile, at random moments, PostgreSQL is stopped and
started again, the object store goes away and comes back (its endpoint refusing connections, its
objects kept), and the SMTP server refuses every mail for a while (451) and then takes them.

A request that ends in error because of an outage is approved again, as the admin's mail asks
(once per outage it met). Checks:

- no request lost: every one ends completed;
- none ``running`` without a live worker: sampled every few seconds, a running request names a
  worker that is alive and its job is being done, or it is put right within the worker's lease;
- none completed twice: one ``completed`` in its history, one artifact in the record store;
- every mail sent once the server is back, or its failure recorded: one approve mail per
  request, one completion mail, one failure mail per error; a mail missing from the mailbox must
  be named as given up in a log.

    python -m tests.campaigns.services_away --count 50 [--no-boot] [--seed N] [--dir DIR]

Booted: each request's whole export, its boot check (50-verify, a QEMU boot) included, one boot
per worker at a time. ``--no-boot`` (``make campaign``): every host's export pipeline ends at
40-export, as a site may define it (servicekit.unbooted_parameters), and nothing boots: what is
tested is the service's survival, which a boot adds nothing to but a run three times as long
(under TCG); the checks are the same, a completed request's boot verdict being none.

Root, loop devices, QEMU when booted. Prints its figures; exits 1 on a failed check.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from tests.integration.servicekit import HEARTBEAT, World, hosts_world, s3_client

URL = "/api/v1/request_image/"
FAULTS = ("postgres", "s3", "smtp")
FINAL = {"completed", "error", "denied", "cancelled"}


@dataclass
class Figures:
    requests: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    outage_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # the errors the outages caused, approved again
    stuck: list[str] = field(default_factory=list)  # running on no live worker past the lease
    refused_mails: int = 0
    seconds: float = 0.0

    def show(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.faults.items()))
        return (f"services away: {self.requests} requests, {sum(self.faults.values())} outages ({kinds}; "
                f"{self.outage_seconds:.0f} s in all), {len(self.errors)} runs ended in error and were "
                f"approved again, {self.refused_mails} mails refused then sent, {len(self.stuck)} stuck; "
                f"{self.seconds:.0f} s")  # fmt: skip


class Api:
    """The API as an admin and a user reach it, trying again while it answers 5xx or not at all
    (the database away): a client's view of an outage is a wait."""

    def __init__(self, world: World) -> None:
        self.alice = world.api.client("alice")
        self.root = world.api.client("root")

    def call(self, client: httpx.Client, method: str, url: str, **kw: Any) -> Any:
        deadline = time.monotonic() + 300
        while True:
            try:
                r = client.request(method, url, **kw)
                if r.status_code < 500:
                    assert r.is_success, (method, url, r.status_code, r.text)
                    return r.json()
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{method} {url}: the API did not answer for 300 s"
            time.sleep(1)


def outage(world: World, kind: str, seconds: float) -> None:
    if kind == "postgres":
        world.cluster.stop()
        time.sleep(seconds)
        world.cluster.start()
    elif kind == "s3":
        world.s3.shut()
        time.sleep(seconds)
        world.s3.open()
    else:
        # Refusing for that long, and then until a mail has been refused (the requests' mails
        # are few and far between: an outage that meets none tests nothing), within 3 minutes.
        assert world.mailbox is not None
        box, start = world.mailbox, time.monotonic()
        refused, box.refusing = box.refused, True
        time.sleep(seconds)
        while box.refused == refused and time.monotonic() - start < 180:
            time.sleep(0.5)
        box.refusing = False


def faults(world: World, rng: random.Random, until: threading.Event, figures: Figures,
           gap: tuple[float, float], length: tuple[float, float], rounds: int | None) -> None:  # fmt: skip
    """Outages at random moments until ``until`` is set (or ``rounds`` are done): every kind in
    turn (shuffled each round), each after a gap and for a length drawn uniformly from the
    ranges."""
    for _ in itertools.count() if rounds is None else range(rounds):
        kinds = list(FAULTS)
        rng.shuffle(kinds)
        for kind in kinds:
            if until.wait(rng.uniform(*gap)):
                return
            seconds = rng.uniform(*length)
            print(
                f"  {time.strftime('%H:%M:%S')} {kind} away for {seconds:.0f} s", file=sys.stderr, flush=True
            )
            began = time.monotonic()
            outage(world, kind, seconds)
            figures.faults[kind] += 1
            figures.outage_seconds += time.monotonic() - began


def live_jobs(world: World) -> dict[str, str] | None:
    """The requests whose jobs are being done now, and by which worker (None: the database is
    away)."""
    try:
        engine = create_engine(world.database, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                rows = conn.execute(text(
                    "SELECT j.args->>'request_id', w.name FROM procrastinate_jobs j JOIN procrastinate_workers w "
                    "ON w.id = j.worker_id WHERE j.status = 'doing'")).all()  # fmt: skip
        finally:
            engine.dispose()
    except Exception:
        return None
    return {str(rid): str(name) for rid, name in rows}


# The workers' stalled_seconds: a database away for longer than their lease (a heartbeat less)
# has their runs stopped and queued again; the outages' lengths fall on both sides of it.
LEASED = 15.0


def run(root: Path, count: int, seed: int, *, gap: tuple[float, float] = (10, 60),
        length: tuple[float, float] = (3, 25), rounds: int | None = None, boot: bool = True) -> Figures:  # fmt: skip
    """The campaign in ``root`` (``boot``: the requests' runs boot their artifacts); raises
    AssertionError on a failed check."""
    rng = random.Random(seed)
    figures = Figures(requests=count)
    t0 = time.monotonic()
    with hosts_world(root, mail=True, smtp_retry=2.0, stalled=LEASED, boot=boot) as world:
        assert world.mailbox is not None
        hosts = list(world.hosts.values())
        for host in hosts:
            host.start()
        api = Api(world)
        # BIOS only: one boot a request when booted, not one under each firmware (what is
        # measured is the service's survival, and a request's run is half as long).
        ids = [api.call(api.alice, "POST", URL, json={"instance": "i-sample", "name": f"away {i}", "disk_format": "qcow2",
                                                       "firmware": "bios"})["id"] for i in range(count)]  # fmt: skip
        with ThreadPoolExecutor(8) as pool:  # approved at once
            list(
                pool.map(lambda rid: api.call(api.root, "PATCH", URL + rid, json={"status": "approve"}), ids)
            )
        stop = threading.Event()
        chaos = threading.Thread(
            target=faults, args=(world, rng, stop, figures, gap, length, rounds), daemon=True
        )
        chaos.start()
        suspect: dict[str, float] = {}  # running on no live worker since
        done: dict[str, dict[str, Any]] = {}
        approved_again: Counter[str] = Counter()
        try:
            while len(done) < count:
                time.sleep(2)
                live = {h.worker_name for h in hosts if h.alive()}
                assert len(live) == len(hosts), "a worker died"
                reqs = {r["id"]: r for r in _listed(api, count)}
                if not reqs:
                    continue  # the database is away
                jobs = live_jobs(world)
                now = time.monotonic()
                for rid in ids:
                    req = reqs.get(rid)
                    if req is None or rid in done:
                        continue
                    if req["state"] == "running" and jobs is not None:
                        ok = req["worker"] in live and jobs.get(rid) == req["worker"]
                        if ok:
                            suspect.pop(rid, None)
                        elif now - suspect.setdefault(rid, now) > LEASED + 4 * HEARTBEAT:
                            figures.stuck.append(
                                f"{rid} running on {req['worker']} (its job's: {jobs.get(rid)})"
                            )
                            suspect[rid] = float("inf")
                    if req["state"] == "error":
                        figures.errors.append(f"{rid}: {req['error']}")
                        approved_again[rid] += 1
                        assert approved_again[rid] <= 5, f"{rid} failed again and again: {req['error']}"
                        api.call(api.root, "PATCH", URL + rid, json={"status": "approve"})
                    elif req["state"] in FINAL:
                        done[rid] = api.call(api.root, "GET", URL + rid)
                assert time.monotonic() - t0 < 60 * count + 600, "the campaign took too long"
        finally:
            if rounds is None or sys.exc_info()[0] is not None:
                stop.set()  # else every round's outages happen, the last ones maybe after the runs
            chaos.join()
        figures.seconds = time.monotonic() - t0
        check(world, ids, done, figures)
    return figures


def _listed(api: Api, count: int) -> list[dict[str, Any]]:
    try:
        r = api.root.get(URL, params={"limit": min(1000, max(count, 1))})
    except httpx.HTTPError:
        return []
    return list(r.json()) if r.status_code == 200 else []


def check(world: World, ids: list[str], done: dict[str, dict[str, Any]], figures: Figures) -> None:
    assert world.mailbox is not None
    problems = []
    s3 = s3_client(world.s3_url)
    for rid in ids:
        req = done[rid]
        if req["state"] != "completed":
            problems.append(f"{rid} is {req['state']}: {req['error']}")
            continue
        history = [h["to"] for h in req["history"]]
        if history.count("completed") != 1:
            problems.append(f"{rid} completed {history.count('completed')} times")
        # records.prefix is runs/
        listed = s3.list_objects_v2(Bucket="records", Prefix=f"runs/{rid}/").get("Contents", [])
        artifacts = [o["Key"] for o in listed if o["Key"].endswith(".qcow2")]
        if len(artifacts) != 1:
            problems.append(f"{rid}: artifacts {artifacts}")
    problems += [f"running on no live worker: {s}" for s in figures.stuck]
    # Mails: every one the requests made arrives once (sent again once the server is back), or
    # its loss is in a log. The last ones may still wait for their next try.
    logs = "".join(p.read_text(errors="replace") for p in world.api.root.parent.rglob("*.log"))
    expected: dict[str, int] = {}
    for rid in ids:
        errors = [h for h in done[rid]["history"] if h["to"] == "error"]
        expected[f"approve {rid}:"] = 1
        expected[f"{rid} completed:"] = 1
        expected[f"{rid} failed at"] = len(errors)
    deadline = time.monotonic() + 30
    while True:
        with world.mailbox.lock:
            subjects = [str(m["Subject"]) for m in world.mailbox.messages]
        got = {key: sum(key in s for s in subjects) for key in expected}
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(1)
    for key, n in expected.items():
        if got[key] > n:
            problems.append(f"mail {key!r} sent {got[key]} times, not {n}")
        elif got[key] < n and f"{key}" not in logs:
            problems.append(f"mail {key!r}: {got[key]} of {n} sent, and no log says why")
    figures.refused_mails = world.mailbox.refused
    assert not problems, "\n".join(problems)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--boot", action=argparse.BooleanOptionalAction, default=True,
                        help="each request's run boots its artifact (50-verify); --no-boot: runs end at 40-export")  # fmt: skip
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the hosts live (default: a temporary one)"
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"services away: {args.count} requests{'' if args.boot else ' (unbooted)'}, seed {seed}",
          file=sys.stderr, flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="services-away-", dir=args.dir) as tmp:
        try:
            figures = run(Path(tmp), args.count, seed, boot=args.boot)
        except AssertionError as e:
            print(f"services away: FAILED (seed {seed}): {e}", file=sys.stderr)
            return 1
    print(figures.show())
    return 0


if __name__ == "__main__":
    sys.exit(main())
